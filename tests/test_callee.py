"""Callees (numba_bn.stats.callee): the kernels only compiled code calls are compiled without
Numba's entry points; a call from Python still runs (a twin compiled with them), and the
package's own Python never makes one."""

import math
import re
import sys

import llvmlite.binding as ll
import numpy as np
from numba import njit

from numba_bn.stats import (
    REDUCE_FASTMATH,
    Callee,
    _LinkedOnly,
    apart,
    callee,
    kernel,
    strict_copy,
    strict_ir,
)

from conftest import run_child


def entry_points(compiled):
    """The names of the Python and C entry points a compiled function's library defines."""
    defined = re.findall(r'^define [^@]*@"?([^"(]+)', compiled.library.get_llvm_str(), re.M)
    fndesc = compiled.fndesc
    return [name for name in (fndesc.llvm_cpython_wrapper_name, fndesc.llvm_cfunc_wrapper_name)
            if name in defined]  # fmt: skip


def test_a_callee_compiles_without_entry_points_where_a_kernel_has_two():
    def scaled(a, b):
        return 2.0 * a + b

    inner, control = callee(scaled), kernel(scaled)

    @njit
    def outer(a, b):
        return inner(a, b) - control(a, b)

    assert outer(1.5, 3.0) == 0.0
    (inner_compiled,) = inner.overloads.values()
    (control_compiled,) = control.overloads.values()
    assert entry_points(inner_compiled) == []
    assert len(entry_points(control_compiled)) == 2  # the kernel's: the test can see them


def test_a_call_from_python_runs_a_twin_with_the_callees_options():
    @callee(fastmath={"reassoc"})
    def ratio(a, b):
        return a / b

    assert isinstance(ratio, Callee) and "python_twin" not in vars(ratio)
    assert ratio(3.0, 4.0) == 0.75
    assert math.isinf(ratio(1.0, 0.0))  # error_model="numpy" as every kernel: no exception
    twin = ratio.python_twin
    assert twin.targetoptions["fastmath"] == ratio.targetoptions["fastmath"]
    assert twin.targetoptions["error_model"] == "numpy"
    assert not ratio.overloads  # the callee itself compiled nothing for Python
    (compiled,) = twin.overloads.values()
    assert len(entry_points(compiled)) == 2

    @njit
    def outer(a, b):
        return ratio(a, b)

    assert math.isinf(outer(-1.0, 0.0))  # compiled code calls the callee's own compile
    (own,) = ratio.overloads.values()
    assert entry_points(own) == []


def test_a_callee_and_its_strict_copy_make_no_machine_code_of_their_own():
    """Their code runs linked into each caller's (a callee has no entry point to enter it by):
    Numba finalises their libraries without turning them into machine code (~0.3 s of a cold
    forward). The callers' machine code has theirs, and does what the sources say."""

    @callee
    def shifted_sum(values, shift):
        total = 0.0
        for v in values:
            total += v - shift
        return total

    @callee(fastmath=REDUCE_FASTMATH)
    def squares(values):
        total = 0.0
        for v in values:
            total += v * v
        return total

    control = kernel(shifted_sum.py_func)

    @njit
    def outer(values):
        return shifted_sum(values, 1.0) + apart(squares, (values,)) - control(values, 1.0)

    values = np.arange(1.0, 65.0)
    assert outer(values) == (values * values).sum()  # exact: integers
    # machine code made for a library is kept on it (Numba's object cache hook)
    (compiled,) = control.overloads.values()
    assert compiled.library._compiled_object is not None  # the test can see it
    for function in (shifted_sum, squares):
        (compiled,) = function.overloads.values()
        assert isinstance(compiled.library, _LinkedOnly)
        assert compiled.library._compiled_object is None
    library, symbol = strict_copy(compiled.library.codegen, compiled)  # apart made it: cached
    assert isinstance(library, _LinkedOnly)
    # nor optimised again: its IR is the kernel's, in the order the kernel's optimisation chose
    # and with no flag that lets a pass reorder it (the callers optimise it with their code)
    text, copied = strict_ir(compiled)
    assert copied == symbol and "reassoc" not in text
    final, parsed = (str(module).partition("\n")[2]  # after the module's name
                     for module in (library._final_module, ll.parse_assembly(text)))  # fmt: skip
    assert final == parsed
    (caller,) = outer.overloads.values()  # the caller links the strict copy, and calls it
    assert re.search(
        rf'^define [^@]*@"?{re.escape(symbol)}"?\(', caller.library.get_llvm_str(), re.M
    )
    assert caller.library._compiled_object is not None


