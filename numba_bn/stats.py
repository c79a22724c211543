"""Per-channel statistics as ``(count, mean, M2)``: a block statistic, a merge, a finalisation.

Every kernel, thread, GPU block, stream chunk and MPI rank combines statistics through
:func:`chan_merge`; nothing computes ``E[x^2] - E[x]^2``.

.. math::

    n = n_a + n_b,\\quad \\delta = \\bar x_b - \\bar x_a,\\quad
    \\bar x = \\bar x_a + \\delta\\,\\frac{n_b}{n},\\quad
    M_2 = M_{2,a} + M_{2,b} + \\delta^2\\,\\frac{n_a n_b}{n}

(Chan, Golub & LeVeque, 1979). A block small enough to stay in L1 gets its exact
``(count, mean, M2)`` from two vectorisable passes (sum, then squared deviations from the block
mean); a float32 block, which need not fit in L1, gets it from one pass over its deviations
from its first value, which float64 holds exactly (:func:`one_pass_exact`). Blocks are then
merged with the formula above in a fixed order, so results do not depend on the number of
threads.
"""

import contextlib
import functools
import math
import re
import threading
from types import FunctionType
from typing import NamedTuple

import llvmlite.binding as ll
import llvmlite.ir as llvm_ir
import numpy as np
from numba import _dynfunc, config, float64, njit, types, uint64
from numba.core import cgutils, compiler, ir_utils
from numba.core.caching import CompileResultCacheImpl, FunctionCache
from numba.core.codegen import JITCodeLibrary
from numba.core.registry import CPUDispatcher
from numba.extending import intrinsic

from .codecache import key_on_sources, lock_cache_saves

#: ``numba.njit`` for every kernel of the package: IEEE division (``error_model="numpy"``: x / 0
#: is inf or NaN) instead of a raised ZeroDivisionError. A compiled function must never raise:
#: Numba does not free the arrays of a nopython function that raises, and a kernel that has
#: written half its output cannot take it back. Errors are found in Python before a kernel runs.
kernel = functools.partial(njit, error_model="numpy")

#: The entry points Numba adds to every function it compiles: a Python one (unboxing each
#: argument) and a C one (for first-class function values).
_ENTRY_POINTS = ("no_cpython_wrapper", "no_cfunc_wrapper")


class _LinkedOnly(JITCodeLibrary):
    """The code library of a function whose code only runs linked into other functions' (a
    :func:`callee`'s, a :func:`strict_copy`): finalised (linked and optimised) without machine
    code of its own. Numba hands every finalised library to its JIT engine, which turns it into
    machine code; a callee's, never entered (no entry points, and a driver runs the copy linked
    into it), took ~0.3 s of a cold forward and as much of the backward and eval
    (benchmarks/README.md, "Stop 50"). Its callers link its optimised IR and make their own."""

    def _finalize_final_module(self):
        # Numba's, less adding the module to the JIT engine and making its machine code. That
        # also changed what callers linked: the engine's code generation rewrites a module's IR
        # in place (its IR-level passes), so they linked the rewritten IR; now the optimised
        # IR, and float64 statistics on planes moved by an ulp (the same in the C library)
        self._finalize_dynamic_globals()
        self._verify_declare_only_symbols()
        self._finalized = True


class _StrictCopy(_LinkedOnly):
    """The library of a :func:`strict_copy`: its IR is the kernel's as Numba optimised it, in
    the order that optimisation chose, and no pass may reorder it any more; its callers link it
    and optimise it with their own code. Optimised here first too, it took ~0.13 s of a cold
    forward's compile (``rows_chunk_stats``) and as much of the backward's."""

    def _optimize_functions(self, ll_module):
        ll_module.data_layout = self._codegen._data_layout

    def _optimize_final_module(self):
        pass


class _CalleeCompiler(compiler.Compiler):
    """Numba's pipeline, in a :class:`_LinkedOnly` library."""

    def compile_extra(self, func):
        if self.state.library is None:  # as Numba's lowering makes one
            self.state.library = _LinkedOnly(self.state.targetctx.codegen(), func.__qualname__)
            self.state.library.enable_object_caching()
        # this compile's own copy of the target context (compiler._make_subtarget)
        self.state.targetctx.get_executable = _linked_executable
        return super().compile_extra(func)


def _linked_executable(library, fndesc, env):
    """The target context's ``get_executable`` for a :class:`_LinkedOnly` library: the function
    object Numba registers for callers to find the callee by, without an entry point (as for
    any function without a Python wrapper: the address 0) and without writing the address of its
    environment into machine code there is none of (a code path that reads it, raising, is one
    no kernel takes)."""
    doc = f"compiled wrapper for {fndesc.qualname!r}"
    return _dynfunc.make_function(fndesc.lookup_module(), fndesc.qualname.split(".")[-1], doc, 0,
                                  env, (library,))  # fmt: skip


