/* nbn_numba_runtime.c: the two Numba runtime functions that numba_bn's compiled kernels reference,
 * for the arrays the plugin makes. Linked into libnumba_bn.so with hidden visibility, so they
 * never clash with a Numba loaded in the same process.
 *
 * Every array of the plugin is a `carray` view of a caller's buffer (or a view of one): it has no
 * meminfo and is C-contiguous. Numba still emits reference counting and, for array.reshape, a call
 * into its helper library; these definitions serve exactly those arrays. A kernel that needs any
 * other runtime function (an allocation, say) fails to link, on purpose: the build's
 * -Wl,--no-undefined turns it into an error.
 */
#include <stdint.h>

/* Numba's decref calls this when a meminfo's count drops to zero; the plugin's arrays have no
 * meminfo (decref skips NULL), so there is nothing to destroy. */
void NRT_MemInfo_call_dtor(void *meminfo) { (void)meminfo; }

/* array.reshape without a copy (numba/_helperlib.c, after NumPy's _attempt_nocopy_reshape), for
 * C-contiguous arrays only: 1 and the new strides, or 0 ("needs a copy") for anything else, which
 * Numba raises as an error and the shim reports as NBN_ERR_INTERNAL, never a wrong result. */
int numba_attempt_nocopy_reshape(int64_t nd, const int64_t *dims, const int64_t *strides,
                                 int64_t newnd, const int64_t *newdims, int64_t *newstrides,
                                 int64_t itemsize, int is_f_order) {
    int64_t size = 1, newsize = 1;
    for (int64_t i = nd - 1; i >= 0; i--) {
        if (dims[i] != 1 && strides[i] != size * itemsize) return 0; /* not C-contiguous */
        size *= dims[i];
    }
    for (int64_t i = 0; i < newnd; i++) newsize *= newdims[i];
    if (newsize != size || is_f_order) return 0;
    for (int64_t i = newnd - 1, stride = itemsize; i >= 0; i--) {
        newstrides[i] = stride;
        stride *= newdims[i];
    }
    return 1;
}
