"""Build ``libnumba_bn.so`` (the C ABI of csrc/numba_bn.h) from the library's Numba kernels.

Steps, run by :func:`build_plugin` (``numba-bn build-plugin --out DIR``):

1. One child Python process per target CPU (concurrently), with ``NUMBA_CPU_NAME`` set to that
   CPU and ``NUMBA_CPU_FEATURES=""`` (the host's features must not leak into a portable build),
   compiles the serial range drivers of :mod:`.ranges` as ``@cfunc`` for float32 and float64,
   through Numba's own pipeline as its JIT would for that CPU, so the code matches the JIT
   backend's. A fresh ``NUMBA_CACHE_DIR``: a cache hit gives a module without IR.
2. Each function gets a small wrapper that calls Numba's inner function (not the cfunc wrapper,
   which reports exceptions through the Python C API) and returns 0 or 1; the wrappers go into
   a table of function pointers (``nbn_kernels_<cpu>``); everything else is made internal, and
   llvmlite re-optimises the module for the target CPU (dropping the Python and runtime paths
   nothing calls any more) and emits an object file.
3. The system C compiler links the objects with the C shim (csrc/nbn_shim.c), which checks
   arguments, runs the drivers on pthreads and picks a table at load time for the CPU it runs on,
   and with the two Numba runtime functions the kernels reference (csrc/nbn_numba_runtime.c).
   The shim declares the tables through ``nbn_kernels.h``, generated from the annotations of
   :mod:`.ranges` into the build's temporary directory; ``numba-bn build-plugin --out DIR
   --header-only`` writes the same header to DIR, to read (nothing is compiled).
4. When Python's headers are there, the compiled calls (csrc/nbn_python.c, :mod:`.calls`): a
   CPython extension next to the library, which takes its entry points from ctypes at run time
   (it does not link the library).

Targets: x86-64-v2, x86-64-v3 (AVX2/FMA) and x86-64-v4 (AVX-512) by default, or one CPU
(``--cpu NAME``, ``--cpu host``). The library needs libc, libm and libpthread only.

The C sources are package data (csrc/, in the wheel) found through :mod:`importlib.resources`,
never through a source tree: ``pip install numba-bn`` and a C compiler are all a build needs.
"""

import inspect
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .. import compiling

#: The C sources, package data of numba_bn.capi.
CSRC_DIR = Path(str(resources.files(__package__) / "csrc"))
LIBRARY_NAME = "libnumba_bn.so"
HEADER_NAME = "numba_bn.h"
GENERATED_HEADER = "nbn_kernels.h"

#: Instruction sets of the default x86-64 build, best first (LLVM CPU names).
X86_64_LEVELS = ("x86-64-v4", "x86-64-v3", "x86-64-v2")

DTYPES = ("f32", "f64")


@dataclass
class BuildResult:
    library: Path
    header: Path
    targets: tuple
    seconds: float
    #: the extension of numba_bn.capi.calls, or why it was not built
    calls: Path | str

    @property
    def size_bytes(self):
        return self.library.stat().st_size


def c_compiler():
    """The C compiler: $CC, else ``cc``."""
    return os.environ.get("CC", "cc")


def run_compiler(args, what):
    """Run the C compiler; RuntimeError with its output when it fails."""
    command = [c_compiler(), *map(str, args)]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except FileNotFoundError:
        raise RuntimeError(
            f"{what} needs a C compiler: {command[0]!r} was not found (set CC to another)"
        ) from None
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n$ {' '.join(command)}\n{done.stdout}{done.stderr}")


def csrc_dir():
    """The folder of the C sources in the installed package (numba_bn.h, the shim, the reference
    backend, the C test and bench hosts); RuntimeError naming it when they are not there."""
    if not (CSRC_DIR / "nbn_shim.c").is_file():
        raise RuntimeError(
            f"the C sources of numba_bn.capi are not at {CSRC_DIR}: the installed package lacks "
            "its package data (csrc/); reinstall numba-bn from a wheel or with `pip install .`"
        )
    return CSRC_DIR