class _CalleeCacheImpl(CompileResultCacheImpl):
    """How Numba's on-disk cache keeps a callee's compile: its optimised IR (LLVM bitcode), what
    its callers link, where Numba keeps a function's machine code (a callee has none:
    :class:`_LinkedOnly`). A process that finds it compiles none of it: a compile-ahead worker
    whose parent compiled a kernel moments before (numba_bn.ahead), or a later process's first
    call of another driver that calls the kernel."""

    def reduce(self, cres):
        fndesc = cres.fndesc
        fndesc.typemap = fndesc.calltypes = None  # as CompileResult._reduce (not picklable)
        return (cres.library.serialize_using_bitcode(), fndesc, cres.environment,
                cres.signature, cres.objectmode, cres.lifted, str(cres.type_annotation),
                cres.reload_init, tuple(cres._find_referenced_environments()))  # fmt: skip

    def rebuild(self, target_context, payload):
        """CompileResult._rebuild, with a :class:`_LinkedOnly` library of the saved IR."""
        (name, _, bitcode), fndesc, env, signature, objectmode, lifted, typeann = payload[:7]
        reload_init, referenced_envs = payload[7:]
        for init in reload_init or ():
            init()
        library = _LinkedOnly(target_context.codegen(), name)
        library._final_module = ll.parse_bitcode(bitcode)
        library._finalize_final_module()
        return compiler.CompileResult(
            target_context=target_context, typing_context=target_context.typing_context,
            library=library, environment=env, entry_point=_linked_executable(library, fndesc, env),
            fndesc=fndesc, type_annotation=typeann, signature=signature, objectmode=objectmode,
            lifted=lifted, typing_error=None, call_helper=None, metadata=None,
            reload_init=reload_init, referenced_envs=referenced_envs,
        )  # fmt: skip


class _CalleeCache(FunctionCache):
    _impl_class = _CalleeCacheImpl


class Callee(CPUDispatcher):
    """The dispatcher of a :func:`callee`: its compiled functions have no entry points, and a
    call from Python runs :attr:`python_twin` instead (Numba's own dispatch would call the
    missing entry point: the process dies of a segmentation fault)."""

    def __call__(self, *args, **kwargs):
        return self.python_twin(*args, **kwargs)

    @functools.cached_property
    def python_twin(self):
        """The same function compiled with Numba's entry points, as :data:`kernel` compiles it:
        what a call from Python runs (the tests', the CUDA simulator's). The package calls no
        callee from Python (tests/test_callee.py holds it to that), so its processes never make
        one."""
        options = {k: v for k, v in self.targetoptions.items()
                   if k not in _ENTRY_POINTS and k != "nopython"}  # fmt: skip
        return kernel(**options)(self.py_func)


def callee(function=None, **options):
    """:data:`kernel` for a function only compiled code calls (a driver, a range driver of the C
    library, another kernel): compiled without Numba's entry points, which a call from compiled
    code does not use. Numba compiles the kernels a driver calls as functions of their own, each
    with its entry points, optimised and turned into machine code for a process that never
    enters them: ~0.3 s of a cold first forward's ~4.3 (benchmarks/README.md, stop 44). Nor is
    a callee turned into machine code of its own (:class:`_LinkedOnly`): its callers link its
    optimised IR. A call from Python still works (:class:`Callee`). ``inline="always"`` kernels
    need no such care: they are never compiled on their own.

    Numba's on-disk cache keeps that IR (:class:`_CalleeCacheImpl`), keyed on the kernels'
    sources as the drivers are (numba_bn.codecache): a process whose driver calls a kernel
    another process compiled links the saved IR (the same bits) instead of compiling it."""
    if config.DISABLE_JIT:
        make = kernel(**options)
    else:  # the options njit gives a dispatcher (kernel's among them), without entry points
        options = {"nopython": True, "boundscheck": None, **kernel.keywords, **options,
                   **dict.fromkeys(_ENTRY_POINTS, True)}  # fmt: skip

        def make(function):
            dispatcher = Callee(py_func=function, locals={}, targetoptions=options,
                                pipeline_class=_CalleeCompiler)  # fmt: skip
            # Numba's enable_caching, for its IR; not cached without a file to key it on (a
            # function of `python -c` or a notebook cell, where njit(cache=True) raises)
            with contextlib.suppress(RuntimeError):
                dispatcher._cache = _CalleeCache(function)
            key_on_sources(dispatcher)
            lock_cache_saves(dispatcher)
            return dispatcher

    return make if function is None else make(function)


# Reductions may be reassociated (that is what lets LLVM vectorise them); NaN/Inf semantics are
# kept so that NaN checks survive. Elementwise code takes no fast-math flag at all: the
# compensated ``(x - mean_hi) - mean_lo`` must not be folded back into ``x - (mean_hi +
# mean_lo)``, and a contraction left to the optimiser (FMA or not) may be decided differently in
# each compilation of the same kernel; the passes are memory-bound, so exact IEEE costs nothing.
REDUCE_FASTMATH = {"reassoc", "contract", "nsz"}
CONTRACT_FASTMATH = set()


# The fast-math flags of an instruction in LLVM IR text, after its opcode (strict_copy).
_FAST_MATH_FLAGS = re.compile(
    r"\b(fadd|fsub|fmul|fdiv|frem|fneg|fcmp|call|phi|select)"
    r"((?: (?:fast|reassoc|nnan|ninf|nsz|arcp|contract|afn))+)(?= )"
)


def _contract_only(match):
    """An instruction's opcode with, of its fast-math flags, only ``contract`` (``fast``
    includes it)."""
    flags = match.group(2).split()
    return match.group(1) + (" contract" if "contract" in flags or "fast" in flags else "")