# Every kind of call the package makes on the host, in a fresh process: not one of its callees
# may have been called from Python (each such call would compile the callee a second time).
PACKAGE_CALLS = """
import sys
import numpy as np
import numba_bn as nbn
from numba_bn.stats import Callee

rng = np.random.default_rng(0)
shapes = [(64, 32), (8, 16, 8, 8), (64, 4, 3), (4, 8, 4096), (2048, 64)]  # rows, planes, short
for shape in shapes:  # planes, fused planes, a parallel size
    x = (rng.standard_normal(shape) + 2).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    channels = shape[1]
    y, mean, invstd = nbn.forward_train(x)
    nbn.backward(dy, x, mean, invstd)
    nbn.forward_eval(x, mean, invstd)
    nbn.forward_train(x, out=np.empty_like(x), nan_policy="raise")
    nbn.batch_norm(x, np.zeros(channels, np.float32), np.ones(channels, np.float32), training=True)
    layer = nbn.BatchNorm(channels, activation="relu")
    layer(x, residual=x)
    layer.backward(dy)
    layer.eval()
    layer(x)
    nbn.moments(x)
    y, mean, invstd = nbn.group_norm_forward(x, 2)
    nbn.group_norm_backward(dy, x, mean, invstd, 2)
    y, mean, invstd = nbn.layer_norm_forward(x, shape[1:])
    nbn.layer_norm_backward(dy, x, mean, invstd, shape[1:])
made = sorted(f"{name}.{attribute}" for name, module in list(sys.modules.items())
              if name.startswith("numba_bn") for attribute, value in vars(module).items()
              if isinstance(value, Callee) and "python_twin" in vars(value))
print("twins:", made)
"""


def test_the_package_calls_no_callee_from_python():
    code, output = run_child([sys.executable, "-c", PACKAGE_CALLS])
    assert code == 0, output
    assert "twins: []" in output, output


SHARED = """
import hashlib, sys
import numpy as np
from numba.core import event
from numba_bn import codecache
import numba_bn as nbn

compiled = []

class Compiles(event.Listener):
    def on_start(self, ev):
        pass

    def on_end(self, ev):
        compiled.append(ev.data["dispatcher"].py_func.__name__)

event.register("numba:compile", Compiles())
if sys.argv[2] == "edited":  # as if stats.py or a module of cpu/ had changed since the compile
    codecache.sources_digest = lambda: "another source"
rng = np.random.default_rng(int(sys.argv[3]))
x = (rng.standard_normal((64, 32)) * 3 + 2).astype(np.float32)
dy = rng.standard_normal((64, 32)).astype(np.float32)
if sys.argv[1] == "forward":
    nbn.forward_train(x)
else:
    mean, invstd = x.mean(axis=0), (1 / x.std(axis=0)).astype(np.float32)
    bits = hashlib.sha256(b"".join(a.tobytes() for a in nbn.backward(dy, x, mean, invstd)))
    print("bits", bits.hexdigest())
print("compiled", sorted(compiled))
"""


def test_a_driver_links_the_kernels_another_process_compiled_and_gives_their_bits(rng, tmp_path):
    """A callee's optimised IR is kept in Numba's cache: a later process's driver that calls it
    links the saved IR instead of compiling the kernel again (a compile-ahead worker, or the
    first backward after a run that compiled the forward), with the same bits as a driver whose
    process compiled every kernel; an entry of other sources is a miss, as a driver's is."""
    seed = str(rng.integers(2**31))

    def child(step, cache, sources="same"):
        env = {"NUMBA_CACHE_DIR": str(tmp_path / cache), "NUMBA_BN_COMPILE_AHEAD": "0"}
        status, output = run_child([sys.executable, "-c", SHARED, step, sources, seed], env)
        assert status == 0, output
        lines = dict(line.split(" ", 1) for line in output.splitlines()
                     if line.startswith(("bits ", "compiled ")))  # fmt: skip
        return lines.get("bits"), lines["compiled"]

    _, forward_compiled = child("forward", "shared")
    assert "parts" in forward_compiled and "elementwise_items" in forward_compiled
    linked_bits, linked_compiled = child("backward", "shared")
    own_bits, own_compiled = child("backward", "empty")
    # the kernels both steps call: compiled by the forward's process, not again
    assert "parts" in own_compiled and "elementwise_items" in own_compiled, own_compiled
    assert "parts" not in linked_compiled and "elementwise_items" not in linked_compiled
    # the backward's own: its driver and the kernels the forward does not call
    for name in ("_backward_split_rows_serial", "rows_dx", "rows_chunk_sums"):
        assert name in linked_compiled and name in own_compiled, (name, linked_compiled)
    assert linked_bits is not None and linked_bits == own_bits
    _, edited_compiled = child("forward", "shared", "edited")
    assert "parts" in edited_compiled and "elementwise_items" in edited_compiled


def test_a_callee_without_a_file_compiles_uncached():
    """Numba keys a cached function on its file: a callee written where there is none (`python
    -c`, a notebook cell) is compiled in each process instead, where njit(cache=True) raises."""
    scope = {"callee": callee}
    exec("@callee\ndef twice(a):\n    return 2.0 * a\n", scope)  # no file behind it
    twice = scope["twice"]

    @njit
    def outer(a):
        return twice(a) + 1.0

    assert outer(1.5) == 4.0
    assert type(twice._cache).__name__ == "NullCache"
