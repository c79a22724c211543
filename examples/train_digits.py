"""Train an MLP on scikit-learn's digits with and without batch norm, NumPy and numba_bn only.

The same as ``numba-bn train-demo``; the code lives in the package so that the command works
from an installed numba_bn: the network in numba_bn/mlp.py, data, training loop and plot in
numba_bn/train_demo.py. Try ``python examples/train_digits.py --help``.
"""

import sys

from numba_bn.train_demo import main

if __name__ == "__main__":
    sys.exit(main())