# ------------------------------------------------------------------------- numba-bn command
def add_arguments(parser):
    parser.add_argument("--out", required=True, help="directory for libnumba_bn.so, numba_bn.h")
    parser.add_argument(
        "--cpu",
        help="one LLVM CPU name, or 'host' (default: x86-64-v2 with AVX2/AVX-512 variants)",
    )
    parser.add_argument(
        "--header-only",
        action="store_true",
        help=f"write only {GENERATED_HEADER}, the header of the kernel tables that the build "
        "generates for the shim, to read (nothing is compiled)",
    )


def run_from_args(args):
    from ..cli import writable_directory

    writable_directory(args.out, "--out")
    if args.header_only:
        print(write_generated_header(args.out, cpu=args.cpu))
        return 0
    result = build_plugin(args.out, cpu=args.cpu)
    print(f"{result.library} ({result.size_bytes / 1024:.0f} KiB; {', '.join(result.targets)})")
    print(f"{result.header}")
    print(f"{result.calls}")
    print(f"built in {result.seconds:.1f} s")
    return 0


# -------------------------------------------------------------------------------- parent side
def build_targets(cpu=None):
    """(name, LLVM CPU, LLVM features) of each object to build, best first.

    ``cpu``: None for the portable x86-64 build (x86-64-v2 baseline, AVX2 and AVX-512 variants
    chosen at load time; on another architecture its generic CPU); ``"host"`` for this machine's
    CPU and features (then results match the JIT backend's bit for bit); any other LLVM CPU name
    for that CPU only (the library then needs that CPU).
    """
    import llvmlite.binding as llvm

    if cpu == "host":
        host = llvm.get_host_cpu_name()
        return ((host, host, llvm.get_host_cpu_features().flatten()),)
    if cpu:
        return ((cpu, cpu, ""),)
    if llvm.get_process_triple().startswith("x86_64"):
        return tuple((level, level, "") for level in X86_64_LEVELS)
    return (("generic", "generic", ""),)


def write_generated_header(out_dir, cpu=None):
    """Write ``out_dir/nbn_kernels.h``, the header the build generates for the shim: the constants
    and the table of range drivers of :mod:`.ranges`, one table per target of
    :func:`build_targets` (``cpu``). Compiles nothing; returns its path."""
    from .ranges import EXPORTED

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = out_dir / GENERATED_HEADER
    header.write_text(_generated_header(EXPORTED, build_targets(cpu)))
    return header


def build_plugin(out_dir, cpu=None):
    """Build ``out_dir/libnumba_bn.so`` and copy ``numba_bn.h`` next to it (see
    :func:`build_targets` for ``cpu``); returns a :class:`BuildResult`."""
    start = time.perf_counter()
    csrc = csrc_dir()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = build_targets(cpu)
    with tempfile.TemporaryDirectory(prefix="nbn-plugin-") as work:
        work = Path(work)
        children = [_start_child(work, *target) for target in targets]
        try:
            for (name, _, _), child in zip(targets, children, strict=True):
                output, _ = child.communicate()
                if child.returncode != 0:
                    raise RuntimeError(f"compiling the kernels for {name} failed:\n{output}")
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                    child.wait()
        write_generated_header(work, cpu)
        library = out_dir / LIBRARY_NAME
        run_compiler(
            [
                "-std=c11", "-O2", "-fPIC", "-shared", "-fvisibility=hidden",
                "-I", csrc, "-I", work,
                csrc / "nbn_shim.c", csrc / "nbn_numba_runtime.c",
                *sorted(work.glob("kernels-*.o")),
                "-o", library,
                "-Wl,--no-undefined", "-Wl,-z,noexecstack", "-Wl,-soname," + LIBRARY_NAME,
                "-lpthread", "-lm",
            ],
            "linking libnumba_bn.so",
        )  # fmt: skip
    header = out_dir / HEADER_NAME
    shutil.copyfile(csrc / HEADER_NAME, header)
    write_package_files(out_dir)
    calls = build_compiled_calls(out_dir)
    seconds = time.perf_counter() - start
    return BuildResult(library, header, tuple(t[0] for t in targets), seconds, calls)


