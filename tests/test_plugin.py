"""The C plugin: libnumba_bn.so built from the kernels, checked from C and as a Python backend.

Its builds are session fixtures of tests/conftest.py, made once whichever files run: the portable
build (``numba-bn build-plugin``, with its x86-64-v2/v3/v4 variants), which the conformance suite
(tests/test_conformance.py) also runs as ``backend="c-plugin"``, and a ``--cpu host`` build, which
compiles the kernels exactly as the JIT does and must therefore give the CPU backend's bits. The
builds, the reference C backend and the C test host need a C compiler (``cc`` or $CC).
"""

import ctypes
import ctypes.util
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

import numpy as np
import pytest

import numba_bn as nbn
from numba_bn import functional, layer, norm_ops, ops
from numba_bn.capi import build, calls
from numba_bn.capi.ranges import EXPORTED
from numba_bn.cli import main
from numba_bn.cpu import CpuBackend, fronts

from conftest import LAYOUTS, poison, random_batch, run_child

CSRC = build.csrc_dir()
REPOSITORY = Path(__file__).resolve().parents[1]
ABI_SYMBOLS = {
    "nbn_version", "nbn_status_string", "nbn_set_num_threads", "nbn_get_num_threads", "nbn_isa",
    *(f"nbn_{op}{ex}_{t}" for op in ("forward_train", "forward_eval", "backward")
      for ex in ("", "_ex") for t in ("f32", "f64")),
    *(f"nbn_layer_{name}" for name in ("create", "destroy", "set_training", "state", "forward",
                                       "forward_ex", "backward", "backward_ex")),  # 1.2
    *(f"nbn_{norm}_norm_{step}_{t}" for norm in ("group", "layer")
      for step in ("forward", "backward") for t in ("f32", "f64")),  # 1.3
    *(f"nbn_{op}_stats_{t}" for op in ("forward_train", "backward") for t in ("f32", "f64")),  # 1.4
}  # fmt: skip
WARNINGS = ["-Wall", "-Wextra", "-Werror"]
# LeakSanitizer fails the run on a leak; the test host's malloc of 2^58 bytes must return NULL
ASAN_OPTIONS = "ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1"
SYSTEM_LIBRARIES = {"libc.so.6", "libm.so.6", "libpthread.so.0", "libgomp.so.1"}
TOL = {np.float32: 2e-5, np.float64: 1e-12}
# planes fused and split, a plane of two blocks, rows of two chunks and two tiles, channels-last
# ... and short planes (cpu.kernels.short_planes: coefficient rows spread to a column per value)
BIG_LAYOUTS = [((8, 16, 32, 32), 1), ((4, 2, 9000), 1), ((1100, 1040), 1), ((40, 6, 6, 5), -1),
               ((160, 40, 3, 3), 1)]  # fmt: skip
# canonical (outer, C, inner) views for the backends' own methods: planes fused and split, runs
# of planes, a plane of two blocks, rows of one and of several chunks and tiles, short planes
VIEWS = [(7, 3, 11), (4, 6, 35), (8, 16, 1024), (4, 2, 9000), (16, 5, 1), (1100, 1040, 1),
         (64, 6, 4)]  # fmt: skip
EPILOGUES = [(True, None), (False, "relu"), (True, "relu")]  # (residual?, activation)
NBN_ACTIVATION_RELU = 1  # nbn_activation of numba_bn.h


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def library(plugin_build):
    return plugin_build / build.LIBRARY_NAME


@pytest.fixture(scope="session")
def backends(plugin_backend, host_build, tmp_path_factory):
    """C backends registered for the session: the portable plugin, the host build, the reference."""
    reference = build.build_reference_backend(tmp_path_factory.mktemp("reference"))
    return {
        "c-plugin": plugin_backend,
        "c-host": nbn.register_backend("c-host", host_build / build.LIBRARY_NAME),
        "c-reference": nbn.register_backend("c-reference", reference),
    }


@pytest.fixture(scope="session")
def test_host(plugin_build, tmp_path_factory):
    """csrc/test_host.c linked against the portable build."""
    binary = tmp_path_factory.mktemp("host") / "test_host"
    build.run_compiler(
        ["-std=c11", "-O2", *WARNINGS, "-pthread", "-I", CSRC, CSRC / "test_host.c", "-L",
         plugin_build, "-lnumba_bn", f"-Wl,-rpath,{plugin_build}", "-lm", "-o", binary],
        "building the C test host",
    )  # fmt: skip
    return binary


def _has_address_sanitizer(tmp_path):
    """Whether the C compiler builds a program with -fsanitize=address that runs."""
    probe = tmp_path / "asan_probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    try:
        build.run_compiler(["-fsanitize=address", probe, "-o", tmp_path / "asan_probe"], "probe")
        subprocess.run([str(tmp_path / "asan_probe")], check=True, timeout=60)
    except (RuntimeError, subprocess.CalledProcessError):
        return False
    return True


