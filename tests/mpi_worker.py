"""One rank of the MPI jobs that tests/test_distributed.py launches.

    mpiexec -n K python -m mpi4py tests/mpi_worker.py suite DIR
    mpiexec -n K python -m mpi4py tests/mpi_worker.py abort DIR

``suite``: reads DIR/config.json and DIR/input.npz (the global batches, written by the test),
takes this rank's rows, runs SyncBatchNorm and the functional forms, and writes what it saw to
DIR/rank{R}.npz; the test compares those with a single-process BatchNorm on the concatenated
batch. Errors that must be raised on every rank are caught and their messages recorded, so the
job itself ends cleanly. Last come calls on which the ranks disagree (channels, dtype, train/eval
mode): under a watchdog, so that a hang ends the job within WATCHDOG_S with the ranks' stacks.

``abort``: rank 1 raises while rank 0 waits in a SyncBatchNorm collective; the job must end with
a non-zero code (python -m mpi4py turns the uncaught exception into MPI_Abort).
"""

import faulthandler
import json
import sys
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

import numba_bn as nbn
from numba_bn.distributed import SyncBatchNorm, allreduce_moments, sync_backward, sync_forward_train

LR = 0.1  # SGD step applied to weight and bias between training steps, as the test does
WATCHDOG_S = 60  # the disagreement calls take milliseconds; a hang must not wait for the test


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


def snapshot(*arrays):
    """The bytes of ``arrays`` (buffers, parameters, outputs), for a bitwise comparison."""
    return np.frombuffer(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays), np.uint8)


def layer_state(bn):
    """Everything a failed call must leave as it was: parameters, buffers, the batch count."""
    return bn.weight, bn.bias, bn.running_mean, bn.running_var, np.array(bn.num_batches_tracked)


def disagreements(comm, record):
    """Calls on which the ranks disagree: every rank must raise the same ValueError, at once,
    before any buffer, parameter or out= array changes (bytes recorded before and after)."""
    rank, last = comm.rank, comm.size - 1
    x = np.arange(12.0).reshape(3, 4) * (rank + 1)
    dy = np.cos(x)

    def attempt(key, call, state):
        """Record ``call``'s error, and the bytes of what ``state()`` returns before and after
        (read afresh: an attribute the call rebinds or a count it increments shows too)."""
        before = snapshot(*state())
        record[f"{key}_error"] = error_message(call)
        record[f"{key}_before"], record[f"{key}_after"] = before, snapshot(*state())

    # The last rank has 5 channels, the others 4 (it would merge memory it never received).
    channels = 5 if rank == last else 4
    xc, dyc = np.ones((3, channels)) * np.arange(1, 4)[:, None], np.ones((3, channels))
    bn = SyncBatchNorm(channels, comm=comm, dtype=np.float64)
    y_out = np.full_like(xc, np.nan)
    attempt("channels_layer", lambda: bn.forward(xc, out=y_out), lambda: (*layer_state(bn), y_out))
    running_mean, running_var = np.zeros(channels), np.ones(channels)
    attempt(
        "channels_forward",
        lambda: sync_forward_train(
            xc, running_mean=running_mean, running_var=running_var, out=y_out
        ),
        lambda: (running_mean, running_var, y_out),
    )  # fmt: skip
    dx_out = np.full_like(xc, np.nan)
    stats = np.ones(channels)
    attempt(
        "channels_backward",
        lambda: sync_backward(dyc, xc, stats, stats, stats, out=dx_out),
        lambda: (dx_out,),
    )

    # Rank 0 computes in float32, the others in float64.
    dtype = np.float32 if rank == 0 else np.float64
    xd, y_out = x.astype(dtype), np.full(x.shape, np.nan, dtype)
    running_mean, running_var = np.zeros(4, dtype), np.ones(4, dtype)
    attempt(
        "dtype",
        lambda: sync_forward_train(
            xd, running_mean=running_mean, running_var=running_var, out=y_out
        ),
        lambda: (running_mean, running_var, y_out),
    )  # fmt: skip

    # Rank 0 in eval mode, the others training: its backward meets their forward.
    bn = SyncBatchNorm(4, comm=comm, dtype=np.float64)
    y_out, dx_out = np.full_like(x, np.nan), np.full_like(x, np.nan)
    if rank == 0:
        bn.eval()
        bn(x)  # running statistics: no collective
    attempt(
        "eval_vs_train_forward",
        (lambda: bn.backward(dy, out=dx_out)) if rank == 0 else (lambda: bn.forward(x, out=y_out)),
        lambda: (*layer_state(bn), y_out, dx_out),
    )
    record["eval_vs_train_forward_no_gradients"] = np.array(bn.grad_weight is None)

    # One training step together, then rank 0's eval-mode backward meets a training backward.
    bn = SyncBatchNorm(4, comm=comm, dtype=np.float64)
    bn(x)
    if rank == 0:
        bn.eval()
        bn(x)
    dx_out = np.full_like(x, np.nan)
    attempt(
        "eval_vs_train_backward",
        lambda: bn.backward(dy, out=dx_out),
        lambda: (*layer_state(bn), dx_out),
    )
    record["eval_vs_train_backward_no_gradients"] = np.array(bn.grad_weight is None)


def empty_global_batch(comm, record):
    """Every rank's batch is empty: the gradients are 0, as PyTorch's for an empty batch."""
    empty = np.empty((0, 4))
    weight = np.linspace(0.5, 1.5, 4)
    bn = SyncBatchNorm(4, comm=comm, dtype=np.float64)
    bn(empty)
    bn.backward(empty)
    record["empty_grad_weight"], record["empty_grad_bias"] = bn.grad_weight, bn.grad_bias
    _, mean, invstd = sync_forward_train(empty, weight)
    _, dweight, dbias = sync_backward(empty, empty, mean, invstd, weight)
    record["empty_dweight"], record["empty_dbias"] = dweight, dbias


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


def moments_over_ranks(comm, data, counts, record):
    """allreduce_moments of this rank's rows (none on the empty rank), and population_stats
    with comm over a plain BatchNorm that sees this rank's rows in two batches."""
    x = rows_of_rank(data["func_x"], counts, comm.rank)
    total = allreduce_moments(nbn.moments(x), comm)
    record.update(moments_count=np.array(total.count), moments_array=total.to_array())
    bn = nbn.BatchNorm(6, dtype=np.float64).eval()
    half = len(x) // 2
    with nbn.population_stats(bn, comm=comm):
        for batch in (x[:half], x[half:]):
            if len(batch) > 1:  # one value per channel cannot normalise with batch statistics
                bn(batch)
    record.update(population_mean=bn.running_mean, population_var=bn.running_var)
    record["population_training"] = np.array(bn.training)


def suite(comm, workdir):
    config = json.loads((workdir / "config.json").read_text())
    data = np.load(workdir / "input.npz")
    record = {"size": np.array(comm.size), "rank": np.array(comm.rank)}
    collective_errors(comm, record)
    for name, spec in config["layers"].items():
        train_layer(comm, data, config["counts"], name, spec, record)
    functional(comm, data, config["counts"], record)
    moments_over_ranks(comm, data, config["counts"], record)
    empty_global_batch(comm, record)
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)  # a hang: stacks, exit code 1
    disagreements(comm, record)
    faulthandler.cancel_dump_traceback_later()
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
