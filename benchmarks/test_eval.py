"""Inference forward (running statistics): numba_bn, PyTorch, NumPy naive, on every shape."""


def test_eval(verify_then_time, implementation, case):
    verify_then_time(implementation, case, "eval")
