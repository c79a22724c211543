import numba
import numpy as np

import numba_bn as nbn
from numba_bn.cpu import drivers


def test_warmup_compiles_serial_and_parallel_twins_for_both_dtypes():
    nbn.warmup()
    expect_parallel = numba.get_num_threads() > 1
    for name in ("forward_train", "forward_eval", "backward"):
        for twin in (getattr(drivers, name + "_serial"),) + (
            (getattr(drivers, name),) if expect_parallel else ()
        ):
            dtypes = {sig[0].dtype for sig in twin.signatures}
            assert {numba.float32, numba.float64} <= dtypes, (twin, dtypes)
    assert np.isfinite(nbn.warmup())
