"""SyncBatchNorm training step over K ranks against a local BatchNorm on each rank's part.

    NUMBA_NUM_THREADS=1 mpiexec -n 2 python -m mpi4py benchmarks/bench_distributed.py

The global batch (default 32x64x56x56 float32) is split along N; every rank times, on its own
part, a training step (forward + backward) of

* ``local``: numba_bn.BatchNorm, no communication (the fused kernels: one read of x per pass);
* ``sync, COMM_SELF``: SyncBatchNorm on a one-process communicator: the split kernels
  (statistics, then normalisation; sums, then dx) without peers, which isolates what the split
  itself costs;
* ``sync``: SyncBatchNorm over all ranks;
* ``collectives``: the step's four collectives alone, as SyncBatchNorm makes them: per operation
  the header (an Allgather of 4 int64 values, checked) and the payload (forward: Allgather of
  2C float64 values; backward: Allreduce of 2C float64 values);
* ``headers alone``: the two header exchanges, what the check of every call costs;
* ``kernel: ...``: the backend kernels behind the two steps on this rank's part, the fused
  forward and backward of the local step against the split pairs the synchronised step runs.

It first checks that the synchronised step equals a single-process BatchNorm on the concatenated
batch (gathered on rank 0). Every timed step starts after a barrier; the variants are interleaved
so that load from other processes falls on all of them; rank 0 prints, per variant, the median
and the minimum over repeats of the slowest rank's time, and the bandwidth that the minimum means
for the napkin bytes of the variant.
"""

import argparse
import time

import numba
import numpy as np
from mpi4py import MPI

import numba_bn as nbn
from numba_bn import dispatch
from numba_bn.distributed import (
    HEADER_FIELDS,
    TRAIN_BACKWARD,
    TRAIN_FORWARD,
    SyncBatchNorm,
    exchange_header,
)


def arguments():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="32,64,56,56", help="global batch (default %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeat", type=int, default=30, help="timed steps per variant")
    return parser.parse_args()


def local_part(shape, dtype, comm, seed=0):
    """This rank's rows of the global batch (N split as evenly as possible), x and dy."""
    sizes = [shape[0] // comm.size + (r < shape[0] % comm.size) for r in range(comm.size)]
    rng = np.random.default_rng([seed, comm.rank])
    part = (sizes[comm.rank], *shape[1:])
    x = (rng.standard_normal(part) * 2.0 + 3.0).astype(dtype)
    dy = rng.standard_normal(part).astype(dtype)
    return x, dy


def rel_err(value, ref):
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(np.asarray(value, np.float64) - ref) / np.linalg.norm(ref))


def verify(comm, x, dy, channels, dtype):
    """Relative errors of the synchronised step against BatchNorm on the gathered batch."""
    sync = SyncBatchNorm(channels, comm=comm, dtype=dtype)
    y, dx = sync(x), sync.backward(dy)
    parts = [comm.gather(a, root=0) for a in (x, dy, y, dx)]
    if comm.rank != 0:
        return None
    x_all, dy_all, y_all, dx_all = (np.concatenate(p) for p in parts)
    local = nbn.BatchNorm(channels, dtype=dtype)
    y_ref, dx_ref = local(x_all), local.backward(dy_all)
    return {
        "y": rel_err(y_all, y_ref),
        "dx": rel_err(dx_all, dx_ref),
        "grad_weight": rel_err(sync.grad_weight, local.grad_weight),
        "running_var": rel_err(sync.running_var, local.running_var),
    }


def kernel_variants(x, dy):
    """The backend kernels behind the two steps, on this rank's part: fused against split."""
    kernels = dispatch.get("cpu")
    view = x.reshape(x.shape[0], x.shape[1], -1)
    dy_view = dy.reshape(view.shape)
    channels, empty = view.shape[1], np.empty(0, x.dtype)
    y, dx = np.empty_like(view), np.empty_like(view)
    mean, invstd, m2, sum_dy, sum_dy_xmu = np.empty((5, channels))
    vectors = dict(weight=empty, bias=empty)
    kernels.forward_train(view, eps=1e-5, y=y, mean=mean, invstd=invstd, m2=m2, **vectors)
    count = float(view.shape[0] * view.shape[2])
    return {
        "kernel: fused fwd": (
            lambda: kernels.forward_train(view, eps=1e-5, y=y, mean=mean, invstd=invstd, m2=m2,
                                          **vectors), 2,
        ),
        "kernel: stats+norm": (
            lambda: (kernels.batch_stats(view, mean=mean, m2=m2),
                     kernels.normalize(view, mean=mean, invstd=invstd, y=y, **vectors)), 3,
        ),
        "kernel: fused bwd": (
            lambda: kernels.backward(dy_view, view, mean=mean, invstd=invstd, weight=empty,
                                     dx=dx, sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu), 3,
        ),
        "kernel: sums+dx": (
            lambda: (kernels.backward_sums(dy_view, view, mean=mean, sum_dy=sum_dy,
                                           sum_dy_xmu=sum_dy_xmu),
                     kernels.backward_dx(dy_view, view, mean=mean, invstd=invstd, weight=empty,
                                         sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu, count=count,
                                         dx=dx)), 5,
        ),
    }  # fmt: skip


