"""Per-call overhead: each public call minus the serial driver it runs, on prepared buffers.

    python benchmarks/call_overhead.py [N C]        # default (64, 32) float32

The issue's definition (issue 12): what the public call costs beyond the kernels. Both are
timed in this process, min of 40 rounds of 300 calls (a busy moment drops out); check `uptime`.
"""

import sys
import timeit

import numpy as np

import numba_bn as nbn
from numba_bn.cpu import drivers
from numba_bn.cpu.items import MEMORY_ROWS as ROWS


def best(call, number=300):
    call()
    return min(timeit.repeat(call, number=number, repeat=40)) / number * 1e6


def main(n=64, c=32):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((n, c)) + 3).astype(np.float32)
    weight, bias = np.ones(c, np.float32), np.zeros(c, np.float32)
    running_mean, running_var = np.zeros(c, np.float32), np.ones(c, np.float32)
    view, y = x.reshape(n, c, 1), np.empty((n, c, 1), np.float32)
    mean, invstd, m2, sum_dy, sum_dy_xmu = (np.empty(c) for _ in range(5))
    no_saved = np.empty((2, 0), np.float32)  # the statistics rounded to x's dtype: not wanted
    train = best(lambda: drivers.driver("forward_train_split", ROWS)[1](
        view, weight, bias, 1e-5, running_mean, running_var, 0.1, True, False, y, mean, invstd, m2,
        view, no_saved,  # the residual slot: x itself, not read by the plain driver
    ))  # fmt: skip
    evaluate = best(lambda: drivers.driver("forward_eval", ROWS)[1](
        view, weight, bias, running_mean, running_var, 1e-5, y, view
    ))  # fmt: skip
    grads = np.empty((2, c), np.float32)
    back = best(lambda: drivers.driver("backward_split", ROWS)[1](
        view, view, mean, invstd, weight, y, sum_dy, sum_dy_xmu, grads
    ))  # fmt: skip
    _, saved_mean, saved_invstd = nbn.forward_train(x, weight, bias)
    layer = nbn.BatchNorm(c)
    print(f"({n}, {c}) float32; serial drivers: forward_train {train:.2f} us, eval "
          f"{evaluate:.2f}, backward {back:.2f}; overhead (public call - driver):")  # fmt: skip
    rows = [
        ("batch_norm(training=True)", train, lambda: nbn.batch_norm(
            x, running_mean, running_var, weight, bias, training=True)),
        ("forward_train", train, lambda: nbn.forward_train(x, weight, bias)),
        ("forward_eval", evaluate, lambda: nbn.forward_eval(
            x, running_mean, running_var, weight, bias)),
        ("backward", back, lambda: nbn.backward(x, x, saved_mean, saved_invstd, weight)),
        ("BatchNorm forward (train)", train, lambda: layer(x)),
        ("BatchNorm forward + backward", train + back, lambda: (layer(x), layer.backward(x))),
    ]  # fmt: skip
    for name, kernel, call in rows:
        print(f"  {name:<30} {best(call) - kernel:6.2f} us")
    layer.eval()
    print(f"  {'BatchNorm forward (eval)':<30} {best(lambda: layer(x)) - evaluate:6.2f} us")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:3]))
