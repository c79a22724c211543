"""Compiled calls: the plain host calls of the functional API through a CPython extension over
the C library, ~1 us of call from Python where the JIT's fronts take ~2 (benchmarks/README.md,
"Compiled calls", "Stop 68").

``numba-bn build-plugin --out DIR`` builds, next to ``libnumba_bn.so``, the extension
``_numba_bn_calls`` (csrc/nbn_python.c) when Python's and NumPy's headers are there.
:func:`use_compiled_calls` loads it, as ``import numba_bn`` does when the environment variable
``NUMBA_BN_COMPILED_CALLS`` names such a directory; from then on :func:`numba_bn.forward_train`,
:func:`numba_bn.forward_eval`, :func:`numba_bn.backward`, :func:`numba_bn.batch_norm` and
``BatchNorm`` (its plans, or ``ops.batch_forward`` and ``ops.batch_backward`` in training, with
the float64 statistics of ABI 1.4) hand it their arguments first. It serves float32 and float64
NumPy arrays with the channels on axis 1, without ``mask``, ``residual`` or ``activation``,
``out`` None or taken as the Python path's plain call takes it (:func:`.hostcall.output`), on
the host, at the sizes the JIT backend runs serially (its cost model,
:func:`numba_bn.cpu.serial_below`); it declines anything else (NotImplemented) and the Python
path runs as before, its checks and errors included. A served call compiles nothing. Its
results are the JIT backend's bits with the host build (``--cpu host`` compiles the same kernels
for this CPU); the portable build's AVX-512 or AVX2 variant may differ in the last bit.

float64 is served since the strict kernel copies (:func:`numba_bn.stats.strict_copy`) made the
JIT's float64 bits the same in every process and in the host build.
"""

import ctypes
import importlib.machinery
import importlib.util
import os
import sysconfig
import warnings
from pathlib import Path

import numba

from ..cpu import serial_below
from .backend import ABI_MAJOR
from .build import LIBRARY_NAME

MODULE_NAME = "_numba_bn_calls"
#: The entry points and the steps of the extension's ``configure``, in its order.
ENTRY_POINTS = (
    *(f"nbn_{op}_{t}" for t in ("f32", "f64")
      for op in ("forward_train", "forward_eval", "backward", "forward_train_stats",
                 "backward_stats")),
    "nbn_status_string",
)  # fmt: skip
ABI_MINOR = 4  # the first with the _stats entry points
STEPS = ("forward_train", "forward_eval", "backward")
#: The environment variable ``import numba_bn`` reads: a directory to use compiled calls from.
ENVIRONMENT = "NUMBA_BN_COMPILED_CALLS"

#: The loaded extension, or None: what the functional API asks first.
entry = None
#: The directory it came from (what :func:`use_compiled_calls` was given), or None.
in_use = None
#: {step: the size (elements) below which the entry serves it}, as its ``configure`` was given.
serial_bounds = {}
#: {batch statistics?: the size below which it serves one of the steps of a training forward
#: and its backward (True), or of a forward with the running statistics (False)}
_served_below = {}
_library = None  # the ctypes handle of the library whose entry points it calls


def extension_name():
    """The file name of the extension for this Python (``_numba_bn_calls.cpython-...so``)."""
    return MODULE_NAME + sysconfig.get_config_var("EXT_SUFFIX")


def use_compiled_calls(directory: str | os.PathLike[str] | None):
    """Serve the plain host calls of the functional API from the C library in ``directory`` (the
    ``--out`` of ``numba-bn build-plugin``); None goes back to the Python path for every call.
    Returns the path of the extension loaded (None for None). A directory that cannot serve
    (FileNotFoundError, or RuntimeError for a library of another ABI) changes nothing."""
    global entry, in_use, _library
    if directory is None:
        entry = in_use = _library = None
        serial_bounds.clear()
        _served_below.clear()
        return None
    path = Path(directory) / extension_name()
    if not path.is_file():
        raise FileNotFoundError(
            f"directory {str(directory)!r} holds no {path.name}: build it with `numba-bn "
            f"build-plugin --out {directory}` (it needs Python's headers, Python.h, and NumPy's)"
        )
    # the library by its path, its entry points to the extension as addresses: another build of
    # it in the process (the portable one beside a host one) has the same soname
    library = ctypes.CDLL(str((Path(directory) / LIBRARY_NAME).resolve()))
    library.nbn_version.restype = ctypes.c_uint32
    version = library.nbn_version()
    if version // 10000 != ABI_MAJOR or version % 10000 // 100 < ABI_MINOR:
        raise RuntimeError(
            f"{Path(directory) / LIBRARY_NAME} has ABI version {version}; compiled calls need "
            f"{ABI_MAJOR}.{ABI_MINOR} or a later {ABI_MAJOR}.x: build it again (numba-bn "
            f"build-plugin --out {directory})"
        )
    loader = importlib.machinery.ExtensionFileLoader(MODULE_NAME, str(path))
    module = importlib.util.module_from_spec(
        importlib.util.spec_from_file_location(MODULE_NAME, path, loader=loader)
    )
    loader.exec_module(module)
    addresses = [
        ctypes.cast(getattr(library, name), ctypes.c_void_p).value for name in ENTRY_POINTS
    ]
    # the sizes that both Numba's threads and the library's run serially: the bound of the more
    # threads of the two (the library's count as it is now; it starts at all CPUs)
    threads = max(numba.config.NUMBA_NUM_THREADS, library.nbn_get_num_threads())
    from ..ops import BackwardResult, TrainResult  # ops asks this module: imported on use

    bounds = {step: serial_below(step, threads) for step in STEPS}
    module.configure(*addresses, *bounds.values(), TrainResult, BackwardResult)
    entry, in_use, _library = module, directory, library
    serial_bounds.clear()
    serial_bounds.update(bounds)
    _served_below.update({True: max(bounds["forward_train"], bounds["backward"]),
                          False: bounds["forward_eval"]})  # fmt: skip
    return path


def may_serve(batch, x, axis):
    """Whether the entry may serve a step of a BatchNorm's calls on the ndarray ``x`` with the
    channels on the int ``axis``, with ``batch`` statistics (a forward and its backward) or the
    running ones: by size and layout (the entry checks the rest per call). The layer's plan for
    such calls hands them to the entry (numba_bn/plans.py)."""
    return entry is not None and x.size < _served_below[batch] and axis % x.ndim == 1


def use_from_environment():
    """:func:`use_compiled_calls` of the directory ``NUMBA_BN_COMPILED_CALLS`` names (unset or
    empty: nothing). One that cannot serve is a RuntimeWarning, not an error: the Python path
    serves every call, as it does without the variable. Returns the extension's path or None."""
    where = os.environ.get(ENVIRONMENT)
    if not where:
        return None
    try:
        return use_compiled_calls(where)
    except (OSError, ImportError, RuntimeError) as error:
        warnings.warn(
            f"{ENVIRONMENT}={where!r} gives no compiled calls, the Python path serves every "
            f"call: {error}",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
