import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_child(command, env=None, timeout=600, stop_signal=signal.SIGKILL):
    """(return code, stdout + stderr) of ``command``, run at the repository root with this
    checkout first on PYTHONPATH and ``env`` over the current environment.

    The child gets its own process session, so on timeout its whole group (mpiexec and its
    ranks, say) gets ``stop_signal``, SIGKILL 10 s later, and the test fails.
    """
    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
    )
    process = subprocess.Popen(
        [str(part) for part in command], cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, stop_signal)
        try:
            output, _ = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
        command_line = " ".join(str(part) for part in command)
        pytest.fail(f"{command_line} did not finish in {timeout} s:\n{output[-4000:]}")
    return process.returncode, output


@pytest.fixture
def rng(request):
    """A fresh generator per test; its seed is printed so that a failure can be replayed."""
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"rng seed for {request.node.nodeid}: {seed}")
    return np.random.default_rng(seed)


def random_batch(rng, shape, dtype=np.float64, mean_scale=5.0, std_range=(0.1, 10.0), axis=1):
    """Per-channel non-zero means and varied spreads: what real activations look like."""
    axis = axis % len(shape)
    channels = shape[axis]
    means = rng.uniform(-mean_scale, mean_scale, channels)
    stds = np.exp(rng.uniform(np.log(std_range[0]), np.log(std_range[1]), channels))
    bshape = [1] * len(shape)
    bshape[axis] = channels
    x = rng.standard_normal(shape) * stds.reshape(bshape) + means.reshape(bshape)
    return x.astype(dtype)


def poison(shape, dtype):
    """An output buffer full of NaN, so that any element a kernel forgets to write shows."""
    return np.full(shape, np.nan, dtype)


# (shape, axis) layouts every behaviour is checked on: rows, planes, channels-last, rank 5,
# odd channel counts, and a plane longer than one PLANE_BLOCK segment.
LAYOUTS = [
    ((16, 5), 1),
    ((7, 3, 11), 1),
    ((4, 6, 5, 7), 1),
    ((3, 5, 4, 6), -1),
    ((2, 3, 4, 3, 5), 1),
    ((2, 4, 3, 5), 2),
    ((3, 1, 4500), 1),
    ((200, 1), 1),
]
