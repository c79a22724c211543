"""Per-call overhead: each public call minus the serial driver it runs, on prepared buffers.

    python benchmarks/call_overhead.py [N C]        # default (64, 32) float32

The issue's definition (issue 12): what the public call costs beyond the kernels. Both are
timed in this process, min of 40 rounds of 300 calls (a busy moment drops out); check `uptime`.
The kernels are the serial drivers' machine code, called through its entry point as the plans
call it (numba_bn.cpu._plan; ~0.1-0.3 us of unboxing the arguments, which the fronts of
cpu/fronts.py do not pay): before stop 63 they were timed through Numba's dispatcher, which
typed their 8-15 arguments (~1-1.5 us) and made the overhead look that much smaller.
"""

import sys
import timeit

import numpy as np

import numba_bn as nbn
from numba_bn import cpu


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
    for _ in range(2):  # compiled or loaded, then the plans kept
        nbn.forward_train(x, weight, bias), nbn.backward(x, x, *nbn.forward_train(x)[1:])
        nbn.forward_eval(x, running_mean, running_var)
    run_train = cpu._plan("forward_train", view, may_fuse=True)[0]
    run_eval, run_back = cpu._plan("forward_eval", view)[0], cpu._plan("backward", view, True)[0]
    train = best(lambda: run_train(
        view, weight, bias, 1e-5, running_mean, running_var, 0.1, True, False, y, mean, invstd, m2,
        view, no_saved,  # the residual slot: x itself, not read by the plain driver
    ))  # fmt: skip
    evaluate = best(lambda: run_eval(view, weight, bias, running_mean, running_var, 1e-5, y, view))
    grads = np.empty((2, c), np.float32)
    back = best(lambda: run_back(view, view, mean, invstd, weight, y, sum_dy, sum_dy_xmu, grads))
    _, saved_mean, saved_invstd = nbn.forward_train(x, weight, bias)
    layer = nbn.BatchNorm(c)
    print(f"({n}, {c}) float32; serial drivers' machine code: forward_train {train:.2f} us, eval "
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
