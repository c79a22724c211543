"""One rank of the MPI jobs that tests/test_distributed.py launches.

    mpiexec -n K python -m mpi4py tests/mpi_worker.py suite DIR
    mpiexec -n K python -m mpi4py tests/mpi_worker.py abort DIR

``suite``: reads DIR/config.json and DIR/input.npz (the global batches, written by the test),
takes this rank's rows, runs SyncBatchNorm and the functional forms, and writes what it saw to
DIR/rank{R}.npz; the test compares those with a single-process BatchNorm on the concatenated
batch. Errors that must be raised on every rank are caught and their messages recorded, so the
job itself ends cleanly.

``abort``: rank 1 raises while rank 0 waits in a SyncBatchNorm collective; the job must end with
a non-zero code (python -m mpi4py turns the uncaught exception into MPI_Abort).
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from numba_bn.distributed import SyncBatchNorm, sync_backward, sync_forward_train

LR = 0.1  # SGD step applied to weight and bias between training steps, as the test does


def rows_of_rank(array, counts, rank):
    """This rank's slice along the batch axis (axis 0) of a global batch."""
    start = int(np.sum(counts[:rank]))
    return np.ascontiguousarray(array[start : start + int(counts[rank])])


def error_message(call):
    """The ValueError/TypeError message ``call`` raises, or '' if it returns."""
    try:
        call()
    except (ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def collective_errors(comm, record):
    """Errors decided from the global batch: the same on every rank, and nobody left waiting."""
    rank, size = comm.rank, comm.size
    bn = SyncBatchNorm(4, dtype=np.float64)
    # One value per channel in the global batch: on the last rank only.
    single = np.full((1 if rank == size - 1 else 0, 4), 3.0)
    record["error_single_value"] = error_message(lambda: bn(single))
    record["error_single_value_functional"] = error_message(lambda: sync_forward_train(single))
    record["single_value_running_var"] = bn.running_var.copy()
    record["single_value_batches"] = np.array(bn.num_batches_tracked)
    # A NaN on rank 0 only, nan_policy="raise": every rank rejects the batch.
    strict = SyncBatchNorm(4, dtype=np.float64, nan_policy="raise")
    x = np.arange(24.0).reshape(6, 4) + rank
    if rank == 0:
        x[2, 1] = np.nan
    record["error_nan"] = error_message(lambda: strict(x))
    record["nan_running_mean"] = strict.running_mean.copy()
    record["error_comm_type"] = error_message(lambda: SyncBatchNorm(4, comm="world"))
    record["error_cuda"] = error_message(lambda: SyncBatchNorm(4, device="cuda"))


def train_layer(comm, data, counts, name, spec, record):
    """Several training steps (with an SGD update of the affine parameters), then eval."""
    bn = SyncBatchNorm(spec["channels"], comm=comm, **spec["options"])
    bn.weight[:] = data[f"{name}_weight"]
    bn.bias[:] = data[f"{name}_bias"]
    for step in range(spec["steps"]):
        x = rows_of_rank(data[f"{name}_x{step}"], counts, comm.rank)
        dy = rows_of_rank(data[f"{name}_dy{step}"], counts, comm.rank)
        record[f"{name}_y{step}"] = bn(x)
        record[f"{name}_dx{step}"] = bn.backward(dy)
        record[f"{name}_grad_weight{step}"] = bn.grad_weight
        record[f"{name}_grad_bias{step}"] = bn.grad_bias
        bn.weight -= LR * bn.grad_weight
        bn.bias -= LR * bn.grad_bias
    bn.eval()
    x = rows_of_rank(data[f"{name}_x_eval"], counts, comm.rank)
    dy = rows_of_rank(data[f"{name}_dy_eval"], counts, comm.rank)
    record[f"{name}_y_eval"] = bn(x)
    record[f"{name}_dx_eval"] = bn.backward(dy)
    record[f"{name}_grad_weight_eval"] = bn.grad_weight
    record[f"{name}_grad_bias_eval"] = bn.grad_bias
    for key, value in bn.state_dict().items():
        record[f"{name}_state_{key}"] = value


def functional(comm, data, counts, record):
    x = rows_of_rank(data["func_x"], counts, comm.rank)
    dy = rows_of_rank(data["func_dy"], counts, comm.rank)
    weight, bias = data["func_weight"], data["func_bias"]
    running_mean, running_var = data["func_running_mean"].copy(), data["func_running_var"].copy()
    y_out, dx_out = np.full_like(x, np.nan), np.full_like(x, np.nan)  # poisoned: all rewritten
    y, mean, invstd = sync_forward_train(
        x, weight, bias, running_mean=running_mean, running_var=running_var, momentum=0.3,
        out=y_out,
    )  # fmt: skip
    dx, dweight, dbias = sync_backward(dy, x, mean, invstd, weight, out=dx_out)
    assert y is y_out and dx is dx_out
    record.update(
        func_y=y, func_mean=mean, func_invstd=invstd, func_dx=dx, func_dweight=dweight,
        func_dbias=dbias, func_running_mean=running_mean, func_running_var=running_var,
    )  # fmt: skip


def suite(comm, workdir):
    config = json.loads((workdir / "config.json").read_text())
    data = np.load(workdir / "input.npz")
    record = {"size": np.array(comm.size), "rank": np.array(comm.rank)}
    collective_errors(comm, record)
    for name, spec in config["layers"].items():
        train_layer(comm, data, config["counts"], name, spec, record)
    functional(comm, data, config["counts"], record)
    np.savez(workdir / f"rank{comm.rank}.npz", **record)


def abort(comm, workdir):
    bn = SyncBatchNorm(3, comm=comm)
    x = np.ones((4, 3), np.float32) * np.arange(4, dtype=np.float32)[:, None]
    comm.Barrier()
    if comm.rank == 1:
        time.sleep(0.5)  # let rank 0 enter the collective first
        (workdir / "raised_at").write_text(repr(time.time()))
        raise RuntimeError("rank 1 fails on purpose")
    bn(x)  # waits for rank 1 in the statistics exchange until the job is aborted
    bn(x)


if __name__ == "__main__":
    case, directory = sys.argv[1], Path(sys.argv[2])
    {"suite": suite, "abort": abort}[case](MPI.COMM_WORLD, directory)