def _run_with_asan(binary, *arguments):
    return subprocess.run(["env", "-i", ASAN_OPTIONS, str(binary), *arguments],
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def _tool(*command):
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


# --------------------------------------------------------------------------- the library itself
def test_build_writes_the_library_and_the_header(plugin_build, host_build):
    for directory in (plugin_build, host_build):
        assert (directory / build.LIBRARY_NAME).stat().st_size > 0
        # the compiled calls take the library's entry points by path, at run time (calls.py)
        extension = _tool("readelf", "-d", directory / calls.extension_name())
        assert build.LIBRARY_NAME not in extension
        header = (directory / build.HEADER_NAME).read_text()
        assert header == (CSRC / "numba_bn.h").read_text()


def test_library_needs_only_the_c_runtime(library):
    """No Python, no Numba runtime: libc/libm/libpthread/libgomp symbols only."""
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", _tool("readelf", "-d", library))
    assert needed and set(needed) <= SYSTEM_LIBRARIES
    for line in _tool("nm", "-D", "--undefined-only", library).splitlines():
        kind, symbol = line.split()[-2:]
        assert not re.search(r"Py|NRT|numba", symbol), line
        if kind == "U":  # weak ones (w) are the toolchain's optional hooks
            assert re.search(r"@(GLIBC|GOMP|OMP)_", symbol), line


def test_library_exports_exactly_the_abi(library):
    exported = {
        line.split()[-1] for line in _tool("nm", "-D", "--defined-only", library).splitlines()
    }
    assert exported == ABI_SYMBOLS


@pytest.mark.parametrize("isa", [None, *build.X86_64_LEVELS])
def test_c_host_passes_with_an_empty_environment(test_host, isa):
    """All twelve functions (the plain ones and the fused _ex ones) against the double
    reference, status codes, 1 vs 2 threads, the layer handle (1.2), and the worker threads
    (thread counts changing between calls, calls from four threads at once), from C."""
    environment = [f"NBN_ISA={isa}"] if isa else []
    done = subprocess.run(
        ["env", "-i", *environment, str(test_host)], capture_output=True, text=True, timeout=300
    )
    summary = (done.stdout.strip().splitlines() or [""])[-1]
    assert summary.startswith("isa "), (
        f"the C test host stopped before its summary (exit status {done.returncode}):\n"
        f"{done.stdout}{done.stderr}"
    )
    if isa and not summary.startswith(f"isa {isa}:"):
        pytest.skip(f"this CPU cannot run the {isa} variant ({summary})")
    assert done.returncode == 0, done.stdout + done.stderr
    assert summary.endswith(", 0 failed")


# A fresh process that loads the library with ctypes (no NumPy, no Numba: their threads would
# blur the count) and counts its own threads as the pool starts, resizes, forks and unloads.
POOL_LIFETIME = r"""
import ctypes, os, sys, time, _ctypes
path = sys.argv[1]
f32p, i64, f64 = ctypes.POINTER(ctypes.c_float), ctypes.c_int64, ctypes.c_double

def threads():
    return len(os.listdir("/proc/self/task"))

def settles(expected):
    # the thread count once joined workers have left /proc: pthread_join returns when the
    # kernel clears the thread's tid, a moment before its task entry goes (seen in CI)
    for _ in range(400):
        if threads() == expected:
            break
        time.sleep(0.005)
    return threads()

def load():
    lib = ctypes.CDLL(path)
    lib.nbn_forward_train_f32.argtypes = [f32p, i64, i64, i64, f32p, f32p, f64, f32p, f32p, f32p,
                                          f32p, f32p, f64]
    return lib

o, c, i = 16, 8, 6200  # 794K elements: worth 3 threads to the cost model
x = (ctypes.c_float * (o * c * i))(*range(o * c * i))
y = (ctypes.c_float * (o * c * i))()
mean, invstd = (ctypes.c_float * c)(), (ctypes.c_float * c)()

def train(lib):
    assert lib.nbn_forward_train_f32(x, o, c, i, None, None, 1e-5, y, mean, invstd, None, None,
                                     0.1) == 0
    assert mean[0] == c * i * (o - 1) / 2 + (i - 1) / 2, mean[0]  # x[n, 0, :] is n*c*i + k

lib = load()
alone = threads()
lib.nbn_set_num_threads(3)
assert threads() == alone, "no worker before a call needs one"
train(lib)
assert threads() == alone + 2, threads()
train(lib)
assert threads() == alone + 2, "the workers are reused"
lib.nbn_set_num_threads(2)
assert settles(alone + 1) == alone + 1, threads()
lib.nbn_set_num_threads(1)
assert settles(alone) == alone, threads()
train(lib)
assert threads() == alone
lib.nbn_set_num_threads(2)
train(lib)
assert threads() == alone + 1
child = os.fork()
if child == 0:  # one thread; the pool starts its own worker again
    ok = threads() == 1
    train(lib)
    os._exit(0 if ok and threads() == 2 else 1)
assert os.waitpid(child, 0)[1] == 0, "the fork's child"
_ctypes.dlclose(lib._handle)
del lib
assert settles(alone) == alone, "dlclose joins the workers"
assert path not in open("/proc/self/maps").read(), "the library is unloaded"
lib = load()
lib.nbn_set_num_threads(2)
train(lib)
assert threads() == alone + 1
print("ok")  # and exit with the worker parked: the destructor joins it
"""


def test_the_pool_starts_resizes_forks_and_unloads_cleanly(library):
    done = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", POOL_LIFETIME, str(library)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


# A fresh process (ctypes only, as above) with 2 threads asked for: after each forward_train,
# how many workers the pool has started.
THREADS_BY_SIZE = r"""
import ctypes, os, sys
lib = ctypes.CDLL(sys.argv[1])
f32p, i64, f64 = ctypes.POINTER(ctypes.c_float), ctypes.c_int64, ctypes.c_double
lib.nbn_forward_train_f32.argtypes = [f32p, i64, i64, i64, f32p, f32p, f64, f32p, f32p, f32p,
                                      f32p, f32p, f64]
lib.nbn_set_num_threads(2)
alone = len(os.listdir("/proc/self/task"))
for shape in sys.argv[2:]:
    o, c, i = map(int, shape.split(","))
    x = (ctypes.c_float * (o * c * i))(*(k % 7 for k in range(o * c * i)))
    y = (ctypes.c_float * (o * c * i))()
    mean, invstd = (ctypes.c_float * c)(), (ctypes.c_float * c)()
    assert lib.nbn_forward_train_f32(x, o, c, i, None, None, 1e-5, y, mean, invstd, None, None,
                                     0.1) == 0
    print(len(os.listdir("/proc/self/task")) - alone)
"""


def test_the_library_takes_threads_as_the_cost_model_does(library):
    """The shim runs a call on the threads the CPU backend's cost model gives it (its constants
    come from numba_bn.cpu through the generated header): with 2 threads, 16K elements stay on the
    calling thread and 128K (two claims of 64K elements) start a worker. Before, the shim had a
    bound of its own, 2^18 elements per extra thread, and ran the 128K serially."""
    from numba_bn.cpu import NS_PER_ELEMENT, WAKE_NS

    shapes = [(2, 8, 1024), (2, 8, 8192)]
    saved = [NS_PER_ELEMENT["forward_train"] * o * c * i * (1 - 1 / 2) for o, c, i in shapes]
    assert saved[0] <= WAKE_NS < saved[1], "the shapes no longer straddle the model's bound"
    done = subprocess.run(
        [sys.executable, "-c", THREADS_BY_SIZE, str(library),
         *(",".join(map(str, shape)) for shape in shapes)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split() == ["0", "1"], done.stdout


def _test_host_with_asan(plugin_build, tmp_path):
    """csrc/test_host.c built with -fsanitize=address (skips where the compiler has none)."""
    if not _has_address_sanitizer(tmp_path):
        pytest.skip("the C compiler has no -fsanitize=address (or its programs do not run here)")
    binary = tmp_path / "test_host_asan"
    build.run_compiler(
        ["-std=c11", "-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer", *WARNINGS,
         "-pthread", "-I", CSRC, CSRC / "test_host.c", "-L", plugin_build, "-lnumba_bn",
         f"-Wl,-rpath,{plugin_build}", "-lm", "-o", binary],
        "building the C test host with AddressSanitizer",
    )  # fmt: skip
    return binary


def test_the_layer_handle_leaks_nothing_under_address_sanitizer(plugin_build, tmp_path):
    """The test host's layer checks (create/destroy of every flag combination, training steps,
    failed calls, a malloc that fails) built with -fsanitize=address: LeakSanitizer and ASan
    fail the run on a leak or a bad access, in the library's code too (its malloc and free are
    intercepted)."""
    done = _run_with_asan(_test_host_with_asan(plugin_build, tmp_path), "layer")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert summary.startswith("isa ") and summary.endswith(", 0 failed"), summary
    assert int(summary.split(": ")[1].split()[0]) > 300, summary  # the layer checks ran


def test_group_and_layer_norm_leak_nothing_under_address_sanitizer(plugin_build, tmp_path):
    """The test host's group and layer norm checks (1.3: every shape, both types, 1 and 2
    threads, in place, the failed calls) under ASan and LeakSanitizer: the shim's scratch (tiled
    weights, coefficients, row-chunk partials) is freed and never overrun."""
    done = _run_with_asan(_test_host_with_asan(plugin_build, tmp_path), "norms")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert summary.startswith("isa ") and summary.endswith(", 0 failed"), summary
    assert int(summary.split(": ")[1].split()[0]) > 300, summary  # the norm checks ran


def _docs_example(tmp_path):
    docs = (REPOSITORY / "docs" / "c-abi.md").read_text()
    source = tmp_path / "example.c"
    source.write_text(re.search(r"```c\n(.*?)```", docs, re.DOTALL).group(1))
    return source


def _check_example_runs(binary):
    done = subprocess.run(["env", "-i", str(binary)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("channel ") == 4
    assert "eps = -1: NBN_ERR_VALUE" in done.stdout


def test_the_c_example_of_the_docs_runs(plugin_build, tmp_path):
    source = _docs_example(tmp_path)
    build.run_compiler(
        ["-std=c11", "-O2", "-Wall", "-Werror", "-I", plugin_build, source, "-L", plugin_build,
         "-lnumba_bn", f"-Wl,-rpath,{plugin_build}", "-o", tmp_path / "example"],
        "building the example of docs/c-abi.md",
    )  # fmt: skip
    _check_example_runs(tmp_path / "example")


def test_the_layer_example_of_the_docs_runs_and_frees_everything(plugin_build, tmp_path):
    """docs/c-abi.md's layer handle example: five training steps, eval, NBN_ERR_STATE for a
    backward after eval; built with -fsanitize=address where the compiler has it (a leak
    then fails the run)."""
    docs = (REPOSITORY / "docs" / "c-abi.md").read_text()
    blocks = re.findall(r"```c\n(.*?)```", docs, re.DOTALL)
    source = tmp_path / "layer_example.c"
    source.write_text(next(block for block in blocks if "nbn_layer_create(&" in block))
    sanitize = ["-fsanitize=address"] if _has_address_sanitizer(tmp_path) else []
    build.run_compiler(
        ["-std=c11", "-O2", *WARNINGS, *sanitize, "-I", plugin_build, source, "-L",
         plugin_build, "-lnumba_bn", f"-Wl,-rpath,{plugin_build}", "-o", tmp_path / "example"],
        "building the layer example of docs/c-abi.md",
    )  # fmt: skip
    done = _run_with_asan(tmp_path / "example")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "eval after 5 batches: NBN_OK" in done.stdout
    assert done.stdout.count("channel ") == 3
    assert "backward after eval: NBN_ERR_STATE" in done.stdout


def test_the_norms_example_of_the_docs_runs_and_frees_everything(plugin_build, tmp_path):
    """docs/c-abi.md's group, instance and layer norm example (1.3): forward and backward, the
    statistics of each group, NBN_ERR_VALUE for groups that do not divide the channels; under
    AddressSanitizer where the compiler has it."""
    docs = (REPOSITORY / "docs" / "c-abi.md").read_text()
    blocks = re.findall(r"```c\n(.*?)```", docs, re.DOTALL)
    source = tmp_path / "norms_example.c"
    source.write_text(next(block for block in blocks if "int main" in block and "group" in block))
    sanitize = ["-fsanitize=address"] if _has_address_sanitizer(tmp_path) else []
    build.run_compiler(
        ["-std=c11", "-O2", *WARNINGS, *sanitize, "-I", plugin_build, source, "-L",
         plugin_build, "-lnumba_bn", f"-Wl,-rpath,{plugin_build}", "-o", tmp_path / "example"],
        "building the norms example of docs/c-abi.md",
    )  # fmt: skip
    done = _run_with_asan(tmp_path / "example")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert sum(line.startswith("sample ") for line in lines) == 6  # N * G groups
    assert "instance norm: NBN_OK" in done.stdout
    assert "layer norm: NBN_OK" in done.stdout
    assert "num_groups = 4 with 6 channels: NBN_ERR_VALUE" in done.stdout


@pytest.mark.skipif(shutil.which("pkg-config") is None, reason="no pkg-config")
def test_the_docs_example_builds_with_pkg_config(plugin_build, tmp_path):
    environment = dict(os.environ, PKG_CONFIG_PATH=str(plugin_build))
    flags = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "numba_bn"], env=environment, capture_output=True,
        text=True, timeout=60, check=True,
    ).stdout.split()  # fmt: skip
    version = subprocess.run(["pkg-config", "--modversion", "numba_bn"], env=environment,
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert version == ".".join(map(str, build.abi_version()))
    source = _docs_example(tmp_path)
    build.run_compiler(["-std=c11", "-O2", source, *flags, "-o", tmp_path / "example"],
                       "building the docs example with pkg-config")  # fmt: skip
    _check_example_runs(tmp_path / "example")


@pytest.mark.skipif(shutil.which("cmake") is None, reason="no cmake")
def test_the_docs_example_builds_with_cmake_find_package(plugin_build, tmp_path):
    source = _docs_example(tmp_path)
    major, minor, _ = build.abi_version()
    (tmp_path / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.16)\n"
        "project(example C)\n"
        f"find_package(numba_bn {major}.{minor} REQUIRED)\n"
        f"add_executable(example {source.name})\n"
        "target_link_libraries(example PRIVATE numba_bn::numba_bn)\n"
    )
    for command in (
        ["cmake", "-S", tmp_path, "-B", tmp_path / "build", f"-DCMAKE_PREFIX_PATH={plugin_build}"],
        ["cmake", "--build", tmp_path / "build"],
    ):
        done = subprocess.run([str(c) for c in command], capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
    _check_example_runs(tmp_path / "build" / "example")
    (tmp_path / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.16)\nproject(too_new C)\n"
        f"find_package(numba_bn {major + 1}.0 REQUIRED)\n"
    )
    done = subprocess.run(
        ["cmake", "-S", str(tmp_path), "-B", str(tmp_path / "build2"),
         f"-DCMAKE_PREFIX_PATH={plugin_build}"], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0 and "numba_bn" in done.stdout + done.stderr


# ------------------------------------------------------------------------ as a Python backend
def _train_eval_backward(data, shape, axis, dtype, backend, affine=True):
    """forward_train, forward_eval and backward of a batch drawn from ``data``, on ``backend``."""
    x = random_batch(data, shape, dtype, axis=axis)
    dy = random_batch(data, shape, dtype, mean_scale=1.0, axis=axis)
    channels = shape[axis]
    weight = data.uniform(0.5, 2.0, channels).astype(dtype) if affine else None
    bias = data.standard_normal(channels).astype(dtype) if affine else None
    y, mean, invstd = nbn.forward_train(
        x, weight, bias, axis=axis, out=poison(shape, dtype), backend=backend
    )
    running_var = (1.0 / invstd.astype(np.float64) ** 2).astype(dtype)
    y_eval = nbn.forward_eval(x, mean, running_var, weight, bias, axis=axis, backend=backend)
    dx, dweight, dbias = nbn.backward(
        dy, x, mean, invstd, weight, axis=axis, out=poison(shape, dtype), backend=backend
    )
    return {"y": y, "mean": mean, "invstd": invstd, "y_eval": y_eval, "dx": dx,
            "dweight": dweight, "dbias": dbias}  # fmt: skip


def _same_seed(rng):
    """An rng whose copies give the same draws, so two backends see the same batch."""
    seed = int(rng.integers(2**32))
    return lambda: np.random.default_rng(seed)


@pytest.mark.parametrize("backend", ["c-plugin", "c-reference"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", LAYOUTS + BIG_LAYOUTS)
def test_c_backends_agree_with_the_cpu_backend(backends, rng, shape, axis, dtype, backend):
    fresh = _same_seed(rng)
    ours = _train_eval_backward(fresh(), shape, axis, dtype, backend, affine=shape[0] % 2 == 0)
    cpu = _train_eval_backward(fresh(), shape, axis, dtype, "cpu", affine=shape[0] % 2 == 0)
    count = np.prod(shape) // shape[axis]  # values per channel: the reductions' scale
    for name, expected in cpu.items():
        assert ours[name].dtype == expected.dtype and ours[name].shape == expected.shape, name
        scale = max(1.0, float(np.max(np.abs(expected.astype(np.float64)))))
        scale = count if name in ("dweight", "dbias") else scale
        np.testing.assert_allclose(
            ours[name], expected, rtol=TOL[dtype], atol=TOL[dtype] * scale, err_msg=name
        )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", LAYOUTS[:3] + BIG_LAYOUTS)
def test_host_build_gives_the_bits_of_the_jit(backends, rng, shape, axis, dtype):
    """Same kernels, same compiler pipeline, same work items: the same bits, float64 included.

    float64 had 1e-12 relative until stop 27: the JIT's float64 plane drivers gave other last
    bits when compiled in the process than when loaded from Numba's cache, and the host build
    matched the cached ones (benchmarks/README.md, "Compiled calls"; stats.strict_copy). The
    JIT's determinism across processes, threads and twins is pinned in test_numerics."""
    fresh = _same_seed(rng)
    ours = _train_eval_backward(fresh(), shape, axis, dtype, "c-host")
    cpu = _train_eval_backward(fresh(), shape, axis, dtype, "cpu")
    for name, expected in cpu.items():
        np.testing.assert_array_equal(ours[name], expected, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_running_update_in_c_gives_the_bits_of_the_jit(backends, rng, dtype):
    """nbn_forward_train_* updates running buffers itself (PyTorch's rule), as the JIT does."""
    x = random_batch(rng, (6, 5, 7, 3), dtype)
    run_mean, run_var = rng.standard_normal(5).astype(dtype), rng.uniform(0.5, 2, 5).astype(dtype)
    cpu_mean, cpu_var = run_mean.copy(), run_var.copy()
    nbn.batch_norm(x, cpu_mean, cpu_var, training=True, momentum=0.3)
    suffix = "f32" if dtype == np.float32 else "f64"
    function = getattr(backends["c-host"].library, f"nbn_forward_train_{suffix}")
    y, mean, invstd = np.empty_like(x), np.empty(5, dtype), np.empty(5, dtype)
    pointers = [a.ctypes.data for a in (x, y, mean, invstd, run_mean, run_var)]
    status = function(pointers[0], 6, 5, 21, None, None, 1e-5, *pointers[1:], 0.3)
    assert status == 0
    np.testing.assert_array_equal(run_mean, cpu_mean)
    np.testing.assert_array_equal(run_var, cpu_var)


@pytest.mark.parametrize("backend", ["c-plugin", "c-reference"])
@pytest.mark.parametrize("convention", ["torch", "keras"])
def test_batchnorm_layer_on_a_c_backend(backends, rng, backend, convention):
    """Two training steps, backward, eval forward and eval-mode backward, as on the CPU.

    BatchNorm keeps the batch mean in float64 for its backward; through the ABI it travels in
    float32, as in PyTorch, so the training backward gets a looser tolerance.
    """
    layers = {
        name: nbn.BatchNorm(6, convention=convention, backend=name) for name in (backend, "cpu")
    }
    axis = -1 if convention == "keras" else 1
    shape = (5, 4, 3, 6) if convention == "keras" else (5, 6, 4, 3)
    batches = [random_batch(rng, shape, np.float32, axis=axis) for _ in range(2)]
    dy = random_batch(rng, shape, np.float32, mean_scale=1.0)
    results = {}
    for name, bn in layers.items():
        bn.weight[:] = np.linspace(0.5, 1.5, 6)
        results[name] = {"y1": bn(batches[0]), "y2": bn(batches[1])}
        results[name].update(dx=bn.backward(dy), dweight=bn.grad_weight, dbias=bn.grad_bias)
        bn.eval()
        results[name].update(y_eval=bn(batches[0]), dx_eval=bn.backward(dy))
        results[name].update(running_mean=bn.running_mean, running_var=bn.running_var)
    for name, expected in results["cpu"].items():
        tol = 1e-4 if name in ("dx", "dweight") else 2e-5
        scale = max(1.0, float(np.max(np.abs(expected))))
        np.testing.assert_allclose(
            results[backend][name], expected, rtol=tol, atol=tol * scale, err_msg=name
        )
    assert layers[backend].num_batches_tracked == 2


def test_float16_runs_in_float32_on_a_c_backend(backends, rng):
    x = random_batch(rng, (4, 3, 5, 5), np.float16, mean_scale=2.0, std_range=(0.5, 2.0))
    y, mean, invstd = nbn.forward_train(x, backend="c-host")
    y_cpu, mean_cpu, invstd_cpu = nbn.forward_train(x)
    assert y.dtype == np.float16 and mean.dtype == np.float32
    for ours, expected in ((y, y_cpu), (mean, mean_cpu), (invstd, invstd_cpu)):
        np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("backend", ["c-plugin", "c-reference"])
@pytest.mark.parametrize("into", ["x", "a poisoned buffer"])
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_nan_policy_raise_leaves_every_buffer_as_it_was(backends, rng, shape, axis, into, backend):
    """x, out (x itself, or a buffer of its own) and the running buffers keep their bits: the
    library writes y into scratch, copied into out only once the statistics are finite."""
    x = random_batch(rng, shape, np.float32, axis=axis)
    x.flat[x.size // 2] = np.nan
    # a NaN whose payload no arithmetic makes: a y of NaN (one channel) written over it shows
    out = x if into == "x" else np.full(shape, 0x7FA5A5A5, np.uint32).view(np.float32)
    channels = shape[axis]
    running_mean, running_var = np.zeros(channels, np.float32), np.ones(channels, np.float32)
    buffers = {"x": x, "out": out, "running_mean": running_mean, "running_var": running_var}
    before = {name: buffer.tobytes() for name, buffer in buffers.items()}
    with pytest.raises(ValueError, match="NaN"):
        nbn.batch_norm(x, running_mean, running_var, training=True, axis=axis, out=out,
                       nan_policy="raise", backend=backend)  # fmt: skip
    for name, buffer in buffers.items():
        assert buffer.tobytes() == before[name], name


def test_calls_from_several_threads_at_once(backends, rng):
    """ctypes releases the GIL, so these run in the library at the same time."""
    batches = [random_batch(rng, (64, 8, 1100), np.float32) for _ in range(4)]
    expected = [nbn.forward_train(x, backend="c-plugin") for x in batches]
    results = [None] * len(batches)

    def work(i):
        for _ in range(3):
            results[i] = nbn.forward_train(batches[i], backend="c-plugin")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for ours, reference in zip(results, expected, strict=True):
        for a, b in zip(ours, reference, strict=True):
            np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------- fused residual add and ReLU
def _fused_forward(backend, x, z, activation, w, b, rm, rv):
    """forward_train and forward_eval of a backend object with a residual and an activation."""
    channels = x.shape[1]
    y, y_eval = poison(x.shape, x.dtype), poison(x.shape, x.dtype)
    mean, invstd, m2 = (np.empty(channels) for _ in range(3))
    backend.forward_train(x, weight=w, bias=b, eps=1e-5, y=y, mean=mean, invstd=invstd, m2=m2,
                          residual=z, activation=activation)  # fmt: skip
    backend.forward_eval(x, weight=w, bias=b, running_mean=rm, running_var=rv, eps=1e-5,
                         y=y_eval, residual=z, activation=activation)  # fmt: skip
    return {"y": y, "mean": mean, "invstd": invstd, "y_eval": y_eval}


def _fused_case(rng, view, dtype):
    x = random_batch(rng, view, dtype)
    z = rng.standard_normal(view).astype(dtype)
    channels = view[1]
    w, b = (
        rng.uniform(0.5, 1.5, channels).astype(dtype),
        rng.standard_normal(channels).astype(dtype),
    )
    rm, rv = (
        rng.standard_normal(channels).astype(dtype),
        rng.uniform(0.5, 2, channels).astype(dtype),
    )
    return x, z, w, b, rm, rv


@pytest.mark.parametrize("backend", ["c-plugin", "c-reference"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("residual, activation", EPILOGUES)
@pytest.mark.parametrize("view", VIEWS)
def test_fused_forward_on_c_backends_agrees_with_the_cpu_backend(
    backends, rng, view, residual, activation, dtype, backend
):
    """y = activation(BN(x) + z) through nbn_forward_{train,eval}_ex_*, train and eval."""
    x, z, w, b, rm, rv = _fused_case(rng, view, dtype)
    z = z if residual else None
    ours = _fused_forward(backends[backend], x, z, activation, w, b, rm, rv)
    cpu = _fused_forward(nbn.dispatch.get("cpu"), x, z, activation, w, b, rm, rv)
    for name, expected in cpu.items():
        scale = max(1.0, float(np.max(np.abs(expected))))
        np.testing.assert_allclose(ours[name], expected, rtol=TOL[dtype], atol=TOL[dtype] * scale,
                                   err_msg=name)  # fmt: skip
    if activation == "relu":
        assert (ours["y"] >= 0).all() and (ours["y"] == 0).any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("residual, activation", EPILOGUES)
@pytest.mark.parametrize("view", VIEWS)
def test_fused_forward_of_the_host_build_gives_the_bits_of_the_jit(
    backends, rng, view, residual, activation, dtype
):
    """The epilogue is the JIT's own code, specialised per code as the JIT does: y and y_eval
    are the CPU backend's bits (the statistics travel in the tensor's dtype: compared in it)."""
    x, z, w, b, rm, rv = _fused_case(rng, view, dtype)
    z = z if residual else None
    ours = _fused_forward(backends["c-host"], x, z, activation, w, b, rm, rv)
    cpu = _fused_forward(nbn.dispatch.get("cpu"), x, z, activation, w, b, rm, rv)
    for name in ("y", "y_eval"):
        np.testing.assert_array_equal(ours[name], cpu[name], err_msg=name)
    for name in ("mean", "invstd"):
        np.testing.assert_array_equal(ours[name], cpu[name].astype(dtype), err_msg=name)


def _backward_ex(library, dtype, dy, x, w, mean, invstd, y, activation, residual_out):
    """nbn_backward_ex_* called directly: (status, dx, dweight, dbias)."""
    suffix = "f32" if dtype == np.float32 else "f64"
    outer, channels, inner = x.shape
    dx = poison(x.shape, dtype)
    dweight, dbias = poison(channels, dtype), poison(channels, dtype)
    status = getattr(library, f"nbn_backward_ex_{suffix}")(
        *(ctypes.c_void_p(a.ctypes.data) for a in (dy, x)), ctypes.c_int64(outer),
        ctypes.c_int64(channels), ctypes.c_int64(inner),
        *(ctypes.c_void_p(a.ctypes.data) for a in (w, mean, invstd, dx, dweight, dbias)),
        None if y is None else ctypes.c_void_p(y.ctypes.data), ctypes.c_int(activation),
        None if residual_out is None else ctypes.c_void_p(residual_out.ctypes.data),
    )  # fmt: skip
    return status, dx, dweight, dbias


@pytest.mark.parametrize("backend", ["c-plugin", "c-host", "c-reference"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("view", VIEWS)
def test_backward_ex_is_the_backward_of_the_gradient_through_the_relu(
    backends, rng, view, dtype, backend
):
    """nbn_backward_ex_* (relu) = activation_grad, then the plain backward, on the CPU backend:
    residual_out is dy masked by y > 0 exactly; dx, dweight, dbias as the plain backward of it,
    also without residual_out (g then lives in the library's scratch)."""
    x, z, w, b, rm, rv = _fused_case(rng, view, dtype)
    dy = rng.standard_normal(view).astype(dtype)
    cpu = nbn.dispatch.get("cpu")
    forward = _fused_forward(cpu, x, z, "relu", w, b, rm, rv)
    y, channels = forward["y"], view[1]
    mean, invstd = forward["mean"].astype(dtype), forward["invstd"].astype(dtype)
    g = np.empty_like(dy)
    cpu.activation_grad(dy, y, activation="relu", grad=g)
    dx, sum_dy, sum_dy_xmu = np.empty_like(x), np.empty(channels), np.empty(channels)
    cpu.backward(g, x, mean=mean.astype(np.float64), invstd=invstd.astype(np.float64), weight=w,
                 dx=dx, sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu)  # fmt: skip
    expected = {"dx": dx, "dweight": sum_dy_xmu * invstd, "dbias": sum_dy}
    library = backends[backend].library
    residual_out = poison(view, dtype)
    with_out = _backward_ex(library, dtype, dy, x, w, mean, invstd, y, NBN_ACTIVATION_RELU,
                            residual_out)  # fmt: skip
    np.testing.assert_array_equal(residual_out, g)
    without = _backward_ex(library, dtype, dy, x, w, mean, invstd, y, NBN_ACTIVATION_RELU, None)
    assert with_out[0] == without[0] == 0
    count = view[0] * view[2]
    for name, ours, again in zip(expected, with_out[1:], without[1:], strict=True):
        np.testing.assert_array_equal(ours, again, err_msg=name)
        scale = count if name != "dx" else max(1.0, float(np.max(np.abs(expected[name]))))
        np.testing.assert_allclose(ours, expected[name], rtol=TOL[dtype],
                                   atol=TOL[dtype] * scale, err_msg=name)  # fmt: skip


@pytest.mark.parametrize("backend", ["c-plugin", "c-reference"])
def test_activation_grad_of_a_c_backend_gives_the_bits_of_the_cpu_backend(backends, backend):
    """dy where y > 0, else +0.0: NaN in y or in dy where y <= 0 gives 0; in place too."""
    y = np.array([[1.0, -1.0, 0.0, -0.0, np.nan, 2.0, -3.0, 0.5]], np.float32)
    dy = np.array([[0.5, 0.25, -1.0, 2.0, 3.0, np.nan, np.nan, -0.0]], np.float32)
    expected = np.empty_like(dy)
    nbn.dispatch.get("cpu").activation_grad(dy, y, activation="relu", grad=expected)
    np.testing.assert_array_equal(expected, [[0.5, 0, 0, 0, 0, np.nan, 0, -0.0]])
    ours = poison(dy.shape, dy.dtype)
    backends[backend].activation_grad(dy, y, activation="relu", grad=ours)
    assert ours.tobytes() == expected.tobytes()
    backends[backend].activation_grad(dy, y, activation="relu", grad=dy)
    assert dy.tobytes() == expected.tobytes()


NBN_ERR_ALIAS = 5  # nbn_status of numba_bn.h (1.1)


@pytest.mark.parametrize("backend", ["c-plugin", "c-reference"])
def test_backward_ex_refuses_a_residual_out_that_overlaps_its_inputs(backends, rng, backend):
    """NBN_ERR_ALIAS for residual_out on x, dy, y or dx, or sharing one element with dx;
    NBN_ERR_VALUE for an unknown activation; nothing written."""
    view, size = (4, 3, 5), 60
    dy, x, y = rng.standard_normal(view), rng.standard_normal(view), rng.standard_normal(view)
    w, mean, invstd, sums = np.ones(3), np.zeros(3), np.ones(3), np.full(6, -7.25)
    buffer = np.full(3 * size, -7.25)  # dx first, then room for residual_out
    backward_ex = backends[backend].library.nbn_backward_ex_f64
    address = {name: a.ctypes.data for name, a in dict(dy=dy, x=x, y=y, dx=buffer).items()}

    def call(residual_out, activation=NBN_ACTIVATION_RELU):
        return backward_ex(
            address["dy"], address["x"], 4, 3, 5, w.ctypes.data, mean.ctypes.data,
            invstd.ctypes.data, address["dx"], sums.ctypes.data, sums.ctypes.data + 24,
            address["y"], activation, residual_out,
        )  # fmt: skip

    for name, residual_out in [*address.items(), ("dx + 1 element", address["dx"] + 8),
                               ("dx's last element", address["dx"] + 8 * (size - 1))]:  # fmt: skip
        assert call(residual_out) == NBN_ERR_ALIAS, name
    assert call(address["dx"] + 8 * size, activation=2) == NBN_ERR_VALUE, "activation 2"
    np.testing.assert_array_equal(buffer, -7.25)
    np.testing.assert_array_equal(sums, -7.25)
    assert call(address["dx"] + 8 * size) == 0, "residual_out right after dx"
    np.testing.assert_array_equal(buffer[size : 2 * size], np.where(y > 0, dy, 0).ravel())


def test_a_library_without_the_ex_entry_points_serves_plain_calls_only(backends, tmp_path, rng):
    """A backend of ABI 1.0 (here the reference backend with only the 1.0 symbols exported)
    still registers and runs plain calls; residual= or activation= is a NotImplementedError
    that names the backend and the entry points it lacks."""
    plain = [f"nbn_{op}_{t}" for op in ("forward_train", "forward_eval", "backward")
             for t in ("f32", "f64")]  # fmt: skip
    exported = ["nbn_version", "nbn_status_string", "nbn_set_num_threads", "nbn_get_num_threads",
                "nbn_isa", *plain]  # fmt: skip
    script = tmp_path / "abi-1.0.map"
    script.write_text("{ global: " + "; ".join(exported) + "; local: *; };\n")
    library = tmp_path / "libnbn_abi10.so"
    build.run_compiler(
        ["-std=c11", "-O2", "-fPIC", "-shared", "-I", CSRC, CSRC / "reference_backend.c",
         f"-Wl,--version-script={script}", "-o", library, "-lm"],
        "building a reference backend with the 1.0 symbols only",
    )  # fmt: skip
    backend = nbn.register_backend("c-abi10", library)
    assert not backend.fused
    x, z, w, b, rm, rv = _fused_case(rng, (4, 3, 5), np.float32)
    ours = _fused_forward(backend, x, None, None, w, b, rm, rv)
    expected = _fused_forward(backends["c-reference"], x, None, None, w, b, rm, rv)
    for name in expected:
        np.testing.assert_array_equal(ours[name], expected[name], err_msg=name)
    for residual, activation in EPILOGUES:
        with pytest.raises(NotImplementedError, match="'c-abi10'.*nbn_forward_train_ex"):
            _fused_forward(backend, x, z if residual else None, activation, w, b, rm, rv)
    with pytest.raises(NotImplementedError, match="'c-abi10'"):
        backend.forward_eval(x, weight=w, bias=b, running_mean=rm, running_var=rv, eps=1e-5,
                             y=np.empty_like(x), residual=z)  # fmt: skip


# ------------------------------------------------------------- group and layer norm (1.3)
# group norm (shape, num_groups): one group, two, one per channel (instance norm), odd sizes, one
# value per group, and groups of a work item each, large enough for two threads
GROUP_CASES = [
    ((2, 6, 5, 7), 1),
    ((3, 6, 11), 2),
    ((4, 6, 9), 6),
    ((5, 3, 7, 3), 3),
    ((1, 4, 1), 4),
    ((7, 9, 5), 3),
    ((16, 8, 6200), 2),
    ((2, 12, 64, 65), 12),
]
# layer norm (shape, normalised trailing dims): many rows per work item, one, several row chunks
LAYER_CASES = [((7, 13), 1), ((3, 5, 9), 2), ((300, 1), 1), ((4, 3, 33), 1), ((2100, 300), 1),
               ((64, 9000), 1)]  # fmt: skip


def _pointer(a):
    return None if a is None else ctypes.c_void_p(a.ctypes.data)


def _norm_outputs(x, stats, params):
    """NaN-filled outputs of a forward and backward: y, dx like x; the statistics and the
    gradients float64, of shapes ``stats`` and ``params``."""
    out = {name: poison(x.shape, x.dtype) for name in ("y", "dx")}
    out.update({name: poison(stats, np.float64) for name in ("mean", "invstd")})
    out.update({name: poison(params, np.float64) for name in ("dweight", "dbias")})
    return out


def _c_group_norm(library, x, dy, num_groups, weight, bias, eps=1e-5):
    """nbn_group_norm_forward_* then nbn_group_norm_backward_* with its statistics: y, mean,
    invstd (N, G) and dx, dweight, dbias (C,), the statistics and gradients float64."""
    suffix = "f32" if x.dtype == np.float32 else "f64"
    n, channels = x.shape[:2]
    sizes = [ctypes.c_int64(v) for v in (n, channels, x.size // (n * channels), num_groups)]
    out = _norm_outputs(x, (n, num_groups), channels)
    status = getattr(library, f"nbn_group_norm_forward_{suffix}")(
        _pointer(x), *sizes, _pointer(weight), _pointer(bias), ctypes.c_double(eps),
        *(_pointer(out[name]) for name in ("y", "mean", "invstd")),
    )  # fmt: skip
    assert status == 0
    status = getattr(library, f"nbn_group_norm_backward_{suffix}")(
        _pointer(dy), _pointer(x), *sizes, _pointer(weight),
        *(_pointer(out[name]) for name in ("mean", "invstd", "dx", "dweight", "dbias")),
    )  # fmt: skip
    assert status == 0
    return out


def _c_layer_norm(library, x, dy, dims, weight, bias, eps=1e-5):
    """nbn_layer_norm_forward_* then nbn_layer_norm_backward_* over the last ``dims`` axes."""
    suffix = "f32" if x.dtype == np.float32 else "f64"
    lead, shape = x.shape[: x.ndim - dims], x.shape[x.ndim - dims :]
    sizes = [ctypes.c_int64(v) for v in (int(np.prod(lead)), int(np.prod(shape)))]
    out = _norm_outputs(x, lead, shape)
    status = getattr(library, f"nbn_layer_norm_forward_{suffix}")(
        _pointer(x), *sizes, _pointer(weight), _pointer(bias), ctypes.c_double(eps),
        *(_pointer(out[name]) for name in ("y", "mean", "invstd")),
    )  # fmt: skip
    assert status == 0
    status = getattr(library, f"nbn_layer_norm_backward_{suffix}")(
        _pointer(dy), _pointer(x), *sizes, _pointer(weight),
        *(_pointer(out[name]) for name in ("mean", "invstd", "dx", "dweight", "dbias")),
    )  # fmt: skip
    assert status == 0
    return out


def _norm_case(rng, shape, params, dtype, affine):
    """x, dy, and weight, bias of shape ``params`` (None without affine)."""
    x = random_batch(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    if not affine:
        return x, dy, None, None
    return (
        x,
        dy,
        rng.uniform(0.5, 2.0, params).astype(dtype),
        rng.standard_normal(params).astype(dtype),
    )


def _jit_group_norm(x, dy, num_groups, weight, bias, mean, invstd):
    """The JIT's group norm: nbn.group_norm_forward, nbn.group_norm_backward given the
    statistics ``mean``, ``invstd``, and the float64 statistics and gradients of
    numba_bn.norm_ops they round to x's dtype."""
    y, public_mean, public_invstd = nbn.group_norm_forward(x, num_groups, weight, bias)
    _, mean64, invstd64, _ = norm_ops.group_stats_forward(x, num_groups, weight, bias, 1e-5, 1)
    dx, public_dweight, public_dbias = nbn.group_norm_backward(dy, x, mean, invstd, num_groups,
                                                               weight)  # fmt: skip
    _, dweight, dbias = norm_ops.group_stats_backward(dy, x, mean, invstd, num_groups, weight, 1)
    return {"y": y, "mean": mean64, "invstd": invstd64, "dx": dx, "dweight": dweight,
            "dbias": dbias}, (public_mean, public_invstd, public_dweight, public_dbias)  # fmt: skip


def _jit_layer_norm(x, dy, dims, weight, bias, mean, invstd):
    """The JIT's layer norm, as _jit_group_norm."""
    shape = x.shape[x.ndim - dims :]
    y, public_mean, public_invstd = nbn.layer_norm_forward(x, shape, weight, bias)
    _, mean64, invstd64 = norm_ops.layer_stats_forward(x, shape, weight, bias, 1e-5)
    dx, public_dweight, public_dbias = nbn.layer_norm_backward(dy, x, mean, invstd, shape, weight)
    _, dweight, dbias = norm_ops.layer_stats_backward(dy, x, mean, invstd, shape, weight)
    return {"y": y, "mean": mean64, "invstd": invstd64, "dx": dx, "dweight": dweight,
            "dbias": dbias}, (public_mean, public_invstd, public_dweight, public_dbias)  # fmt: skip


def _norm_case_runs(rng, norm, shape, extra, dtype):
    """The inputs of a case (x, dy, weight, bias; affine or not by the case) and the C and JIT
    runs that take them."""
    affine = (len(shape) + extra) % 2 == 0 or dtype == np.float64
    if norm == "group":
        return _norm_case(rng, shape, shape[1], dtype, affine), _c_group_norm, _jit_group_norm
    params = shape[len(shape) - extra :]
    return _norm_case(rng, shape, params, dtype, affine), _c_layer_norm, _jit_layer_norm


def _on_threads(library, threads, run, *args):
    """``run(library, *args)`` with the library on ``threads`` threads (0: all CPUs)."""
    library.nbn_set_num_threads(threads)
    try:
        return run(library, *args)
    finally:
        library.nbn_set_num_threads(0)


NORM_CASES = [("group", s, g) for s, g in GROUP_CASES] + [("layer", s, d) for s, d in LAYER_CASES]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("norm, shape, extra", NORM_CASES)
def test_norms_of_the_host_build_give_the_bits_of_the_jit(backends, rng, norm, shape, extra, dtype):
    """nbn_group_norm_* and nbn_layer_norm_* run the JIT drivers' range kernels over their work
    items: the same bits on 1 and 2 threads of the library, and in float32 the bits of
    nbn.group_norm_forward/_backward and nbn.layer_norm_forward/_backward (y, dx, and the
    float64 statistics and gradients, which those functions round to x's dtype), float64 too.

    float64 had 1e-12 relative until stop 27: the plain float64 sums of dy (runs_sums' sum_dy,
    layer_row_sums' sum_g, both REDUCE_FASTMATH) differed from the JIT's by a few ulp, and with
    them group norm's dbias and both norms' dx: the kernels' linked copies, optimised again in
    each caller, had reassociated them another way (stats.strict_copy).
    """
    (x, dy, w, b), run_c, run_jit = _norm_case_runs(rng, norm, shape, extra, dtype)
    library = backends["c-host"].library
    one = _on_threads(library, 1, run_c, x, dy, extra, w, b)
    two = _on_threads(library, 2, run_c, x, dy, extra, w, b)
    jit, public = run_jit(x, dy, extra, w, b, one["mean"], one["invstd"])
    for name, expected in jit.items():
        assert one[name].shape == expected.shape, name
        np.testing.assert_array_equal(one[name], two[name], err_msg=f"{name}: 1 vs 2 threads")
        np.testing.assert_array_equal(one[name], expected, err_msg=name)
    for name, expected in zip(("mean", "invstd", "dweight", "dbias"), public, strict=True):
        assert expected.dtype == dtype, name
        if dtype == np.float32:
            np.testing.assert_array_equal(one[name].astype(dtype), expected, err_msg=name)


@pytest.mark.parametrize("backend", ["c-plugin", "c-reference"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("norm, shape, extra", NORM_CASES)
def test_norms_of_the_portable_and_reference_builds_agree_with_the_jit(
    backends, rng, norm, shape, extra, dtype, backend
):
    """The portable build (its variant for this CPU) and the double-precision reference backend
    give the JIT's results within rounding."""
    (x, dy, w, b), run_c, run_jit = _norm_case_runs(rng, norm, shape, extra, dtype)
    ours = run_c(backends[backend].library, x, dy, extra, w, b)
    jit, _ = run_jit(x, dy, extra, w, b, ours["mean"], ours["invstd"])
    for name, expected in jit.items():
        scale = max(1.0, float(np.max(np.abs(expected.astype(np.float64)))))
        np.testing.assert_allclose(ours[name], expected, rtol=TOL[dtype],
                                   atol=TOL[dtype] * scale, err_msg=name)  # fmt: skip


# --------------------------------------------------------------------------------------- errors
def test_arguments_are_checked_in_python_first(backends, rng):
    x = random_batch(rng, (4, 3, 5), np.float32)
    with pytest.raises(ValueError, match="eps"):
        nbn.forward_train(x, eps=-1.0, backend="c-plugin")
    with pytest.raises(ValueError, match="weight"):
        nbn.forward_train(x, weight=np.ones(4, np.float32), backend="c-plugin")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nbn.forward_train(x[:1, :, :1], backend="c-plugin")


def test_a_c_status_becomes_an_error_naming_it(backends, rng):
    """Past the Python checks (called directly), the library's own check answers."""
    x = random_batch(rng, (4, 3, 5), np.float32)
    empty = np.empty(0, np.float32)
    with pytest.raises(RuntimeError, match="NBN_ERR_VALUE"):
        running_mean, running_var = np.zeros(3, np.float32), np.ones(3, np.float32)
        backends["c-plugin"].forward_eval(
            x, weight=empty, bias=empty, running_mean=running_mean, running_var=running_var,
            eps=-1.0, y=np.empty_like(x),
        )  # fmt: skip


NBN_ERR_SHAPE, NBN_ERR_VALUE, NBN_ERR_INTERNAL = 2, 3, 4  # nbn_status of numba_bn.h


@pytest.mark.parametrize("backend", ["c-plugin", "c-reference"])
@pytest.mark.parametrize("eps", [0.0, -0.0, np.nan])
def test_training_refuses_eps_zero_through_the_abi(backends, backend, eps):
    """NBN_ERR_VALUE and nothing written: with eps = 0 a channel of equal values (channel 0
    here, common in training) would get invstd = 1 / sqrt(0) = inf."""
    x = np.ones((4, 2, 3))
    x[:, 1] = np.arange(12.0).reshape(4, 3)
    outputs = [np.full(x.shape, -7.25)] + [np.full(2, -7.25) for _ in range(4)]
    function = backends[backend].library.nbn_forward_train_f64
    pointers = [a.ctypes.data for a in outputs]
    assert function(x.ctypes.data, 4, 2, 3, None, None, eps, *pointers, 0.1) == NBN_ERR_VALUE
    for output in outputs:
        np.testing.assert_array_equal(output, -7.25)


@pytest.mark.parametrize("backend", ["c-plugin", "c-reference"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eval_with_eps_zero_follows_ieee(backends, rng, backend, dtype):
    """A zero running variance with eps = 0 is no error: invstd = inf and y not finite on that
    channel (inf, NaN where x equals the mean), as in PyTorch; the other channels as usual."""
    x = random_batch(rng, (4, 3, 5), dtype)
    running_mean = rng.standard_normal(3).astype(dtype)
    running_var = np.array([1.5, 0.0, 0.5], dtype)
    y = nbn.forward_eval(x, running_mean, running_var, eps=0.0, backend=backend)
    assert not np.isfinite(y[:, 1]).any()
    finite = [0, 2]
    expected = (x[:, finite].astype(np.float64) - running_mean[finite, None]) / np.sqrt(
        running_var[finite, None].astype(np.float64)
    )
    np.testing.assert_allclose(y[:, finite], expected, rtol=TOL[dtype], atol=TOL[dtype] * 10)


@pytest.mark.parametrize("backend", ["c-plugin", "c-reference"])
def test_a_shape_whose_scratch_cannot_exist_is_refused(backends, backend):
    """Sizes within the element check whose scratch in the plugin is over 2^64 bytes (the count
    wrapped: backward with 2^59 + 2 channels to 192 bytes, and crashed): NBN_ERR_SHAPE, nothing
    written. The reference backend's double copies fit in a 64-bit size_t, so it may instead
    fail to allocate them (NBN_ERR_INTERNAL)."""
    allowed = {NBN_ERR_SHAPE} if backend == "c-plugin" else {NBN_ERR_SHAPE, NBN_ERR_INTERNAL}
    library = backends[backend].library
    wide, wide_train = 2**59 + 2, 2**59 - 1
    x = np.zeros(8, np.float32)
    outputs = [np.full(8, -7.25, np.float32) for _ in range(5)]
    p = [a.ctypes.data for a in (x, *outputs)]
    statuses = {
        "eval": library.nbn_forward_eval_f32(p[0], 1, wide, 1, None, None, p[0], p[0], 1e-5, p[1]),
        "backward": library.nbn_backward_f32(p[0], p[0], 1, wide, 1, None, p[0], p[0], *p[1:4]),
    }
    for outer, inner in ((1, 2), (2, 1)):  # planes, rows
        statuses[f"train ({outer}, 2^59 - 1, {inner})"] = library.nbn_forward_train_f32(
            p[0], outer, wide_train, inner, None, None, 1e-5, *p[1:], 0.1
        )
    assert all(status in allowed for status in statuses.values()), statuses
    for output in outputs:
        np.testing.assert_array_equal(output, -7.25)


def test_register_backend_loads_a_ctypes_library(backends, library):
    backend = nbn.register_backend("c-again", ctypes.CDLL(str(library)))
    major, minor, patch = build.abi_version()
    assert backend.version == major * 10000 + minor * 100 + patch and minor >= 1
    assert backend.fused
    assert backend.isa in {name for name, _, _ in build.build_targets()}
    backend.set_num_threads(1)
    assert backend.get_num_threads() == 1
    backend.set_num_threads(0)
    assert backends["c-reference"].isa == "reference"


def test_register_backend_rejects_what_is_not_a_backend(tmp_path):
    for builtin in ("cpu", "cuda"):
        with pytest.raises(ValueError, match=f"'{builtin}' is taken"):
            nbn.register_backend(builtin, tmp_path / "missing.so")
    with pytest.raises(OSError, match="missing.so"):
        nbn.register_backend("c-missing", tmp_path / "missing.so")
    libm = ctypes.util.find_library("m")
    if libm is None:
        pytest.skip("no libm to load")
    with pytest.raises(ValueError, match="nbn_forward_train_f32"):
        nbn.register_backend("c-libm", libm)
    with pytest.raises(ValueError, match="not registered"):
        nbn.forward_train(np.ones((2, 2)), backend="c-libm")


def test_build_without_the_c_sources_says_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(build, "CSRC_DIR", tmp_path)
    with pytest.raises(RuntimeError, match="package data"):
        build.build_plugin(tmp_path / "out")


# ------------------------------------------------------------------------------ compiled calls
class _ReachedPython(Exception):
    """Raised by the functional API's Python path under _no_python_path."""


def _no_python_path(monkeypatch):
    """Make the Python path of forward_train, forward_eval, backward, batch_norm and BatchNorm
    (what runs after the compiled calls declined: the plain or checked path of ops, which the
    functional API and ops.batch_forward / batch_backward take, and the JIT's fronts and
    kernels, which a layer's plans call when compiled calls do not serve them) raise
    _ReachedPython."""

    def reached(*args, **kwargs):
        raise _ReachedPython

    for name in ("plain_batch_forward", "checked_batch_forward", "plain_frozen_forward",
                 "checked_frozen_forward", "plain_batch_backward",
                 "checked_batch_backward"):  # fmt: skip
        monkeypatch.setattr(ops, name, reached)
    for module in (functional, layer):  # the layer's eval goes through functional.forward_eval
        for name in ("masked_batch_forward", "masked_batch_backward"):
            monkeypatch.setattr(module, name, reached)
    for name in ("forward_train", "forward_eval", "backward"):  # a call like one before
        monkeypatch.setattr(fronts, name, reached)
    for name in ("_train_front", "_eval_front", "_backward_front"):  # a layer's plans
        monkeypatch.setattr(fronts, name, reached)
    for name in ("forward_train", "forward_eval", "backward"):
        monkeypatch.setattr(CpuBackend, name, reached)


@pytest.fixture
def compiled_calls(host_build):
    """The host build's compiled calls, on for one test."""
    path = nbn.use_compiled_calls(host_build)
    yield path
    nbn.use_compiled_calls(None)


def _plain_calls(rng, shape, affine, dtype=np.float32):
    """The public calls the compiled calls serve, on a ``dtype`` batch drawn here (closures)."""
    x = random_batch(rng, shape, dtype)
    dy = random_batch(rng, shape, dtype, mean_scale=1.0)
    channels = shape[1]
    weight = rng.uniform(0.5, 2.0, channels).astype(dtype) if affine else None
    bias = rng.standard_normal(channels).astype(dtype) if affine else None
    _, mean, invstd = nbn.forward_train(x, weight, bias)
    running_var = rng.uniform(0.1, 3.0, channels).astype(dtype)
    bn = nbn.BatchNorm(channels, affine=affine, dtype=dtype).eval()
    bn.running_mean[:], bn.running_var[:] = mean, running_var
    if affine:
        bn.weight[:], bn.bias[:] = weight, bias
    running = rng.standard_normal(channels).astype(dtype), running_var

    def batch_norm_training():
        buffers = [b.copy() for b in running]
        y = nbn.batch_norm(x, *buffers, weight, bias, training=True, momentum=0.3)
        return y, *buffers

    def layer_steps():  # two training steps (torch's convention) and their backward
        layer = nbn.BatchNorm(channels, affine=affine, dtype=dtype)
        if affine:
            layer.weight[:], layer.bias[:] = weight, bias
        results = []
        for step in range(2):
            results += [layer(x + step), layer.backward(dy), layer.running_mean.copy(),
                        layer.running_var.copy()]  # fmt: skip
            results += [layer.grad_weight, layer.grad_bias] if affine else []
        return tuple(results)

    return {
        "batch_norm, training": batch_norm_training,
        "BatchNorm, training": layer_steps,
        "forward_train": lambda: nbn.forward_train(x, weight, bias),
        "forward_train, eps and axis": lambda: nbn.forward_train(x, weight, bias, 1e-3, 1),
        "forward_train, device": lambda: nbn.forward_train(x, weight, bias, device="cpu"),
        "forward_eval": lambda: nbn.forward_eval(x, mean, running_var, weight, bias),
        "batch_norm, eval": lambda: nbn.batch_norm(x, mean, running_var, weight, bias),
        "BatchNorm, eval": lambda: bn(x),
        "backward": lambda: nbn.backward(dy, x, mean, invstd, weight),
        "forward_train, out=": lambda: _into(nbn.forward_train, x, x, weight, bias),
        "forward_train, out=x": lambda: _into(nbn.forward_train, "x", x, weight, bias),
        "forward_eval, out=": lambda: _into(nbn.forward_eval, x, x, mean, running_var, weight),
        "backward, out=": lambda: _into(nbn.backward, x, dy, x, mean, invstd, weight),
        "backward, out=dy": lambda: _into(nbn.backward, "dy", dy, x, mean, invstd, weight),
        "BatchNorm, training, out=": lambda: _into(nbn.BatchNorm(channels, dtype=dtype), x, x),
        "batch_norm, training, out=": lambda: _into(
            nbn.batch_norm, x, x, *[b.copy() for b in running], weight, bias, training=True
        ),  # fmt: skip
    }


def _into(call, into, *args, **keywords):
    """``call(*args, out=...)`` (the first result, which must be out): out a new array like
    ``into`` (poisoned), or "x" or "dy": a copy of the argument of that name given as it."""
    args = list(args)
    if isinstance(into, str):  # in place: x is the first argument of the forwards, dy's second
        at = 1 if into == "x" and call is nbn.backward else 0
        args[at] = out = args[at].copy()
    else:
        out = poison(into.shape, into.dtype)
    result = call(*args, **keywords, out=out)
    y = result[0] if isinstance(result, tuple) else result
    assert y is out
    return result


def _python_then_compiled(calls, host_build, monkeypatch):
    """({name: results}, {name: results}) of ``calls`` through the Python path, then through the
    host build's compiled calls with the Python path made to raise (each result a tuple)."""
    expected = {name: _as_tuple(call()) for name, call in calls.items()}
    _no_python_path(monkeypatch)
    with pytest.raises(_ReachedPython):  # the patch holds
        next(iter(calls.values()))()
    nbn.use_compiled_calls(host_build)
    try:
        served = {name: _as_tuple(call()) for name, call in calls.items()}
    finally:
        nbn.use_compiled_calls(None)
    assert all(len(served[name]) == len(results) for name, results in expected.items())
    return expected, served


def _as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


SERVED_SHAPES = [(64, 32), (16, 5), (2, 3), (7, 3, 11), (8, 16, 8, 8), (3, 4, 5, 6), (64, 256)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", SERVED_SHAPES)
def test_compiled_calls_give_the_bits_of_the_python_path(
    rng, plugin_backend, host_build, monkeypatch, shape, affine, dtype
):
    """The plain calls, served without the Python path, give its bits (the JIT's), float64
    included: y, the statistics, eval's y, dx, the parameter gradients and running buffers, the
    layer's training steps, new arrays of its dtypes and shapes. With the portable build loaded
    first (plugin_backend), as in a session that uses both: the host build's calls must run the
    host build."""
    expected, served = _python_then_compiled(_plain_calls(rng, shape, affine, dtype),
                                             host_build, monkeypatch)  # fmt: skip
    for name, arrays in expected.items():
        for got, want in zip(served[name], arrays, strict=True):
            assert type(got) is np.ndarray and got.flags.c_contiguous and got.flags.writeable
            assert got.dtype == want.dtype and got.shape == want.shape, name
            np.testing.assert_array_equal(got, want, err_msg=name)
            assert not np.shares_memory(got, want)


LAYER_OPTIONS = [{"convention": "keras"}, {"convention": "flax"}, {"convention": "onnx"},
                 {"momentum": None}, {"track_running_stats": False},
                 {"convention": "keras", "dtype": np.float64}]  # fmt: skip


@pytest.mark.parametrize(
    "options",
    LAYER_OPTIONS,
    ids=lambda o: ",".join(f"{k}={getattr(v, '__name__', v)}" for k, v in o.items()),
)
def test_compiled_calls_train_the_layer_as_the_python_path(rng, host_build, monkeypatch, options):
    """BatchNorm's training steps served without the Python path give its bits in every running
    convention (the biased batch variance of Keras, Flax and ONNX; PyTorch's cumulative average;
    no running statistics): y, dx, the running buffers, the gradients, num_batches_tracked."""
    options = {"dtype": np.float32, **options}
    x = random_batch(rng, (32, 6, 5), options["dtype"])
    dy = random_batch(rng, (32, 6, 5), options["dtype"], mean_scale=1.0)
    weight, bias = rng.uniform(0.5, 2.0, 6), rng.standard_normal(6)

    def steps():
        bn = nbn.BatchNorm(6, axis=1, **options)
        bn.weight[:], bn.bias[:] = weight, bias
        results = []
        for step in range(3):  # batches that drift, so that the running statistics move
            results += [bn(x * (1 + step) + step), bn.backward(dy), bn.grad_weight, bn.grad_bias]
            if bn.running_mean is not None:
                results += [bn.running_mean.copy(), bn.running_var.copy()]
        return (*results, np.array(bn.num_batches_tracked))

    expected, served = _python_then_compiled({"steps": steps}, host_build, monkeypatch)
    assert len(expected["steps"]) in (13, 19)  # 3 steps of 4 or 6 arrays, the count
    for got, want in zip(served["steps"], expected["steps"], strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "shape, axis, served", [((64, 32), 1, True), ((256, 512), 1, False), ((4, 3, 3, 8), -1, False)]
)
def test_a_layer_keeps_its_plans_with_compiled_calls(rng, host_build, shape, axis, served):
    """With compiled calls on, a BatchNorm keeps its plans as without them: for the batches they
    serve (small, the channels on axis 1) a plan hands its checked arguments to the entry (its
    general path cost ~1 us more a training step), for the others (a batch the JIT runs on threads,
    channels-last) it runs the JIT's kernels; the same bits as a layer without compiled calls.
    (Until stop 68 a served batch got no plan, and took the layer's general path every call.)"""
    channels = shape[axis]
    batches = [(random_batch(rng, shape, np.float32, axis=axis),
                random_batch(rng, shape, np.float32, axis=axis, mean_scale=1.0))
               for _ in range(3)]  # fmt: skip
    weight, bias = rng.uniform(0.5, 2.0, channels), rng.standard_normal(channels)

    def steps():
        bn = nbn.BatchNorm(channels, axis=axis)
        bn.weight[:], bn.bias[:] = weight, bias
        results, planned = [], []
        for x, dy in batches:
            results.append(bn(x))
            planned.append(bn._saved.plan is not None)
            results += [bn.backward(dy), bn.grad_weight, bn.grad_bias, bn.running_mean.copy(),
                        bn.running_var.copy()]  # fmt: skip
        bn.eval()
        results += [bn(x) for x, _ in batches]
        return results, planned, {key: plan.served for key, plan in bn._plans.items()}

    want, planned, kept = steps()
    assert planned == [False, True, True] and kept == {(shape, True): False, (shape, False): False}
    nbn.use_compiled_calls(host_build)
    try:
        size_served = all(np.prod(shape) < bound for bound in calls.serial_bounds.values())
        assert size_served == (shape != (256, 512))  # the shapes cover what they should
        got, planned, kept = steps()
    finally:
        nbn.use_compiled_calls(None)
    assert planned == [False, True, True]
    assert kept == {(shape, True): served, (shape, False): served}
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_training_steps_return_ops_results_with_the_gradients_rounded_as_numpy(
    rng, compiled_calls, dtype
):
    """ops.batch_forward and ops.batch_backward, served, return ops' own NamedTuples, and the
    backward's parameter gradients are invstd * sum_dy_xmu (float64) and sum_dy rounded once to
    x's dtype, as ops.weight_gradient and astype round them (the layer takes them as they are)."""
    x = random_batch(rng, (64, 32), dtype)
    dy = random_batch(rng, (64, 32), dtype, mean_scale=1.0)
    weight = rng.uniform(0.5, 2.0, 32).astype(dtype)
    forward = ops.batch_forward(x, weight, None, 1e-5, 1)
    assert type(forward) is ops.TrainResult and forward.count == 64
    result = ops.batch_backward(dy, x, forward.mean, forward.invstd, weight, 1)
    assert type(result) is ops.BackwardResult and result.count == 64
    want_weight = ops.weight_gradient(forward.invstd, result.sum_dy_xmu, 64, dtype)
    want_bias = result.sum_dy.astype(dtype)
    # the check can tell: a float32 product of the rounded factors differs in some channel
    assert dtype is np.float64 or not np.array_equal(
        want_weight, (forward.invstd.astype(dtype) * result.sum_dy_xmu.astype(dtype))
    )
    for got, want in ((result.grad_weight, want_weight), (result.grad_bias, want_bias)):
        assert got.dtype == dtype and got.shape == (32,)
        np.testing.assert_array_equal(got, want)
    out = np.empty_like(x)  # declined: the Python path's plain call rounds them the same way
    declined = ops.batch_backward(dy, x, forward.mean, forward.invstd, weight, 1, out=out)
    assert declined.dx is out
    np.testing.assert_array_equal(declined.dx, result.dx)
    for got, want in ((declined.grad_weight, want_weight), (declined.grad_bias, want_bias)):
        np.testing.assert_array_equal(got, want)


def test_compiled_calls_give_the_python_paths_nan_and_inf(rng, host_build, monkeypatch):
    """IEEE through the compiled calls as through the Python path (nan_policy="propagate"): a
    NaN in one channel, an inf in another, a channel of equal values."""
    x = random_batch(rng, (16, 5), np.float32)
    x[3, 0], x[7, 1], x[:, 2] = np.nan, np.inf, 4.0
    dy = random_batch(rng, (16, 5), np.float32, mean_scale=1.0)
    steps = {
        "forward_train": lambda: nbn.forward_train(x),
        "backward": lambda: nbn.backward(dy, x, *nbn.forward_train(x)[1:]),
        "forward_eval": lambda: nbn.forward_eval(
            x, np.zeros(5, np.float32), np.ones(5, np.float32)
        ),
    }
    expected, served = _python_then_compiled(steps, host_build, monkeypatch)
    for name, arrays in expected.items():
        for got, want in zip(served[name], arrays, strict=True):
            np.testing.assert_array_equal(got, want, err_msg=name)  # NaN where NaN


def _declined_calls(rng):
    """Calls the compiled calls leave to the Python path, by what makes each one different."""
    x = random_batch(rng, (16, 6), np.float32)
    w, b = np.ones(6, np.float32), np.zeros(6, np.float32)
    _, mean, invstd = nbn.forward_train(x, w, b)
    x4 = random_batch(rng, (2, 3, 4, 6), np.float32, axis=-1)
    big = random_batch(rng, (512, 512), np.float32)
    swapped, x64 = x.astype(">f4"), x.astype(np.float64)
    sub = x.view(type("Subclass", (np.ndarray,), {}))
    shifted = np.concatenate([x, x[:1]])  # two (16, 6) views one row apart: shifted[:16], [1:]
    read_only, read_only_x = invstd.copy(), x.copy()
    read_only.flags.writeable = read_only_x.flags.writeable = False
    return {
        "float16": lambda: nbn.forward_train(x.astype(np.float16)),
        "float64 x, float32 weight": lambda: nbn.forward_train(x64, w),
        "batch_norm, training, float64 x, float32 buffers": lambda: nbn.batch_norm(
            x64, mean.copy(), invstd.copy(), training=True
        ),
        "channels last": lambda: nbn.forward_train(x4, axis=-1),
        "axis -1 of a matrix": lambda: nbn.forward_train(x, axis=-1),
        "out overlapping x": lambda: nbn.forward_train(shifted[:16], out=shifted[1:]),
        "float64 out": lambda: nbn.forward_eval(x, mean, invstd, out=x64.copy()),
        "read-only out": lambda: nbn.backward(x, x, mean, invstd, out=read_only_x),
        "non-contiguous out": lambda: nbn.backward(
            x, x, mean, invstd, out=np.empty((16, 12), np.float32)[:, ::2]
        ),
        "nan_policy": lambda: nbn.forward_train(x, nan_policy="raise"),
        "mask": lambda: nbn.forward_train(x, mask=np.ones(16, bool)),
        "residual": lambda: nbn.forward_train(x, residual=x),
        "activation": lambda: nbn.forward_train(x, activation="relu"),
        "strided": lambda: nbn.forward_train(x[:, ::2]),
        "Fortran order": lambda: nbn.forward_train(np.asfortranarray(x)),
        "byte-swapped": lambda: nbn.forward_train(swapped),
        "a subclass": lambda: nbn.forward_train(sub),
        "a list": lambda: nbn.forward_train(x.tolist()),
        "float64 weight": lambda: nbn.forward_train(x, w.astype(np.float64)),
        "a NumPy float eps": lambda: nbn.forward_train(x, w, b, np.float64(1e-5)),
        "an int eps": lambda: nbn.forward_train(x, w, b, 1),
        "parallel-sized": lambda: nbn.forward_train(big),
        "eval, float64 running_var": lambda: nbn.forward_eval(x, mean, invstd.astype(np.float64)),
        "batch_norm, training, momentum 1.5": lambda: nbn.batch_norm(
            x, mean.copy(), invstd.copy(), training=True, momentum=1.5
        ),
        "batch_norm, training, a NumPy float momentum": lambda: nbn.batch_norm(
            x, mean.copy(), invstd.copy(), training=True, momentum=np.float64(0.1)
        ),
        "batch_norm, training, read-only running_var": lambda: nbn.batch_norm(
            x, mean.copy(), read_only, training=True
        ),
        "batch_norm, training, parallel-sized": lambda: nbn.batch_norm(big, None, None, True),
        "BatchNorm, training, relu": lambda: nbn.BatchNorm(6, activation="relu")(x),
        "BatchNorm, training, nan_policy": lambda: nbn.BatchNorm(6, nan_policy="raise")(x),
        "BatchNorm, training, residual": lambda: nbn.BatchNorm(6)(x, residual=x),
        "BatchNorm, eval, relu": lambda: nbn.BatchNorm(6, activation="relu").eval()(x),
        "batch_norm, eval, relu": lambda: nbn.batch_norm(x, mean, invstd, activation="relu"),
        "eval, parallel-sized": lambda: nbn.forward_eval(
            random_batch(rng, (1024, 512), np.float32),
            np.zeros(512, np.float32),
            np.ones(512, np.float32),
        ),
        "backward, float64 mean": lambda: nbn.backward(x, x, mean.astype(np.float64), invstd),
        "backward, float64 dy": lambda: nbn.backward(x.astype(np.float64), x, mean, invstd),
        "backward, mask": lambda: nbn.backward(x, x, mean, invstd, mask=np.ones(16, bool)),
        "backward, activation": lambda: nbn.backward(x, x, mean, invstd, activation="relu", y=x),
    }


def test_compiled_calls_leave_every_other_call_to_the_python_path(rng, compiled_calls, monkeypatch):
    """A call of another dtype, layout, kind of array or argument, option or size goes to the
    Python path, whose checks and conversions it needs."""
    assert compiled_calls.is_file()
    calls = _declined_calls(rng)
    _no_python_path(monkeypatch)
    for name, call in calls.items():
        with pytest.raises(_ReachedPython):
            call()
            pytest.fail(f"{name}: served")


def test_compiled_calls_leave_bad_arguments_to_the_python_checks(rng, host_build):
    """The same error, type and message, with and without the compiled calls."""
    x = random_batch(rng, (16, 6), np.float32)
    w = np.ones(6, np.float32)
    _, mean, invstd = nbn.forward_train(x)
    read_only = mean.copy()
    read_only.flags.writeable = False
    bad = {
        "weight of 5": lambda: nbn.forward_train(x, w[:5]),
        "one value per channel": lambda: nbn.forward_train(x[:1]),
        "rank 1": lambda: nbn.forward_train(x[0]),
        "eps 0": lambda: nbn.forward_train(x, eps=0.0),
        "eps NaN": lambda: nbn.forward_train(x, eps=float("nan")),
        "axis 2": lambda: nbn.forward_train(x, axis=2),
        "eval, no running_var": lambda: nbn.forward_eval(x, mean, None),
        "eval, running_mean of 5": lambda: nbn.forward_eval(x, mean[:5], invstd),
        "eval, a negative running_var": lambda: nbn.forward_eval(x, mean, -invstd),
        "backward, dy of another shape": lambda: nbn.backward(x[:8], x, mean, invstd),
        "backward, no invstd": lambda: nbn.backward(x, x, mean, None),
        "training, momentum 1.5": lambda: nbn.batch_norm(
            x, mean.copy(), invstd.copy(), None, None, True, 1.5
        ),
        "training, momentum NaN": lambda: nbn.batch_norm(
            x, mean.copy(), invstd.copy(), None, None, True, float("nan")
        ),
        "training, read-only running_mean": lambda: nbn.batch_norm(
            x, read_only, invstd.copy(), training=True
        ),
        "training, only running_mean": lambda: nbn.batch_norm(x, mean.copy(), None, training=True),
        "training, running_var of 5": lambda: nbn.batch_norm(
            x, mean.copy(), invstd[:5].copy(), training=True
        ),
        "layer, 5 channels": lambda: nbn.BatchNorm(5)(x),
    }
    for name, call in bad.items():
        errors = []
        for directory in (None, host_build):
            nbn.use_compiled_calls(directory)
            try:
                with pytest.raises((ValueError, TypeError)) as error:
                    call()
            finally:
                nbn.use_compiled_calls(None)
            errors.append((error.type, str(error.value)))
        assert errors[0] == errors[1], name


def test_bench_times_the_compiled_calls_after_checking_them(capsys, host_build):
    """bench's strict check against the float64 reference passes through the compiled calls,
    and the run says they were on, then turns them off."""
    argv = ["bench", "--shapes", "small-nc", "--impls", "numba_bn", "--repeat", "1",
            "--no-first-call", "--compiled-calls", str(host_build)]  # fmt: skip
    assert main(argv) == 0
    output = capsys.readouterr().out
    assert f"compiled calls from {host_build}" in output and "verified" in output
    assert calls.entry is None


def test_use_compiled_calls_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="numba-bn build-plugin"):
        nbn.use_compiled_calls(tmp_path)
    assert calls.entry is None


# a child process: forward_train of a float32 batch with the Python path made to fail; prints
# what it served and how far it is from the float64 formula
_SERVED_AT_IMPORT = """
import sys
import numpy as np
import numba_bn as nbn
from numba_bn import functional
from numba_bn.capi import calls

print("in use:", calls.in_use)
def reached(*args, **kwargs):
    raise AssertionError("reached the Python path")
functional.batch_forward = reached
x = np.random.default_rng(int(sys.argv[1])).standard_normal((64, 32)) * 3 + 2
y, mean, invstd = nbn.forward_train(x.astype(np.float32))
expected = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
print("served, largest error:", np.abs(y - expected).max())
"""


def test_numba_bn_compiled_calls_turns_them_on_at_import(rng, host_build):
    seed = int(rng.integers(2**31))
    env = {calls.ENVIRONMENT: str(host_build), "NUMBA_BN_QUIET": "1"}
    code, output = run_child([sys.executable, "-c", _SERVED_AT_IMPORT, seed], env, timeout=120)
    assert code == 0, output
    assert f"in use: {host_build}" in output
    assert float(output.split("largest error:")[1]) < 1e-5, output


@pytest.mark.parametrize("value", ["", "missing"])
def test_numba_bn_compiled_calls_that_cannot_serve_is_a_warning(tmp_path, value):
    """Unset or empty: off, silently. A directory without the plugin: a warning that names the
    variable and the remedy, and the import goes on with the Python path."""
    where = str(tmp_path / value) if value else ""
    child = "from numba_bn.capi import calls; print('in use:', calls.in_use)"
    code, output = run_child([sys.executable, "-c", child], {calls.ENVIRONMENT: where}, 120)
    assert code == 0, output
    assert "in use: None" in output
    warned = f"RuntimeWarning: {calls.ENVIRONMENT}={where!r} gives no compiled calls"
    assert (warned in output) == bool(value), output
    if value:
        assert f"numba-bn build-plugin --out {where}" in output


def test_use_compiled_calls_refuses_a_library_of_another_abi(host_build, monkeypatch):
    monkeypatch.setattr(calls, "ABI_MAJOR", calls.ABI_MAJOR + 1)
    with pytest.raises(RuntimeError, match=r"has ABI version 1\d{4}; compiled calls need 2\.4"):
        nbn.use_compiled_calls(host_build)
    assert calls.entry is None and calls.in_use is None


def test_the_extension_refuses_result_types_that_are_not_tuples(rng, compiled_calls):
    """configure's result types become the objects batch_forward and batch_backward allocate:
    anything but a tuple subclass is a TypeError, and the configuration stays as it was."""
    addresses = [1] * len(calls.ENTRY_POINTS)
    for kinds in ((int, ops.BackwardResult), (ops.TrainResult, "BackwardResult")):
        with pytest.raises(TypeError, match="result types must be tuple subclasses"):
            calls.entry.configure(*addresses, 1e9, 1e9, 1e9, *kinds)
    x = random_batch(rng, (16, 5), np.float32)
    assert type(ops.batch_forward(x, None, None, 1e-5, 1)) is ops.TrainResult  # still served


def test_bench_reports_compiled_calls_turned_on_before_it(capsys, host_build):
    """Without --compiled-calls, bench times what the process has (NUMBA_BN_COMPILED_CALLS's at
    import), says so, and leaves them on."""
    argv = ["bench", "--shapes", "small-nc", "--impls", "numba_bn", "--repeat", "1",
            "--no-first-call"]  # fmt: skip
    nbn.use_compiled_calls(host_build)
    try:
        assert main(argv) == 0
        assert calls.in_use == host_build
    finally:
        nbn.use_compiled_calls(None)
    assert f"compiled calls from {host_build}" in capsys.readouterr().out


def test_the_compiled_calls_compile_without_a_warning(tmp_path):
    include = sysconfig.get_paths()["include"]
    if not Path(include, "Python.h").is_file():
        pytest.skip("no Python.h")
    build.run_compiler(
        ["-std=c11", *WARNINGS, "-fsyntax-only", "-I", include, "-I", np.get_include(), "-I",
         CSRC, CSRC / "nbn_python.c"],
        "compiling nbn_python.c",
    )  # fmt: skip


def test_the_c_sources_are_package_data():
    """Every file of csrc/ matches a pattern of pyproject.toml's package data, so the wheel
    carries it (.ci/run builds the plugin from an installed wheel)."""
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["numba_bn.capi"]
    sources = [path.relative_to(CSRC.parent).as_posix() for path in CSRC.iterdir()]
    assert "csrc/nbn_shim.c" in sources
    for source in sources:
        assert any(fnmatch.fnmatch(source, pattern) for pattern in patterns), source


def test_header_only_writes_the_generated_header_the_shim_compiles_with(tmp_path):
    """`numba-bn build-plugin --header-only` reproduces nbn_kernels.h without compiling kernels,
    and the shim compiles against it without a warning."""
    assert main(["build-plugin", "--out", str(tmp_path), "--header-only", "--cpu", "host"]) == 0
    assert [path.name for path in tmp_path.iterdir()] == [build.GENERATED_HEADER]
    header = (tmp_path / build.GENERATED_HEADER).read_text()
    assert all(f"(*{function.__name__})(" in header for function in EXPORTED)
    build.run_compiler(
        ["-std=c11", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", "-I", CSRC, "-I", tmp_path,
         CSRC / "nbn_shim.c"],
        "compiling the shim against the generated header",
    )  # fmt: skip


def test_missing_compiler_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", os.fspath(tmp_path / "no-such-cc"))
    with pytest.raises(RuntimeError, match="no-such-cc"):
        build.build_reference_backend(tmp_path)
