"""4 Python threads x 50 calls of the kernels (batch norm's, group and layer norm's), the parallel
twins among them; exits non-zero on a wrong result.

Run as a script so that the threading layer can be chosen (NUMBA_THREADING_LAYER) per process.
"""

import math
import sys
import threading

import numpy as np

import numba_bn as nbn


def main(threads=4, calls=50):
    from numba_bn.cpu import parallel_min_elements, threads_for

    rng = np.random.default_rng(0)
    # planes (many and few channels), rows, channels-last: the large ones run the parallel
    # twins (from parallel_min_elements() on: the layer's wake-up prices it, the workqueue's
    # ~12x OpenMP's), the first the serial one
    least = parallel_min_elements()
    shapes = [(16, 8, 9, 9)] + [
        (-(-least // math.prod(rest)), *rest)
        for rest in ((8, 33, 33), (72,), (2, 20000), (9, 30, 8))
    ]
    inputs = [rng.standard_normal(shape).astype(np.float32) * 3 + 1 for shape in shapes]
    axes = [1, 1, 1, 1, -1]
    assert all(x.size >= least for x in inputs[1:])
    parallel = sum(threads_for("forward_train", x.size) > 1 for x in inputs)
    # y and the statistics; dx and the parameter gradients (the float64 statistics and sums
    # these calls do not return are a scratch kept per thread and channel count, which a
    # scratch shared by threads would break: the first two have 8, one serial and one parallel)
    cases = [lambda x=x, a=a: nbn.forward_train(x, axis=a)
             for x, a in zip(inputs, axes, strict=True)]  # fmt: skip
    trained = [case()[1:] for case in cases]
    cases += [lambda x=x, a=a, s=s: nbn.backward(x * 0.5, x, *s, axis=a)
              for x, a, s in zip(inputs, axes, trained, strict=True)]  # fmt: skip
    # group and layer norm's parallel kernels, through the same launch guard
    cases += [lambda: (nbn.group_norm(inputs[1], 4),), lambda: (nbn.layer_norm(inputs[2], 72),)]
    expected = [case() for case in cases]
    failures = []

    def work(worker):
        for call in range(calls):
            k = (worker + call) % len(cases)
            results = cases[k]()
            if not all(map(np.array_equal, results, expected[k])):
                failures.append((worker, call, k))

    pool = [threading.Thread(target=work, args=(w,)) for w in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    from numba_bn.cpu.threads import threading_layer

    print(f"layer={threading_layer()} parallel={parallel} failures={len(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
