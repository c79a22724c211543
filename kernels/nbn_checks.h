/* nbn_checks.h: the argument checks of numba_bn.h, shared by every C backend in kernels/.
 *
 * Order: NULL pointers (NBN_ERR_NULL), then shapes (NBN_ERR_SHAPE), then values
 * (NBN_ERR_VALUE), so a call with several problems reports the first in that order.
 */
#ifndef NBN_CHECKS_H
#define NBN_CHECKS_H

#include <stdint.h>

#include "numba_bn.h"

/* Sizes are >= 1 and the tensor's byte count fits in int64 (8-byte elements). */
static inline int nbn_check_shape(int64_t outer, int64_t channels, int64_t inner) {
    if (outer < 1 || channels < 1 || inner < 1) return NBN_ERR_SHAPE;
    const int64_t limit = INT64_MAX / 8;
    if (outer > limit / channels || outer * channels > limit / inner) return NBN_ERR_SHAPE;
    return NBN_OK;
}

/* eps >= 0 (NaN fails the comparison). */
static inline int nbn_check_eps(double eps) { return eps >= 0.0 ? NBN_OK : NBN_ERR_VALUE; }

static inline int nbn_check_forward_train(const void *x, int64_t outer, int64_t channels,
                                          int64_t inner, double eps, const void *y,
                                          const void *save_mean, const void *save_invstd,
                                          const void *running_mean, const void *running_var,
                                          double momentum) {
    if (!x || !y || !save_mean || !save_invstd) return NBN_ERR_NULL;
    if ((running_mean == 0) != (running_var == 0)) return NBN_ERR_NULL;
    int status = nbn_check_shape(outer, channels, inner);
    if (status != NBN_OK) return status;
    if (outer * inner == 1) return NBN_ERR_VALUE; /* one value per channel: no variance */
    if (!(momentum >= 0.0 && momentum <= 1.0)) return NBN_ERR_VALUE;
    return nbn_check_eps(eps);
}

static inline int nbn_check_forward_eval(const void *x, int64_t outer, int64_t channels,
                                         int64_t inner, const void *running_mean,
                                         const void *running_var, double eps, const void *y) {
    if (!x || !running_mean || !running_var || !y) return NBN_ERR_NULL;
    int status = nbn_check_shape(outer, channels, inner);
    if (status != NBN_OK) return status;
    return nbn_check_eps(eps);
}

static inline int nbn_check_backward(const void *dy, const void *x, int64_t outer,
                                     int64_t channels, int64_t inner, const void *save_mean,
                                     const void *save_invstd, const void *dx) {
    if (!dy || !x || !save_mean || !save_invstd || !dx) return NBN_ERR_NULL;
    return nbn_check_shape(outer, channels, inner);
}

static inline const char *nbn_status_text(int status) {
    switch (status) {
    case NBN_OK: return "NBN_OK: success";
    case NBN_ERR_NULL: return "NBN_ERR_NULL: a required pointer is NULL";
    case NBN_ERR_SHAPE:
        return "NBN_ERR_SHAPE: outer, channels and inner must be >= 1, their product addressable";
    case NBN_ERR_VALUE:
        return "NBN_ERR_VALUE: training needs 2+ values per channel, eps >= 0, momentum in [0, 1]";
    case NBN_ERR_INTERNAL: return "NBN_ERR_INTERNAL: out of memory or internal error";
    default: return "unknown nbn_status";
    }
}

#endif /* NBN_CHECKS_H */