_strict_copies = {}  # id(kernel's library) -> (its strict copy, the name it defines, the library)
_strict_lock = threading.Lock()


def strict_copy(context, compiled):
    """(library, symbol): ``compiled``'s function (a REDUCE_FASTMATH kernel), as Numba optimised
    it, under a name of its own and without the fast-math flags that reorder (``contract``
    stays: the backend fuses a multiply and the add it feeds into one FMA where they stand, and
    without reordering they stand alike in every copy; without it a statistics pass ran up to
    20% slower). The reductions run 2-6% slower than the reassociating copies did
    (benchmarks/README.md, "Strict kernel copies").

    The flags let LLVM choose a reduction's order once, when the kernel is optimised on its own
    (vectorised, with its lanes added in the order it chose). Without them no later pass may
    reorder a floating-point operation: the copy linked into each caller, optimised again there,
    and the C library's build of it compute the same values in the same order. With them, the
    caller's passes reassociated the linked copy another way, and which code ran depended on
    where the driver came from: the process that compiled it bound the call to the kernel's own
    function (a symbol it had already), one that loaded it from Numba's cache (or the C library)
    ran the copy, and float64 sums over planes came out a few ulp apart (benchmarks/README.md,
    "Compiled calls"). Its own name keeps every call on the strict copy.
    """
    key = id(compiled.library)
    with _strict_lock:
        hit = _strict_copies.get(key)
        if hit is not None:
            return hit[:2]
        text, symbol = strict_ir(compiled)
        library = _StrictCopy(context.codegen(), f"strict.{compiled.library.name}")
        library.add_llvm_module(ll.parse_assembly(text))
        library.finalize()
        _strict_copies[key] = library, symbol, compiled.library  # keeps the key's object alive
        return library, symbol


def strict_ir(compiled):
    """(IR text, symbol) of :func:`strict_copy`'s module: ``compiled``'s optimised module with
    its function renamed ``symbol`` and without the fast-math flags that reorder."""
    name = compiled.fndesc.mangled_name
    text = str(compiled.library._get_module_for_linking())
    symbol = "strict." + name
    text = re.sub(rf'@(")?{re.escape(name)}(?(1)")(?=[\s(,)])', f'@"{symbol}"', text)
    # defined (external) here, linked into callers as linkonce_odr; the module's other
    # functions (Numba's wrappers of the kernel) stay linkonce_odr, unused, and are dropped
    text = re.sub(rf'^define linkonce_odr (.*@"{re.escape(symbol)}"\()', r"define \1", text,
                  flags=re.MULTILINE)  # fmt: skip
    return _FAST_MATH_FLAGS.sub(_contract_only, text), symbol


@intrinsic
def apart(typingctx, function, arguments):
    """``function(*arguments)`` through a call LLVM may not inline (a ``noinline`` call site),
    to the kernel's :func:`strict_copy`.

    Every call of a REDUCE_FASTMATH kernel goes through it. Reassociation lets LLVM choose a
    reduction's order, and it chooses it where the loop ends up: inlined into two callers
    (a channel's fused item and a segment's split item, a serial and a parallel twin, the C
    library's range drivers), the same kernel was vectorised two ways and summed the same
    values in two orders (the C library's x86-64-v2 build: other backward bits for 1 and 2
    threads). Called apart, a kernel is one function, optimised on its own, whatever calls it:
    one order, so the bits cannot depend on the partition, the process or the build. A call
    costs ~10 ns; each sums a segment or a chunk of rows.

    ``function`` may be a :class:`ByWidth` pair: the copy of the first argument's dtype.
    """
    if not isinstance(arguments, types.BaseTuple):
        return None
    kernel_type = function
    if getattr(function, "instance_class", None) is ByWidth and len(arguments) > 0:
        bits = getattr(getattr(arguments.types[0], "dtype", None), "bitwidth", None)
        if bits is None:
            return None
        kernel_type = function.types[0 if one_pass_exact(bits) else 1]
    if not isinstance(kernel_type, types.Dispatcher):
        return None
    signature = typingctx.resolve_function_type(kernel_type, tuple(arguments.types), {})
    if signature is None:
        return None

    def codegen(context, builder, sig, args):
        compiled = kernel_type.dispatcher.overloads[signature.args]
        library, symbol = strict_copy(context, compiled)
        given = cgutils.unpack_tuple(builder, args[1])
        values = [context.cast(builder, value, given_type, param_type)
                  for value, given_type, param_type
                  in zip(given, arguments.types, signature.args, strict=True)]  # fmt: skip
        fndesc = compiled.fndesc  # declared as context.declare_function does, by its new name
        callee = cgutils.get_or_insert_function(
            builder.module, context.call_conv.get_function_type(fndesc.restype, fndesc.argtypes),
            symbol,
        )  # fmt: skip
        context.apply_target_attributes(callee, fndesc.argtypes, fndesc.restype)
        context.call_conv.decorate_function(callee, fndesc.args, fndesc.argtypes,
                                            noalias=fndesc.noalias)  # fmt: skip
        status, result = context.call_conv.call_function(
            builder, callee, fndesc.restype, fndesc.argtypes, values, attrs=("noinline",)
        )  # fmt: skip
        with cgutils.if_unlikely(builder, status.is_error):  # kernels never raise; as Numba does
            context.call_conv.return_status_propagate(builder, status)
        context.add_linking_libs([library])
        return context.cast(builder, result, compiled.fndesc.restype, signature.return_type)

    return signature.return_type(function, arguments), codegen


