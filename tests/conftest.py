import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

# the suite chooses when compiled calls are on (tests/test_plugin.py): a shell's setting, which
# `import numba_bn` reads, would serve calls the tests mean for the Python path (and children)
os.environ.pop("NUMBA_BN_COMPILED_CALLS", None)
# and when a compile starts a worker (tests/test_ahead.py): in the rest of the suite, children
# included, a driver compiles in the process that runs it, as the tests of warm-up, the compile
# line and the caches expect
os.environ["NUMBA_BN_COMPILE_AHEAD"] = "0"
# every call of a driver's machine code checks its arguments' kinds first (numba_bn.cpu.drivers.
# machine_code: a wrong dtype, rank or layout would run unchecked there), children included
os.environ["NUMBA_BN_CHECK_DRIVER_CALLS"] = "1"

import numba_bn as nbn
from numba_bn.capi import build
from numba_bn.memory import is_device_array

ROOT = Path(__file__).resolve().parents[1]


def start_child(command, env=None, output=subprocess.PIPE, niceness=0):
    """``command`` started at the repository root with this checkout first on PYTHONPATH and
    ``env`` over the current environment, in its own process session (see finish_child);
    stdout and stderr together into ``output``; ``niceness`` added to its nice value."""
    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
    )
    return subprocess.Popen(
        [str(part) for part in command], cwd=ROOT, env=full_env, stdout=output,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
        preexec_fn=functools.partial(os.nice, niceness) if niceness else None,
    )  # fmt: skip


def finish_child(process, timeout, stop_signal=signal.SIGKILL):
    """(return code, output read from its pipe, or None) of a child of start_child. On timeout
    its whole group (mpiexec and its ranks, say) gets ``stop_signal``, SIGKILL 10 s later, and
    the test fails."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, stop_signal)
        try:
            output, _ = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
        command_line = " ".join(process.args)
        pytest.fail(f"{command_line} did not finish in {timeout} s:\n{(output or '')[-4000:]}")
    return process.returncode, output


def run_child(command, env=None, timeout=600, stop_signal=signal.SIGKILL):
    """(return code, stdout + stderr) of ``command`` (start_child, finish_child)."""
    return finish_child(start_child(command, env), timeout, stop_signal)


@pytest.fixture
def rng(request):
    """A fresh generator per test; its seed is printed so that a failure can be replayed
    (NUMBA_BN_TEST_SEED=seed gives every test that seed)."""
    seed = int(os.environ.get("NUMBA_BN_TEST_SEED") or np.random.SeedSequence().entropy % 2**32)
    print(f"rng seed for {request.node.nodeid}: {seed}")
    return np.random.default_rng(seed)


def random_batch(rng, shape, dtype=np.float64, mean_scale=5.0, std_range=(0.1, 10.0), axis=1):
    """Per-channel non-zero means and varied spreads: what real activations look like."""
    axis = axis % len(shape)
    channels = shape[axis]
    means = rng.uniform(-mean_scale, mean_scale, channels)
    stds = np.exp(rng.uniform(np.log(std_range[0]), np.log(std_range[1]), channels))
    bshape = [1] * len(shape)
    bshape[axis] = channels
    x = rng.standard_normal(shape) * stds.reshape(bshape) + means.reshape(bshape)
    return x.astype(dtype)


def assert_mean_close(actual, expected, values, rtol=1e-12):
    """Means (or running means) of ``values`` to ``rtol`` of the values' scale: a mean near 0
    carries the rounding of values near 5, not its own size (a 2.3e-4 channel mean of values up
    to ~5 was 1.5e-12 off relative, and a 8.7e-5 one 4e-12)."""
    scale = np.abs(np.asarray(values, dtype=np.float64)).max()
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def poison(shape, dtype):
    """An output buffer full of NaN, so that any element a kernel forgets to write shows."""
    return np.full(shape, np.nan, dtype)


# (shape, axis) layouts every behaviour is checked on: rows, planes, channels-last, rank 5,
# odd channel counts, and a plane longer than one PLANE_BLOCK segment.
LAYOUTS = [
    ((16, 5), 1),
    ((7, 3, 11), 1),
    ((4, 6, 5, 7), 1),
    ((3, 5, 4, 6), -1),
    ((2, 3, 4, 3, 5), 1),
    ((2, 4, 3, 5), 2),
    ((3, 1, 4500), 1),
    ((200, 1), 1),
]


# ------------------------------------------------------------------------ backends under test
@dataclass(frozen=True)
class Backend:
    """How a test runs on one backend: the inputs placed with ``on``, the call selecting it with
    ``call``, the results read back with ``host``::

        x_d, w_d = backend.on(x, weight)
        y, mean, invstd = nbn.forward_train(x_d, w_d, out=backend.poisoned(x.shape, x.dtype),
                                            **backend.call)
        y, mean = backend.host(y, mean)
    """

    name: str
    call: dict = field(default_factory=dict)  # keywords that select it: functions and BatchNorm
    device: bool = False  # inputs go to the CUDA device as Numba device arrays
    setup: str | None = None  # the fixture that makes it ready

    def on(self, *arrays):
        """The arrays as this backend takes them: device copies for "cuda", None kept; one array
        for one argument, a tuple for several (as ``np.atleast_1d``)."""
        if self.device:
            from numba import cuda

            arrays = tuple(None if a is None else cuda.to_device(a) for a in arrays)
        return arrays[0] if len(arrays) == 1 else arrays

    def host(self, *arrays):
        """The arrays as NumPy arrays (device results copied back), shaped as ``on``'s answer."""
        arrays = tuple(a.copy_to_host() if is_device_array(a) else a for a in arrays)
        return arrays[0] if len(arrays) == 1 else arrays

    def poisoned(self, shape, dtype):
        """An ``out=`` buffer full of NaN, where this backend writes (see ``poison``)."""
        return self.on(poison(shape, dtype))