def main():
    args = arguments()
    comm = MPI.COMM_WORLD
    shape = tuple(int(s) for s in args.shape.split(","))
    dtype = np.dtype(args.dtype)
    channels = shape[1]
    x, dy = local_part(shape, dtype, comm)

    errors = verify(comm, x, dy, channels, dtype)
    local = nbn.BatchNorm(channels, dtype=dtype)
    sync_self = SyncBatchNorm(channels, comm=MPI.COMM_SELF, dtype=dtype)
    sync = SyncBatchNorm(channels, comm=comm, dtype=dtype)
    stats, gathered = np.zeros((2, channels)), np.empty((comm.size, 2, channels))
    sums, summed = np.zeros(2 * channels), np.empty(2 * channels)
    count = x.size // channels

    def step(layer):
        layer(x)
        layer.backward(dy)

    def headers():
        exchange_header(comm, TRAIN_FORWARD, channels, dtype, count)
        exchange_header(comm, TRAIN_BACKWARD, channels, dtype, count)

    def collectives():
        exchange_header(comm, TRAIN_FORWARD, channels, dtype, count)
        comm.Allgather(stats, gathered)
        exchange_header(comm, TRAIN_BACKWARD, channels, dtype, count)
        comm.Allreduce(sums, summed)

    # Napkin bytes of one rank's step, in passes over a tensor of x's size: the local step fuses
    # each pass pair per channel (x, y | dy, x, dx), the split kernels read the inputs again
    # (x | x, y || dy, x | dy, x, dx).
    variants = {
        "local BatchNorm": (lambda: step(local), 5),
        "sync, COMM_SELF": (lambda: step(sync_self), 8),
        f"sync, {comm.size} ranks": (lambda: step(sync), 8),
        "collectives alone": (collectives, 0),
        "headers alone": (headers, 0),
        **kernel_variants(x, dy),
    }
    for run, _ in variants.values():  # compile or load from cache, touch the memory
        run(), run()
    times = {name: [] for name in variants}
    for _ in range(args.repeat):
        for name, (run, _) in variants.items():
            comm.Barrier()
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            times[name].append(comm.allreduce(elapsed, op=MPI.MAX))
    if comm.rank != 0:
        return

    print(
        f"SyncBatchNorm step: global batch {shape} {dtype}, {comm.size} ranks x "
        f"{x.shape[0]} rows, {numba.get_num_threads()} Numba thread(s) per rank, "
        f"{MPI.Get_library_version().split(',')[0]}"
    )
    print("check against BatchNorm on the gathered batch (relative L2 error):")
    print("  " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    # The median is the typical step; the minimum is the step least disturbed by other load.
    base = {"median": np.median(times["local BatchNorm"]), "min": np.min(times["local BatchNorm"])}
    print(
        f"\n{args.repeat} calls per variant, time of the slowest rank (a step: forward + backward):"
    )
    print(
        f"  {'variant':<20} {'median ms':>10} {'vs local':>9} {'min ms':>9} {'vs local':>9} "
        f"{'GB/s at min':>12}"
    )
    for name, values in times.items():
        median, least = np.median(values), np.min(values)
        bandwidth = variants[name][1] * x.nbytes / least / 1e9
        print(
            f"  {name:<20} {median * 1e3:10.3f} {median / base['median']:8.2f}x "
            f"{least * 1e3:9.3f} {least / base['min']:8.2f}x {bandwidth:12.1f}"
        )
    header = 8 * len(HEADER_FIELDS)
    sent = 2 * header + 8 * (2 * channels + 2 * channels)
    received = 2 * header * comm.size + 8 * (2 * channels * comm.size + 2 * channels)
    print(
        f"\nexchanged per step and rank: two headers of {len(HEADER_FIELDS)} int64 (Allgather), "
        f"2C float64 (Allgather) and 2C float64 (Allreduce); {sent} B sent, {received} B "
        "received (an Allgather includes the own row)"
    )
    sync = times[f"sync, {comm.size} ranks"]
    print(
        f"overhead of the synchronised step over the local step: "
        f"{np.median(sync) / base['median'] - 1:+.1%} (medians), "
        f"{np.min(sync) / base['min'] - 1:+.1%} (minima)"
    )


if __name__ == "__main__":
    main()