def _integer_choice(a, b, order):
    """The typing of :func:`imin` (``order`` "<") and :func:`imax` (">"): two integers of one
    signedness (literals too) compared as intp or uintp; None (a typing error) otherwise."""
    if not (isinstance(a, types.Integer) and isinstance(b, types.Integer) and a.signed == b.signed):
        return None
    common = types.intp if a.signed else types.uintp

    def codegen(context, builder, sig, args):
        x, y = (context.cast(builder, v, t, common) for v, t in zip(args, sig.args, strict=True))
        compare = builder.icmp_signed if common.signed else builder.icmp_unsigned
        return builder.select(compare(order, x, y), x, y)

    return common(a, b), codegen


@intrinsic
def imin(typingctx, a, b):
    """``min(a, b)`` of two integers, as one ``select`` in the caller's code. Numba's ``min``
    and ``max`` are overloads whose implementations compile as functions of their own, once per
    set of the caller's options: three or four per cold driver, ~25 ms each, on every first
    call's path (benchmarks/README.md, "Stop 53")."""
    return _integer_choice(a, b, "<")


@intrinsic
def imax(typingctx, a, b):
    """``max(a, b)`` of two integers (:func:`imin`)."""
    return _integer_choice(a, b, ">")


@intrinsic
def overflow_limit(typingctx, values):
    """``np.finfo(dtype).max * np.finfo(dtype).eps * 0.125`` for the dtype of the array
    ``values``, as a float64 constant (the product is exact in the dtype: a power of two times
    max's significand): :func:`prescale`'s threshold. ``np.finfo`` in compiled code compiles
    two implementations of its own per dtype, ~75 ms of each cold driver."""
    if not isinstance(values, types.Array) or not isinstance(values.dtype, types.Float):
        return None
    info = np.finfo(np.dtype(str(values.dtype)))
    limit = float(info.max * info.eps) * 0.125

    def codegen(context, builder, sig, args):
        return context.get_constant(types.float64, limit)

    return types.float64(values), codegen


@intrinsic
def empty(typingctx, shape, dtype):
    """``np.empty(shape, dtype)`` (a tuple of integers; x.dtype or a NumPy scalar type) as
    Numba's own allocates it, in the caller's code. ``np.empty`` is an overload whose
    implementation compiles as a function of its own for each shape type and dtype, three or
    four per cold driver (~0.03-0.08 s each; benchmarks/README.md, "Stop 53").

    In a function compiled without Numba's runtime (``_nrt=False``: the drivers,
    :func:`numba_bn.cpu.drivers.twins`) the memory comes from the runtime's allocator all the
    same, but nothing counts references to it: :func:`release` frees it, on every path out of
    the function, and no view of it may be released in its place."""
    # Numba's own pieces of np.empty, imported as a compile needs them (as Numba loads them)
    from numba.core.typing.npydecl import parse_dtype, parse_shape
    from numba.np.arrayobj import _empty_nd_impl, _parse_shape

    ndim, element = parse_shape(shape), parse_dtype(dtype)
    if ndim is None or element is None:
        return None
    array = types.Array(element, ndim, "C")

    def codegen(context, builder, sig, args):
        sizes = _parse_shape(context, builder, sig.args[0], args[0])
        if not context.enable_nrt:
            return _unmanaged_empty(context, builder, array, sizes)
        return _empty_nd_impl(context, builder, array, sizes)._getvalue()

    return array(shape, dtype), codegen


def _c_strides(builder, itemsize, sizes):
    """The strides (LLVM integers) of a C-contiguous array of ``sizes`` and ``itemsize``."""
    if not sizes:  # a 0-d array
        return []
    strides = [itemsize]
    for size in reversed(sizes[1:]):
        strides.insert(0, builder.mul(strides[0], size))
    return strides


def _runtime_function(builder, name, result, arguments):
    """The C function ``name`` of Numba's runtime (registered with LLVM as ``NRT_`` + its
    helper's name: numba.core.runtime.nrt), declared in the module being built."""
    return cgutils.get_or_insert_function(
        builder.module, llvm_ir.FunctionType(result, arguments), name
    )


def _unmanaged_empty(context, builder, array_type, sizes):
    """:func:`empty`'s array (C-contiguous, of LLVM integer ``sizes``) in a function without
    Numba's runtime: a MemInfo of the runtime's allocator, aligned as Numba aligns arrays, whose
    reference count stays 1 (the function counts no references) until :func:`release`."""
    from numba.np.arrayobj import make_array, populate_array

    data_type = context.get_data_type(array_type.dtype)
    itemsize = context.get_constant(types.intp, context.get_abi_sizeof(data_type))
    strides = _c_strides(builder, itemsize, sizes)
    nbytes = builder.mul(strides[0], sizes[0]) if sizes else itemsize  # a 0-d array: one item
    pointer, intp = cgutils.voidptr_t, context.get_value_type(types.intp)
    allocate = _runtime_function(builder, "NRT_MemInfo_alloc_aligned", pointer,
                                 [intp, llvm_ir.IntType(32)])  # fmt: skip
    data_of = _runtime_function(builder, "NRT_MemInfo_data", pointer, [pointer])
    align = context.get_preferred_array_alignment(array_type.dtype)
    meminfo = builder.call(allocate, [nbytes, llvm_ir.Constant(llvm_ir.IntType(32), align)])
    # a MemoryError, as np.empty's (Numba's runtime raises it the same way)
    cgutils.guard_memory_error(context, builder, meminfo, "Allocation failed (probably too large).")
    array = make_array(array_type)(context, builder)
    populate_array(array, data=builder.bitcast(builder.call(data_of, [meminfo]),
                                               data_type.as_pointer()),
                   shape=cgutils.pack_array(builder, sizes, ty=intp),
                   strides=cgutils.pack_array(builder, strides, ty=intp), itemsize=itemsize,
                   meminfo=meminfo)  # fmt: skip
    return array._getvalue()


