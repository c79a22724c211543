"""Training-mode backward (dx, dweight, dbias): numba_bn, PyTorch, NumPy naive, on every shape."""


def test_backward(verify_then_time, implementation, case):
    verify_then_time(implementation, case, "backward")