BACKENDS = {
    "cpu": Backend("cpu", {"backend": "cpu"}),
    "c-plugin": Backend("c-plugin", {"backend": "c-plugin"}, setup="plugin_backend"),
    # explicit device="cuda": host arrays (non-contiguous, Fortran order) are copied over too
    "cuda": Backend("cuda", {"device": "cuda"}, device=True, setup="tiny_launches"),
}


def backends_under_test():
    """$NBN_TEST_BACKENDS (names separated by commas), else "cpu", "c-plugin", and "cuda" where
    numba.cuda runs (a GPU, or NUMBA_ENABLE_CUDASIM=1)."""
    chosen = os.environ.get("NBN_TEST_BACKENDS")
    if chosen is None:
        from numba import cuda

        return ["cpu", "c-plugin", *(["cuda"] if cuda.is_available() else [])]
    names = [name.strip() for name in chosen.split(",") if name.strip()]
    unknown = [name for name in names if name not in BACKENDS]
    if unknown or not names:
        raise ValueError(f"NBN_TEST_BACKENDS={chosen!r}: choose among {', '.join(BACKENDS)}")
    return names


@pytest.fixture(params=backends_under_test())
def backend(request):
    """The conformance suite's backend (a :class:`Backend`), one per backend under test."""
    chosen = BACKENDS[request.param]
    if chosen.device:
        from numba import cuda

        if not cuda.is_available():
            pytest.skip("cuda: numba.cuda.is_available() is False (no GPU, no simulator)")
    if chosen.setup:
        request.getfixturevalue(chosen.setup)
    return chosen


@pytest.fixture(scope="session")
def simulator_pace():
    """Under the CUDA simulator, a short GIL switch interval: the simulator runs a block's
    threads as Python threads and polls them holding the GIL, so they reach each syncthreads()
    sooner (5x faster)."""
    import numba

    interval = sys.getswitchinterval()
    if numba.config.ENABLE_CUDASIM:
        sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(interval)


@pytest.fixture
def tiny_launches(monkeypatch, simulator_pace):
    """8 threads per block, 2-channel row tiles, a block per 8 values: tiny inputs span blocks,
    tail tiles and the cross-block merge."""
    from numba_bn.cuda import config

    monkeypatch.setattr(config, "THREADS_PER_BLOCK", 8)
    monkeypatch.setattr(config, "ROW_TILE", 2)
    monkeypatch.setattr(config, "VALUES_PER_THREAD", 1)
    monkeypatch.setattr(config, "BLOCKS_PER_CHANNEL", 4)
    monkeypatch.setattr(config, "TARGET_BLOCKS", 64)
    monkeypatch.setattr(config, "ELEMENTWISE_VALUES_PER_THREAD", 4)


# ------------------------------------------------------- children started with the session
# A few fixtures wait minutes for a child process that keeps one core busy: the C builds
# (every kernel compiled again for each CPU) and the CUDA simulator suite. The tests of the
# main process leave the second core of a 2-core machine idle much of the time, so the session
# starts the children its selected tests need before the first test, at the lowest priority
# (EARLY_NICENESS: they take the time the tests leave, and the tests' parallel regions, whose
# threads wait for each other, keep their cores), and each fixture waits for its own. Each
# child has a Numba cache directory of its own: Numba's cache index is not safe for processes
# that compile different signatures of one function at the same time.
EARLY_TIMEOUT = 3600  # s, from the start of the session (a slow machine runs CI for 40 min)
EARLY_NICENESS = 19