@intrinsic
def release(typingctx, array):
    """Free an array that :func:`empty` made in a function without Numba's runtime (nothing
    else frees it there); with the runtime, nothing (its reference count frees it). An array
    without a MemInfo (an argument of such a function, a :func:`borrowed` view) is left alone;
    a view that shares one (a slice of the array) must not be released in its place."""
    if not isinstance(array, types.Array):
        return None

    def codegen(context, builder, sig, args):
        if not context.enable_nrt:
            meminfo = _array(context, builder, sig.args[0], args[0]).meminfo
            destroy = _runtime_function(builder, "NRT_MemInfo_call_dtor",
                                        llvm_ir.VoidType(), [cgutils.voidptr_t])  # fmt: skip
            with builder.if_then(cgutils.is_not_null(builder, meminfo)):
                builder.call(destroy, [meminfo])
        return context.get_dummy_value()

    return types.none(array), codegen


def _array(context, builder, array_type, value):
    """The fields of the array ``value`` of ``array_type`` (Numba's struct proxy)."""
    return cgutils.create_struct_proxy(array_type)(context, builder, value=value)


def _borrowed_view(context, builder, source, view_type, shape, strides):
    """A view of the array ``source`` (:func:`_array`) as ``view_type`` with ``shape`` and
    ``strides`` (LLVM arrays), holding no reference to its memory."""
    view = cgutils.create_struct_proxy(view_type)(context, builder)
    view.meminfo = cgutils.get_null_value(view.meminfo.type)
    view.parent = cgutils.get_null_value(view.parent.type)
    view.nitems, view.itemsize, view.data = source.nitems, source.itemsize, source.data
    view.shape, view.strides = shape, strides
    return view._getvalue()


@intrinsic
def borrowed(typingctx, array):
    """``array`` as a view that holds no reference to its memory (a null meminfo), so that
    Numba's reference counting of it tests a null pointer and returns, as it does for the C
    library's ``carray`` views (numba_bn/capi/ranges.py).

    Numba counts a reference (an atomic add on the array's meminfo, in ``NRT_incref`` and
    ``NRT_decref``, called out of line) each time an array is bound to a name, and a kernel
    inlined into a loop binds each of its array arguments anew in every iteration. Numba's
    pruning pass leaves most of these in loops: the serial backward of an (8, 16, 8, 8) batch
    made 119 increfs and 131 decrefs a call, ~0.8 us of its 4.4 (benchmarks/README.md, "Stop
    55").

    A borrowed view must not outlive its array, and Numba drops a name's reference right after
    the last expression that uses it: in ``f(borrowed(a))`` that is ``borrowed(a)`` itself,
    before ``f`` runs, and an array made in the function is freed there. Take a view only where
    something else is sure to hold the array: inside a loop that uses the array in every
    iteration (held until the loop ends; Numba's parfor pass hoists out of a ``prange`` loop
    only calls it knows to be pure), or of a function's own argument when the function is
    called, not inlined (a driver, a :func:`callee`: its caller holds the argument for the
    call). Nothing may keep a view: a driver returns no arrays and stores none.
    tests/test_numerics.py runs every step where glibc fills freed memory with a pattern
    (``MALLOC_PERTURB_``): the channel items' views of their partials, passed to a callee
    outside a loop, read it (stop 55)."""
    if not isinstance(array, types.Array):
        return None

    def codegen(context, builder, sig, args):
        source = _array(context, builder, sig.args[0], args[0])
        return _borrowed_view(context, builder, source, sig.return_type, source.shape,
                              source.strides)  # fmt: skip

    return array(array), codegen


def _reshaped(context, builder, source, view_type, sizes):
    """:func:`_borrowed_view` with the C-contiguous strides of ``sizes`` (LLVM integers)."""
    itemsize = context.get_constant(types.intp, context.get_abi_sizeof(
        context.get_data_type(view_type.dtype)))  # fmt: skip
    strides = _c_strides(builder, itemsize, sizes)
    return _borrowed_view(context, builder, source, view_type, cgutils.pack_array(builder, sizes),
                          cgutils.pack_array(builder, strides))  # fmt: skip


@intrinsic
def flat(typingctx, array):
    """``array.reshape(array.size)`` of a C-contiguous ``array``, :func:`borrowed`: the flat
    values the items take. Numba's reshape calls into its helper library for every view."""
    if not isinstance(array, types.Array) or array.layout != "C":
        return None
    view_type = array.copy(ndim=1, layout="C")

    def codegen(context, builder, sig, args):
        source = _array(context, builder, sig.args[0], args[0])
        return _reshaped(context, builder, source, view_type, [source.nitems])

    return view_type(array), codegen


