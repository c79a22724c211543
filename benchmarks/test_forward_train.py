"""Training forward (batch statistics): numba_bn, PyTorch, NumPy naive, on every shape."""


def test_forward_train(verify_then_time, implementation, case):
    verify_then_time(implementation, case, "forward-train")