def build_compiled_calls(out_dir):
    """Build the CPython extension of :mod:`.calls` (csrc/nbn_python.c) next to the library in
    ``out_dir``; returns its path, or a str saying why it was not built (no Python.h: a Python
    without its development headers)."""
    import numpy as np

    from .calls import extension_name

    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").is_file():
        return f"no compiled calls: {include / 'Python.h'} is missing (Python's headers)"
    extension = Path(out_dir) / extension_name()
    run_compiler(
        [
            "-std=c11", "-O2", "-fPIC", "-shared", "-fvisibility=hidden",
            "-I", include, "-I", np.get_include(), "-I", csrc_dir(),
            csrc_dir() / "nbn_python.c", "-o", extension, "-Wl,-z,noexecstack",
        ],
        "compiling the compiled calls (Python extension)",
    )  # fmt: skip
    return extension


PKG_CONFIG_NAME = "numba_bn.pc"
CMAKE_CONFIG_NAME = "numba_bnConfig.cmake"
CMAKE_VERSION_NAME = "numba_bnConfigVersion.cmake"


def abi_version():
    """(major, minor, patch) of the C ABI, as numba_bn.h defines it."""
    header = (csrc_dir() / HEADER_NAME).read_text()
    return tuple(
        int(re.search(rf"#define NBN_VERSION_{part} (\d+)", header).group(1))
        for part in ("MAJOR", "MINOR", "PATCH")
    )


def write_package_files(out_dir):
    """``numba_bn.pc`` (pkg-config) and ``numba_bnConfig.cmake`` with its version file
    (CMake's find_package), describing the library and header in ``out_dir`` wherever that
    directory ends up: both locate themselves (${pcfiledir}, CMAKE_CURRENT_LIST_DIR)."""
    out_dir = Path(out_dir)
    version = ".".join(map(str, abi_version()))
    (out_dir / PKG_CONFIG_NAME).write_text(
        "prefix=${pcfiledir}\n"
        "libdir=${prefix}\n"
        "includedir=${prefix}\n\n"
        "Name: numba_bn\n"
        "Description: batch normalization kernels built from numba_bn (C ABI)\n"
        f"Version: {version}\n"
        "Cflags: -I${includedir}\n"
        "Libs: -L${libdir} -Wl,-rpath,${libdir} -lnumba_bn\n"
    )
    (out_dir / CMAKE_CONFIG_NAME).write_text(
        "# find_package(numba_bn) with this directory on CMAKE_PREFIX_PATH or as numba_bn_DIR\n"
        "if(NOT TARGET numba_bn::numba_bn)\n"
        "  add_library(numba_bn::numba_bn SHARED IMPORTED)\n"
        "  set_target_properties(numba_bn::numba_bn PROPERTIES\n"
        f'    IMPORTED_LOCATION "${{CMAKE_CURRENT_LIST_DIR}}/{LIBRARY_NAME}"\n'
        f'    IMPORTED_SONAME "{LIBRARY_NAME}"\n'
        '    INTERFACE_INCLUDE_DIRECTORIES "${CMAKE_CURRENT_LIST_DIR}")\n'
        "endif()\n"
        "set(numba_bn_FOUND TRUE)\n"
    )
    (out_dir / CMAKE_VERSION_NAME).write_text(
        f'set(PACKAGE_VERSION "{version}")\n'
        "# the same major version, at least the requested minor and patch\n"
        'if(PACKAGE_FIND_VERSION_MAJOR STREQUAL "" OR\n'
        f"   (PACKAGE_FIND_VERSION_MAJOR EQUAL {abi_version()[0]} AND\n"
        "    NOT PACKAGE_VERSION VERSION_LESS PACKAGE_FIND_VERSION))\n"
        "  set(PACKAGE_VERSION_COMPATIBLE TRUE)\n"
        "  if(PACKAGE_VERSION VERSION_EQUAL PACKAGE_FIND_VERSION)\n"
        "    set(PACKAGE_VERSION_EXACT TRUE)\n"
        "  endif()\n"
        "else()\n"
        "  set(PACKAGE_VERSION_COMPATIBLE FALSE)\n"
        "endif()\n"
    )