@intrinsic
def shaped(typingctx, array, shape):
    """``array.reshape(shape)`` of a C-contiguous ``array`` (a tuple of integers whose product
    is its size, unchecked), :func:`borrowed`: the rows of a flat item's values."""
    if not isinstance(array, types.Array) or array.layout != "C":
        return None
    return _shaped(array, shape)


@intrinsic
def shaped_when_plain(typingctx, array, shape):
    """:func:`shaped`, typed for an ``array`` of any layout, for code that reaches it for a
    C-contiguous one only: a front (numba_bn/cpu/fronts.py) declines another layout by a
    constant test first, but Numba types every branch, and :func:`shaped` refuses the layout
    (the front failed to compile where it should decline). The view it would make of another
    layout is wrong, and never made."""
    if not isinstance(array, types.Array):
        return None
    return _shaped(array, shape)


def _shaped(array, shape):
    """The signature and code generator of :func:`shaped` (a C-contiguous view of ``array``'s
    memory)."""
    if not isinstance(shape, types.UniTuple) or not isinstance(shape.dtype, types.Integer):
        return None
    view_type = array.copy(ndim=shape.count, layout="C")

    def codegen(context, builder, sig, args):
        sizes = [context.cast(builder, size, shape.dtype, types.intp)
                 for size in cgutils.unpack_tuple(builder, args[1])]  # fmt: skip
        return _reshaped(context, builder, _array(context, builder, sig.args[0], args[0]),
                         view_type, sizes)  # fmt: skip

    return view_type(array, shape), codegen


def _aliases_its_array(view, arguments, alias_map, arg_aliases):
    """How Numba's alias analysis learns that the result of :func:`borrowed`, :func:`flat` and
    :func:`shaped` is their array: without it, the parfor passes took a store through the view
    for a store to a fresh array nothing reads, and removed it (the parallel twins' partials
    were never written)."""
    ir_utils._add_alias(view, arguments[0].name, alias_map, arg_aliases)


for _view in (borrowed, flat, shaped, shaped_when_plain):
    ir_utils.alias_func_extensions[(_view.__name__, __name__)] = _aliases_its_array


