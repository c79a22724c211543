"""The limit: np.copyto of the same tensor (1 read + 1 write), one thread."""

from numba_bn.bench.peers import Memcpy


def test_memcpy(verify_then_time, case):
    verify_then_time(Memcpy(), case, "memcpy")
