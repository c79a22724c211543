"""One rank of the CUDA-array MPI jobs that tests/test_distributed.py launches.

    NUMBA_ENABLE_CUDASIM=1 mpiexec -n K python -m mpi4py tests/mpi_cuda_worker.py DIR

Reads DIR/config.json (rows per rank) and DIR/input.npz (the global batches, written by the
test), copies this rank's rows to the (simulated) GPU as Numba device arrays, runs the
functional forms and SyncBatchNorm on them, and writes what came back (copied to the host) to
DIR/rank{R}.npz; the test compares it with one process on the concatenated batch on the CPU.

Launches are as small as tests/conftest.py's ``tiny_launches`` (8 threads per block), so that
even these few rows span several blocks and the kernels' cross-block merge runs.
"""

import json
import sys
from pathlib import Path

import numba
import numpy as np
from mpi4py import MPI
from numba import cuda

import numba_bn.distributed as distributed
from numba_bn.cuda import config
from numba_bn.cuda.arrays import DeviceMemory
from numba_bn.distributed import SyncBatchNorm, sync_backward, sync_forward_train
from numba_bn.memory import is_device_array

for name, value in (("THREADS_PER_BLOCK", 8), ("ROW_TILE", 2), ("VALUES_PER_THREAD", 1),
                    ("BLOCKS_PER_CHANNEL", 4), ("TARGET_BLOCKS", 64),
                    ("ELEMENTWISE_VALUES_PER_THREAD", 4)):  # fmt: skip
    setattr(config, name, value)
sys.setswitchinterval(1e-4)  # the simulator's threads reach each syncthreads() sooner


def rows_of_rank(array, counts, rank):
    """This rank's slice along the batch axis (axis 0) of a global batch, on the device."""
    start = int(np.sum(counts[:rank]))
    return cuda.to_device(np.ascontiguousarray(array[start : start + int(counts[rank])]))


def on_device(*values):
    return np.array(all(is_device_array(v) and not isinstance(v, np.ndarray) for v in values))


def functional(comm, data, counts, record):
    """sync_forward_train and sync_backward on device arrays, running buffers on the device."""
    x, dy = (rows_of_rank(data[key], counts, comm.rank) for key in ("func_x", "func_dy"))
    weight, bias, running_mean, running_var = (
        cuda.to_device(data[key])
        for key in ("func_weight", "func_bias", "func_running_mean", "func_running_var")
    )
    y, mean, invstd = sync_forward_train(
        x, weight, bias, running_mean=running_mean, running_var=running_var, momentum=0.3
    )
    dx, dweight, dbias = sync_backward(dy, x, mean, invstd, weight)
    results = {"y": y, "mean": mean, "invstd": invstd, "dx": dx, "dweight": dweight,
               "dbias": dbias, "running_mean": running_mean,
               "running_var": running_var}  # fmt: skip
    record["func_on_device"] = on_device(*results.values())
    record.update({f"func_{key}": value.copy_to_host() for key, value in results.items()})
    device_direct(comm, data, (dy, x, mean, invstd, weight), record)


def device_direct(comm, data, arguments, record):
    """sync_backward again as with a CUDA-aware MPI: the sums all-reduced straight from and
    into device memory, never through the host (the simulator's device memory is host memory
    that mpi4py reads through its array interface, so the path runs here as on a GPU)."""
    asked = []

    def cuda_aware():
        asked.append(True)
        return True

    def no_host_copy(*args, **kwargs):
        raise AssertionError("the sums went through host memory")

    saved = distributed.cuda_aware_mpi, DeviceMemory.to_host, DeviceMemory.from_host
    distributed.cuda_aware_mpi = cuda_aware
    DeviceMemory.to_host = DeviceMemory.from_host = no_host_copy
    try:
        dx, dweight, dbias = sync_backward(*arguments)
    finally:
        distributed.cuda_aware_mpi, DeviceMemory.to_host, DeviceMemory.from_host = saved
    record["direct_asked"] = np.array(len(asked))
    record["direct_on_device"] = on_device(dx, dweight, dbias)
    record.update(direct_dx=dx.copy_to_host(), direct_dweight=dweight.copy_to_host(),
                  direct_dbias=dbias.copy_to_host())  # fmt: skip


def layer(comm, data, counts, record):
    """A training step of SyncBatchNorm on device arrays, then eval mode (whose backward
    all-reduces the sums too)."""
    bn = SyncBatchNorm(data["layer_weight"].size, comm=comm, dtype=np.float32)
    bn.weight[:], bn.bias[:] = data["layer_weight"], data["layer_bias"]
    for suffix, mode in (("", bn.train), ("_eval", bn.eval)):
        mode()
        x = rows_of_rank(data[f"layer_x{suffix}"], counts, comm.rank)
        dy = rows_of_rank(data[f"layer_dy{suffix}"], counts, comm.rank)
        y = bn(x)
        dx = bn.backward(dy)
        values = {"y": y, "dx": dx, "grad_weight": bn.grad_weight, "grad_bias": bn.grad_bias}
        record[f"layer_on_device{suffix}"] = on_device(*values.values(), bn.running_var)
        record.update({f"layer_{k}{suffix}": v.copy_to_host() for k, v in values.items()})
    record.update(layer_running_mean=bn.running_mean.copy_to_host(),
                  layer_running_var=bn.running_var.copy_to_host(),
                  layer_batches=np.array(bn.num_batches_tracked))  # fmt: skip


def main(comm, workdir):
    counts = json.loads((workdir / "config.json").read_text())["counts"]
    data = np.load(workdir / "input.npz")
    record = {"size": np.array(comm.size), "simulator": np.array(bool(numba.config.ENABLE_CUDASIM))}
    functional(comm, data, counts, record)
    layer(comm, data, counts, record)
    np.savez(workdir / f"rank{comm.rank}.npz", **record)


if __name__ == "__main__":
    main(MPI.COMM_WORLD, Path(sys.argv[1]))