@kernel(inline="always")
def chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Merge two ``(count, mean, M2)`` states; counts are floats so any size fits."""
    count = count_a + count_b
    if count_b == 0.0:
        return count_a, mean_a, m2_a
    if count_a == 0.0:
        return count_b, mean_b, m2_b
    delta = mean_b - mean_a
    frac_b = count_b / count
    mean = mean_a + delta * frac_b
    m2 = m2_a + m2_b + delta * delta * count_a * frac_b
    return count, mean, m2


@kernel(inline="always")
def four_runs(start, stride, quad):
    """The first indices (unsigned) of runs 4 * quad ... 4 * quad + 3 of a block."""
    a = uint64(start + 4 * quad * stride)
    return a, a + uint64(stride), a + uint64(2 * stride), a + uint64(3 * stride)


def one_pass_exact(bits):
    """Whether a block of values of ``bits`` bits takes its ``(mean, M2)`` in one pass (the
    :func:`by_width` copy a reduction of such values runs).

    For float32 (and narrower) values, x - K and its square are exact in float64 for K one of
    the block's values (its first), and one pass sums them: mean = K + S1 / n and
    M2 = S2 - S1 * S1 / n. As K is one of the n values, (mean - K)^2 <= M2, so S2 <= (n + 1) M2:
    the subtraction costs at most log2(n + 1) of float64's 53 bits (10 for a rows block of 1024,
    12 for a planes block of 4096; one on typical data), which float32 statistics never see. It
    reads the block once and does four vector operations per eight values instead of five
    (benchmarks/README.md, "One pass over a float32 block"). In float64 the deviations are
    rounded and that bound would count: float64 keeps the two passes (the sum, then squared
    deviations from the block mean).
    """
    return bits <= 32


#: The body a :func:`by_width` copy compiles, read by its template as a global: True in the
#: copy for values :func:`one_pass_exact` takes in one pass, False in the other. None here, in
#: the templates' own globals (no template is compiled).
ONE_PASS = None


class ByWidth(NamedTuple):
    """A reduction kernel as two copies (:func:`by_width`): ``narrow`` for values of 32 bits or
    fewer (one pass), ``wide`` for float64 (two). :func:`apart` calls the copy of its first
    argument's dtype, and so does a call from Python (the tests')."""

    narrow: object
    wide: object

    def __call__(self, values, *arguments):
        copy = self.narrow if one_pass_exact(values.dtype.itemsize * 8) else self.wide
        return copy(values, *arguments)


def renamed_copy(template, suffix, scope):
    """``template`` under its name + ``suffix`` (Numba's on-disk cache keys on it) with the
    globals ``scope``: the drivers' twins and loop nests (:mod:`.cpu.drivers`), the copies of
    :func:`by_width`."""
    copy = FunctionType(
        template.__code__, scope, template.__name__ + suffix, template.__defaults__,
        template.__closure__,
    )  # fmt: skip
    copy.__qualname__ = template.__qualname__ + suffix
    copy.__doc__ = template.__doc__
    return copy


def by_width(**options):
    """Decorator: a :func:`callee` (with ``options``) whose first argument's dtype decides one
    branch, ``if ONE_PASS:``, compiled as two copies (:class:`ByWidth`), each with its own
    :data:`ONE_PASS`. Numba prunes a branch on a global constant before typing, so a copy types,
    lowers and optimises its own body alone: with the branch decided by an intrinsic of the
    dtype, both bodies were typed and lowered before LLVM dropped one (``rows_chunk_stats``:
    0.73-0.82 s of a cold (64, 32) step's compile, 0.34-0.45 as copies; benchmarks/README.md,
    "Stop 59"). An ``overload`` choosing the body, inlined, took as long; not inlined, it compiled
    the chosen body apart too (+0.25 s).

    A copy takes the template's module globals as they are when it is made (the names it
    reads must be defined above it), and its own name (Numba's on-disk cache keys on it)."""

    def make(template):
        def copy(one_pass, suffix):
            scope = {**template.__globals__, "ONE_PASS": one_pass}
            return callee(**options)(renamed_copy(template, suffix, scope))

        return ByWidth(copy(True, "_one_pass"), copy(False, "_two_pass"))

    return make


@kernel(inline="always")
def _runs_one_pass(values, start, length, stride, runs):
    n, quads = uint64(length), runs // 4
    shift = np.float64(values[uint64(start)])
    s1 = 0.0
    s2 = 0.0
    for q in range(quads):
        a, b, c, d = four_runs(start, stride, q)
        for i in range(n):
            d0, d1 = values[a + i] - shift, values[b + i] - shift
            d2, d3 = values[c + i] - shift, values[d + i] - shift
            s1 += (d0 + d1) + (d2 + d3)
            s2 += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
    for k in range(4 * quads, runs):
        first = uint64(start + k * stride)
        for i in range(first, first + n):
            dev = values[i] - shift
            s1 += dev
            s2 += dev * dev
    count = float(runs * length)
    offset = s1 / count
    return count, shift + offset, s2 - s1 * offset


@kernel(inline="always")
def _runs_two_pass(values, start, length, stride, runs):
    n, quads = uint64(length), runs // 4
    total = 0.0
    for q in range(quads):
        a, b, c, d = four_runs(start, stride, q)
        for i in range(n):
            total += (np.float64(values[a + i]) + values[b + i]) + (
                np.float64(values[c + i]) + values[d + i]
            )
    for k in range(4 * quads, runs):
        first = uint64(start + k * stride)
        for i in range(first, first + n):
            total += values[i]
    count = float(runs * length)
    mean = total / count
    m2 = 0.0
    for q in range(quads):
        a, b, c, d = four_runs(start, stride, q)
        for i in range(n):
            d0, d1 = values[a + i] - mean, values[b + i] - mean
            d2, d3 = values[c + i] - mean, values[d + i] - mean
            m2 += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
    for k in range(4 * quads, runs):
        first = uint64(start + k * stride)
        for i in range(first, first + n):
            dev = values[i] - mean
            m2 += dev * dev
    return count, mean, m2


@by_width(fastmath=REDUCE_FASTMATH)
def runs_stats(values, start, length, stride, runs):
    """Exact ``(count, mean, M2)`` of a block of 1-D ``values``, accumulated in float64.

    The block is ``runs`` runs of ``length`` values, run k starting at ``start + k * stride``
    (one piece of a long plane, or several short planes of one channel), small enough to stay
    in L1: one pass or two (:func:`one_pass_exact`, a copy each: :func:`by_width`). Each pass
    takes four runs at a time, position by position (then the runs left one by one): the
    vectorised loop ends in one horizontal sum per four runs, not per run, which on planes of 64
    values cost as much as the run itself. Indices are unsigned: with a signed index of unknown
    sign Numba wraps negative indices around, which stops LLVM from vectorising the loop
    (measured 4x slower).
    """
    if runs * length <= 0:
        return 0.0, 0.0, 0.0
    if ONE_PASS:
        return _runs_one_pass(values, start, length, stride, runs)
    return _runs_two_pass(values, start, length, stride, runs)


@kernel(inline="always")
def finalize(count, m2, eps):
    """``(count, M2)`` -> invstd = 1 / sqrt(M2 / count + eps): the biased variance
    normalises (the unbiased one only enters PyTorch's running variance, running_update)."""
    return 1.0 / math.sqrt(m2 / count + eps)


@kernel
def invstd_of(count, m2, eps, invstd):
    """invstd (=) of every channel from its M2: :func:`finalize`, channel by channel."""
    for c in range(m2.size):
        invstd[c] = finalize(count, m2[c], eps)


@kernel
def running_update(running_mean, running_var, count, mean, m2, momentum, unbiased):
    """r = (1 - momentum) * r + momentum * batch, every channel; momentum weights the new batch
    (PyTorch's meaning; conventions.py converts Keras', Flax's and ONNX'). The batch variance is
    the unbiased M2 / (count - 1) (PyTorch) or the biased M2 / count (Keras, Flax, ONNX)."""
    for c in range(mean.size):
        running_mean[c] = running_step(running_mean[c], mean[c], momentum)
        running_var[c] = running_step(
            running_var[c], batch_variance(count, m2[c], unbiased), momentum
        )


class RunningUpdate(NamedTuple):
    """The running buffers a training forward updates in place, and how (:func:`running_update`):
    ``momentum`` weighs the new batch, ``unbiased`` picks the batch variance."""

    mean: object
    var: object
    momentum: float
    unbiased: bool


def no_running_update(dtype):
    """Zero-length buffers: what the kernels take for "no running update" (one per dtype is
    enough: with no elements they hold nothing to share; numba_bn.cpu keeps one each)."""
    return RunningUpdate(np.empty(0, dtype), np.empty(0, dtype), 0.0, True)


# Scalar pieces of running_update, which the CUDA kernels call too (the simulator cannot pass
# its arrays to an njit function, scalars it can).
@kernel(inline="always")
def running_step(running, batch, momentum):
    """One running value: (1 - momentum) * running + momentum * batch."""
    return (1.0 - momentum) * running + momentum * batch


@kernel(inline="always")
def batch_variance(count, m2, unbiased):
    """The batch variance a running update takes: unbiased (PyTorch) or biased."""
    return m2 / (count - 1.0) if unbiased else m2 / count


@kernel(inline="always")
def split_hi_lo(value, out, row, index):
    """Store ``value`` (float64) as ``hi + lo`` in ``out[row, index]`` and ``out[row + 1, index]``.

    ``(x - hi) - lo`` then equals ``x - value`` to float64 accuracy for x close to the mean, which
    keeps float32 outputs exact when the mean is large against the spread (mean 1e4, std 1e-2).
    """
    out[row, index] = value
    out[row + 1, index] = value - np.float64(out[row, index])


# The elementwise passes read per-channel coefficients in the tensor dtype, one row each:
#   affine (AFFINE_ROWS): mean_hi, mean_lo, scale, shift, pre
#       y = (x * pre - mean_hi) * scale + shift, shift with mean_lo folded in (folded_shift):
#       the pass does not read row 1
#   dx (DX_ROWS): mean_hi, mean_lo, proj, mean_dy, k, pre  (terms: see cpu/kernels.py dx_range)
#       mean_lo folded into mean_dy the same way (by proj); the pass does not read row 1
# mean_hi + mean_lo is mean * pre to float64 accuracy (split_hi_lo). ``pre`` is 1 except in a
# channel whose ``x - mean`` can overflow the dtype: there it is 1/4, so that
# ``x * pre - mean * pre`` stays finite; scaling by a power of two is exact, and scale (or proj)
# carries 1 / pre, so the result is the same.
AFFINE_ROWS = 5
DX_ROWS = 6


@kernel(inline="always")
def folded_shift(shift, mean_lo, scale):
    """The affine's shift with ``mean_lo`` folded in, ``shift - mean_lo * scale`` (float64, of
    the coefficients as the tensor dtype holds them): y = ((x * pre - mean_hi) - mean_lo) *
    scale + shift becomes (x * pre - mean_hi) * scale + folded shift, one coefficient row fewer
    for the elementwise pass to load (12-23% of a large pass's time, benchmarks/README.md).
    dx's rows fold it into term 2 the same way: ``mean_dy - mean_lo * proj``.

    As accurate: ``x * pre - mean_hi`` is computed as before (exact for x near the mean), and
    the rounding of ``(x - mean_hi) - mean_lo`` is traded for the rounding of this one value,
    half an ulp of the shift; without a bias that is half an ulp of ``mean_lo * scale``, which
    is far below an ulp of y. A zero ``mean_lo`` (float32 running statistics in eval, and
    float64 means a float64 tensor holds exactly) leaves the shift as it is, so an infinite
    scale (eval with eps = 0 and a zero variance) still gives the IEEE +-inf/NaN of
    (x - mean) * inf rather than NaN everywhere. The CUDA coefficients call this too."""
    if mean_lo == 0:
        return float64(shift)
    return float64(shift) - float64(mean_lo) * float64(scale)


@kernel(inline="always")
def prescale(mean, coef):
    """``pre`` for a channel normalised around ``mean``, in the dtype of ``coef``.

    Any |x| is at most the dtype's maximum, so ``x - mean`` can overflow only when |mean| comes
    within an ulp of it: below a quarter ulp (max * eps / 8) the difference rounds to at most
    the maximum, whatever x. Beyond, x / 4 - mean / 4 cannot overflow.
    """
    return 0.25 if abs(mean) >= overflow_limit(coef) else 1.0


@kernel(cache=True)
def first_negative(values):
    """The index of the first value below zero (a corrupted running variance), or -1: the
    check a plain call makes in one compiled loop instead of NumPy reductions."""
    for i in range(values.size):
        if values[i] < 0:
            return i
    return -1


@kernel(cache=True)
def merge_moments(count_a, mean_a, m2_a, count_b, mean_b, m2_b, mean, m2):
    """mean, m2 (=) per channel of two ``(count, mean, M2)`` states, each channel through
    :func:`chan_merge`; returns the merged count."""
    for c in range(mean.size):
        _, mean[c], m2[c] = chan_merge(count_a, mean_a[c], m2_a[c], count_b, mean_b[c], m2_b[c])
    return count_a + count_b


lock_cache_saves(first_negative)
lock_cache_saves(merge_moments)