def _start_child(work, name, cpu_name, features):
    """A Python process that compiles the kernels for one CPU (they run concurrently).

    Numba compiles for that CPU with its own pipeline, as its JIT does for the host, and must
    not see the host's features; a cache hit would give a module without IR, hence a fresh
    cache directory. The child imports the numba_bn this process runs (its folder first on its
    path, :func:`numba_bn.compiling.child_environment`; the build directory as its working
    directory), never one the caller's working directory happens to hold.
    """
    env = compiling.child_environment(
        NUMBA_CPU_NAME=cpu_name,
        NUMBA_CPU_FEATURES=features,
        NUMBA_CACHE_DIR=str(work / f"numba-cache-{_identifier(name)}"),
    )
    for setting in ("NUMBA_OPT", "NUMBA_DISABLE_JIT"):  # the JIT's defaults, always
        env.pop(setting, None)
    child = "import sys; from numba_bn.capi.build import emit_object; emit_object(*sys.argv[1:])"
    command = [sys.executable, "-c", child, str(work), name, cpu_name, features]
    return subprocess.Popen(
        command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def build_reference_backend(out_dir):
    """Build the plain double-precision C backend (csrc/reference_backend.c); its path."""
    csrc = csrc_dir()
    library = Path(out_dir) / "libnbn_reference.so"
    run_compiler(
        ["-std=c11", "-O2", "-fPIC", "-shared", "-I", csrc,
         csrc / "reference_backend.c", "-o", library, "-lm"],
        "building the reference C backend",
    )  # fmt: skip
    return library


# --------------------------------------------------------------------------------- child side
def _identifier(name):
    return re.sub(r"[^0-9A-Za-z]", "_", name)


def _numba_signature(function, dtype):
    """The cfunc signature of an exported function for ``dtype`` (from its annotations)."""
    from numba import types

    scalar = {"f32": types.float32, "f64": types.float64}[dtype]
    numba_type = {
        "const T *": types.CPointer(scalar),
        "T *": types.CPointer(scalar),
        "const double *": types.CPointer(types.float64),
        "double *": types.CPointer(types.float64),
        "int64_t *": types.CPointer(types.int64),
        "int64_t": types.int64,
        "double": types.float64,
    }
    params = inspect.signature(function).parameters.values()
    return types.void(*(numba_type[p.annotation] for p in params))


def _c_parameters(function):
    """The C parameters of an exported function, ``T *`` as ``void *``: a list of strings."""
    params = inspect.signature(function).parameters.values()
    return [
        f"{p.annotation.replace('T *', 'void *')}{'' if p.annotation.endswith('*') else ' '}"
        f"{p.name.removesuffix('_ptr')}"
        for p in params
    ]


def _c_member(function, width=100):
    """The table member of an exported function, its parameters wrapped at ``width`` columns."""
    head, params = f"    int32_t (*{function.__name__})(", _c_parameters(function)
    one_line = f"{head}{', '.join(params)});"
    if len(one_line) <= width:
        return one_line
    indent, lines, line = " " * 8, [head], ""
    for param in [*(p + "," for p in params[:-1]), params[-1] + ");"]:
        if line and len(indent) + len(line) + 1 + len(param) > width:
            lines.append(indent + line)
            line = ""
        line = f"{line} {param}" if line else param
    return "\n".join([*lines, indent + line])


def _generated_header(functions, targets):
    from .ranges import CONSTANTS

    lines = [
        "/* Generated by numba_bn/capi/build.py from numba_bn/capi/ranges.py: do not edit.",
        " * `numba-bn build-plugin --out DIR --header-only [--cpu NAME]` writes it to DIR.",
        " * The table of serial range drivers the shim calls, one per instruction set; T * is",
        " * void * here (float or double by the member of nbn_kernel_table). Each returns 0, or 1",
        " * when the Numba code raised (a bug: arguments are checked before). */",
        "#ifndef NBN_KERNELS_H",
        "#define NBN_KERNELS_H",
        "#include <stdint.h>",
        "",
        *(f"#define NBN_{name} {value}" for name, value in CONSTANTS.items()),
        "",
        "typedef struct nbn_dtype_kernels {",
        *(_c_member(f) for f in functions),
        "} nbn_dtype_kernels;",
        "",
        "typedef struct nbn_kernel_table {",
        "    nbn_dtype_kernels f32, f64;",
        "} nbn_kernel_table;",
        "",
        *(f"extern const nbn_kernel_table nbn_kernels_{_identifier(t[0])};" for t in targets),
        "",
        "/* {name, table}, best first */",
        "#define NBN_KERNEL_TABLES \\",
        ", \\\n".join(f'    {{"{t[0]}", &nbn_kernels_{_identifier(t[0])}}}' for t in targets),
        "",
        "#endif",
        "",
    ]
    return "\n".join(lines)


def _compile_cfuncs(functions):
    """LLVM IR of each exported function and dtype: {(name, dtype): (inner symbol, IR text)}."""
    from numba import cfunc

    compiled = {}
    for dtype in DTYPES:
        for function in functions:
            sig = _numba_signature(function, dtype)
            # never cache=True: a hit has no IR; IEEE division as every kernel (stats.kernel)
            compiled_function = cfunc(sig, error_model="numpy")(function)
            inner = compiled_function.native_name.removeprefix("cfunc.")
            compiled[function.__name__, dtype] = inner, compiled_function.inspect_llvm()
    return compiled


def _wrappers_ir(base, compiled, functions, table, triple, data_layout):
    """Wrappers that call Numba's inner functions, and the table of them (LLVM IR text)."""
    lines = [f'target triple = "{triple}"', f'target datalayout = "{data_layout}"']
    entries = []
    for dtype in DTYPES:
        for function in functions:
            inner, _ = compiled[function.__name__, dtype]
            arg_types = [str(a.type) for a in base.get_function(inner).arguments][2:]
            params = ", ".join(f"{t} %a{i}" for i, t in enumerate(arg_types))
            wrapper = f"nbn_k_{function.__name__}_{dtype}"
            lines += [
                f'declare i32 @"{inner}"(ptr, ptr, {", ".join(arg_types)})',
                f'define internal i32 @"{wrapper}"({params}) {{',
                "  %ret = alloca ptr, align 8",
                "  %exc = alloca ptr, align 8",
                "  store ptr null, ptr %ret, align 8",
                "  store ptr null, ptr %exc, align 8",
                f'  %status = call i32 @"{inner}"(ptr %ret, ptr %exc, {params})',
                "  %ok_value = icmp eq i32 %status, 0",  # Numba: 0 returned a value
                "  %ok_none = icmp eq i32 %status, -2",  # -2 returned None
                "  %ok = or i1 %ok_value, %ok_none",
                "  %result = select i1 %ok, i32 0, i32 1",
                "  ret i32 %result",
                "}",
            ]
            entries.append(f'ptr @"{wrapper}"')
    # laid out as nbn_kernel_table in the generated header: float32 functions, then float64
    lines.append(
        f"@{table} = hidden constant [{len(entries)} x ptr] [{', '.join(entries)}], align 8"
    )
    return "\n".join(lines) + "\n"


def _optimise(module, target_machine):
    import llvmlite.binding as llvm

    tuning = llvm.create_pipeline_tuning_options(speed_level=3)
    tuning.loop_vectorization = True
    tuning.slp_vectorization = False  # off in Numba since a miscompilation (numba#8705)
    builder = llvm.create_pass_builder(target_machine, tuning)
    builder.getModulePassManager().run(module, builder)


def emit_object(work, name, cpu_name, features):
    """Child process: compile the exported drivers and write ``work/kernels-<name>.o``."""
    import llvmlite.binding as llvm

    from .ranges import EXPORTED

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    compiled = _compile_cfuncs(EXPORTED)
    module = None
    for _, ir in compiled.values():
        if module is None:
            module = llvm.parse_assembly(ir)
        else:
            module.link_in(llvm.parse_assembly(ir))
    triple = llvm.get_process_triple()
    machine = llvm.Target.from_triple(triple).create_target_machine(
        cpu=cpu_name, features=features, opt=3, reloc="pic", codemodel="default"
    )
    data_layout = str(machine.target_data)
    module.triple, module.data_layout = triple, data_layout
    table = f"nbn_kernels_{_identifier(name)}"
    module.link_in(
        llvm.parse_assembly(_wrappers_ir(module, compiled, EXPORTED, table, triple, data_layout))
    )
    for value in (*module.functions, *module.global_variables):
        if not value.is_declaration and value.name != table:
            value.linkage = "internal"
    module.verify()
    _optimise(module, machine)
    (Path(work) / f"kernels-{_identifier(name)}.o").write_bytes(machine.emit_object(module))
