"""The C library with pauses between its calls: builds of libnumba_bn.so against each other.

    python benchmarks/c_pauses.py OLD_DIR/2 NEW_DIR/2 [OLD_DIR/1] [--pauses 0,1000,5000]
                                  [--shapes 256x512x1,16x32x256] [--rounds 6]

Each DIR holds a libnumba_bn.so (``numba-bn build-plugin --out DIR``); ``/T`` runs it on T
threads. csrc/bench_host.c is compiled against each, and every (shape, pause, library) runs as
its own process, the libraries in turn (their order alternating), ``rounds`` times: a pause of
GAP_US microseconds before each call stands for a program that does other work between its
calls, which back-to-back timings never show (benchmarks/README.md, "Calls with pauses between
them"). Prints, per cell, the median over the rounds of each run's median (us, forward-train /
forward-eval / backward). Shapes are OUTERxCHANNELSxINNER.
"""

import argparse
import os
import statistics
import subprocess
from pathlib import Path

from numba_bn.capi.build import c_compiler, csrc_dir


def compile_bench(directory):
    """bench_host linked against ``directory``/libnumba_bn.so; the binary's path."""
    csrc = csrc_dir()
    binary = Path(directory) / "bench_host"
    subprocess.run(
        [c_compiler(), "-std=c11", "-O2", "-I", csrc, csrc / "bench_host.c", "-L", directory,
         "-lnumba_bn", f"-Wl,-rpath,{Path(directory).resolve()}", "-o", binary],
        check=True,
    )  # fmt: skip
    return binary


def run(binary, shape, threads, pause_us):
    """The median of each operation (us), one process: 300 calls back to back, 100 with pauses."""
    calls = 300 if pause_us == 0 else 100
    output = subprocess.run(
        [binary, *shape.split("x"), str(threads), str(calls), str(pause_us)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return [float(line.split()[2]) * 1e3 for line in output.strip().splitlines()[-3:]]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("libraries", nargs="+", help="DIR/THREADS")
    parser.add_argument("--pauses", default="0,1000,5000", help="microseconds, comma-separated")
    parser.add_argument("--shapes", default="256x512x1,16x32x256,4x64x3136")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    libraries = [(name, *name.rsplit("/", 1)) for name in args.libraries]
    binaries = {directory: compile_bench(directory) for _, directory, _ in libraries}
    pauses = [int(p) for p in args.pauses.split(",")]
    shapes = args.shapes.split(",")
    results = {}
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    for round_ in range(args.rounds):
        for shape in shapes:
            for pause in pauses:
                order = libraries if round_ % 2 == 0 else libraries[::-1]
                for name, directory, threads in order:
                    medians = run(binaries[directory], shape, threads, pause)
                    results.setdefault((shape, pause, name), []).append(medians)
    print(f"load average after: {os.getloadavg()[0]:.2f}; us, forward / eval / backward")
    print("| shape | pause us | " + " | ".join(name for name, _, _ in libraries) + " |")
    print("|---|---|" + "---|" * len(libraries))
    for shape in shapes:
        for pause in pauses:
            cells = []
            for name, _, _ in libraries:
                runs = results[shape, pause, name]
                cells.append(" / ".join(f"{statistics.median(r[i] for r in runs):.0f}"
                                        for i in range(3)))  # fmt: skip
            print(f"| {shape} | {pause} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