def _simulator_suite():
    """The conformance suite on the "cuda" backend alone (the main process runs the others), the
    fused op's backend tests, the backend's own tests and group and instance norm on it."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "tests/test_conformance.py", "tests/gpu_suite.py", "tests/gpu_norms_suite.py",
               "tests/test_fused.py::test_fused_train_matches_torch_autograd",
               "tests/test_fused.py::test_fused_eval_matches_torch",
               "-k", "not on_a_gpu"]  # fmt: skip  # *_on_a_gpu: real CuPy/torch CUDA only
    return command, {"NUMBA_ENABLE_CUDASIM": "1", "NBN_TEST_BACKENDS": "cuda"}


#: fixture -> (command, environment) of its child; "{out}" is the fixture's folder.
EARLY_CHILDREN = {
    # the portable plugin (x86-64-v2/v3/v4 variants), built through the CLI
    "plugin_build": ([sys.executable, "-m", "numba_bn", "build-plugin", "--out", "{out}"], {}),
    # a --cpu host build, whose kernels are compiled exactly as the JIT's
    "host_build": (
        [sys.executable, "-m", "numba_bn", "build-plugin", "--out", "{out}", "--cpu", "host"],
        {},
    ),
    "simulator_suite": _simulator_suite(),
}


class EarlyChild:
    """A child of EARLY_CHILDREN, started now, its output in a log file next to its folder."""

    def __init__(self, fixture, folder):
        command, env = EARLY_CHILDREN[fixture]
        self.folder, self.log = folder, folder.parent / f"{folder.name}.log"
        cache = {"NUMBA_CACHE_DIR": str(folder.parent / f"{folder.name}-numba-cache")}
        with open(self.log, "w") as log:
            command = [str(part).format(out=folder) for part in command]
            self.process = start_child(command, {**env, **cache}, log, EARLY_NICENESS)
        self.started = time.monotonic()

    def result(self):
        """(return code, output) once it has finished."""
        timeout = max(1.0, EARLY_TIMEOUT - (time.monotonic() - self.started))
        code, _ = finish_child(self.process, timeout)
        return code, self.log.read_text()

    def stop(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _early_fixtures(item):
    """The fixtures of EARLY_CHILDREN that ``item`` needs: those of its fixture closure, and
    plugin_build for the "c-plugin" conformance backend (asked for at run time)."""
    needed = set(getattr(item, "fixturenames", ())) & set(EARLY_CHILDREN)
    params = getattr(getattr(item, "callspec", None), "params", {})
    if params.get("backend") == "c-plugin":
        needed.add("plugin_build")
    return needed


@pytest.fixture(scope="session", autouse=True)
def early_children(request, tmp_path_factory):
    """fixture -> EarlyChild, started before the first test for what the selected tests need;
    a fixture not foreseen starts its child when it is first asked for."""
    needed = set().union(*map(_early_fixtures, request.session.items))
    if "plugin_build" in needed or "host_build" in needed:
        if shutil.which(build.c_compiler()) is None:
            needed -= {"plugin_build", "host_build"}  # the fixtures skip
    children = {name: EarlyChild(name, tmp_path_factory.mktemp(name)) for name in sorted(needed)}
    yield children
    for child in children.values():
        child.stop()


def early_result(request, fixture):
    """(return code, output, folder) of ``fixture``'s early child, waiting for it."""
    children = request.getfixturevalue("early_children")
    if fixture not in children:
        children[fixture] = EarlyChild(
            fixture, request.getfixturevalue("tmp_path_factory").mktemp(fixture)
        )
    child = children[fixture]
    code, output = child.result()
    return code, output, child.folder


# ------------------------------------------------------------- the C plugin, once per session
def _require_c_compiler():
    compiler = build.c_compiler()
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler: {compiler!r} is not on PATH (set CC); the C plugin needs one")


def _c_build(request, fixture):
    _require_c_compiler()
    code, output, folder = early_result(request, fixture)
    assert code == 0, output[-4000:]
    return folder


@pytest.fixture(scope="session")
def plugin_build(request):
    """The portable plugin (x86-64-v2/v3/v4 variants), built through the CLI: its folder."""
    return _c_build(request, "plugin_build")


@pytest.fixture(scope="session")
def host_build(request):
    """A ``--cpu host`` build, whose kernels are compiled exactly as the JIT's: its folder."""
    return _c_build(request, "host_build")


@pytest.fixture(scope="session")
def simulator_suite(request):
    """(return code, output) of the CUDA simulator suite (_simulator_suite)."""
    code, output, _ = early_result(request, "simulator_suite")
    return code, output


@pytest.fixture(scope="session")
def plugin_backend(plugin_build):
    """The portable plugin registered as ``backend="c-plugin"``."""
    return nbn.register_backend("c-plugin", plugin_build / build.LIBRARY_NAME)
