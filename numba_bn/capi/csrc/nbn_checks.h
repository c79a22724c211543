/* nbn_checks.h: the argument checks of numba_bn.h, shared by every C backend in csrc/.
 *
 * Order: NULL pointers (NBN_ERR_NULL), then shapes (NBN_ERR_SHAPE), then values
 * (NBN_ERR_VALUE), then overlapping buffers (NBN_ERR_ALIAS), so a call with several problems
 * reports the first in that order. The checks of the _ex entry points (1.1) are those of the
 * plain ones plus their own arguments, in the same order. A backend
 * then sizes its scratch with nbn_mul, nbn_add and nbn_bytes: a shape can pass these checks and
 * still need more scratch than any address space holds (NBN_ERR_SHAPE, after the value checks).
 */
#ifndef NBN_CHECKS_H
#define NBN_CHECKS_H

#include <stddef.h>
#include <stdint.h>

#include "numba_bn.h"

/* Sizes are >= 1 and the tensor's byte count fits in int64 (8-byte elements). Each of outer,
 * channels, inner and their product is then below INT64_MAX / 8, so a multiple of one of them by
 * a constant below 8 is exact; a product of two, or a byte count, goes through the helpers
 * below. */
static inline int nbn_check_shape(int64_t outer, int64_t channels, int64_t inner) {
    if (outer < 1 || channels < 1 || inner < 1) return NBN_ERR_SHAPE;
    const int64_t limit = INT64_MAX / 8;
    if (outer > limit / channels || outer * channels > limit / inner) return NBN_ERR_SHAPE;
    return NBN_OK;
}

/* a * b and a + b of counts (>= 0), or -1 when the result exceeds INT64_MAX; -1 stays -1. */
static inline int64_t nbn_mul(int64_t a, int64_t b) {
    if (a < 0 || b < 0 || (a > 0 && b > INT64_MAX / a)) return -1;
    return a * b;
}

static inline int64_t nbn_add(int64_t a, int64_t b) {
    if (a < 0 || b < 0 || a > INT64_MAX - b) return -1;
    return a + b;
}

/* *bytes = count * size for malloc, or NBN_ERR_SHAPE when count overflowed (-1) or the bytes
 * exceed PTRDIFF_MAX, the most one object may span (on 32-bit targets too). */
static inline int nbn_bytes(int64_t count, size_t size, size_t *bytes) {
    if (count < 0 || (uint64_t)count > (uint64_t)PTRDIFF_MAX / size) return NBN_ERR_SHAPE;
    *bytes = (size_t)count * size;
    return NBN_OK;
}

/* Training: eps > 0. A channel of equal values (a dead ReLU, a constant feature) is common in a
 * batch, and eps is all that keeps its invstd = 1 / sqrt(0 + eps) finite. Eval: eps >= 0; the
 * running variance is the caller's, and eps = 0 with a zero variance gives inf/NaN (IEEE, as
 * PyTorch). NaN fails both comparisons. */
static inline int nbn_check_train_eps(double eps) { return eps > 0.0 ? NBN_OK : NBN_ERR_VALUE; }
static inline int nbn_check_eval_eps(double eps) { return eps >= 0.0 ? NBN_OK : NBN_ERR_VALUE; }

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
    return nbn_check_train_eps(eps);
}

static inline int nbn_check_forward_eval(const void *x, int64_t outer, int64_t channels,
                                         int64_t inner, const void *running_mean,
                                         const void *running_var, double eps, const void *y) {
    if (!x || !running_mean || !running_var || !y) return NBN_ERR_NULL;
    int status = nbn_check_shape(outer, channels, inner);
    if (status != NBN_OK) return status;
    return nbn_check_eval_eps(eps);
}

static inline int nbn_check_backward(const void *dy, const void *x, int64_t outer,
                                     int64_t channels, int64_t inner, const void *save_mean,
                                     const void *save_invstd, const void *dx) {
    if (!dy || !x || !save_mean || !save_invstd || !dx) return NBN_ERR_NULL;
    return nbn_check_shape(outer, channels, inner);
}

/* An activation code of nbn_activation. */
static inline int nbn_check_activation(int activation) {
    return activation == NBN_ACTIVATION_NONE || activation == NBN_ACTIVATION_RELU
               ? NBN_OK
               : NBN_ERR_VALUE;
}

static inline int nbn_check_forward_train_ex(const void *x, int64_t outer, int64_t channels,
                                             int64_t inner, double eps, const void *y,
                                             const void *save_mean, const void *save_invstd,
                                             const void *running_mean, const void *running_var,
                                             double momentum, int activation) {
    int status = nbn_check_forward_train(x, outer, channels, inner, eps, y, save_mean,
                                         save_invstd, running_mean, running_var, momentum);
    return status != NBN_OK ? status : nbn_check_activation(activation);
}

static inline int nbn_check_forward_eval_ex(const void *x, int64_t outer, int64_t channels,
                                            int64_t inner, const void *running_mean,
                                            const void *running_var, double eps, const void *y,
                                            int activation) {
    int status =
        nbn_check_forward_eval(x, outer, channels, inner, running_mean, running_var, eps, y);
    return status != NBN_OK ? status : nbn_check_activation(activation);
}

/* Whether two tensors of `bytes` bytes each share a byte (NULL shares none). */
static inline int nbn_overlaps(const void *a, const void *b, size_t bytes) {
    if (!a || !b) return 0;
    uintptr_t p = (uintptr_t)a, q = (uintptr_t)b;
    return p < q + bytes && q < p + bytes;
}

/* nbn_backward_ex_*: y is required with ReLU; residual_out (optional) overlaps none of x, dy,
 * y and dx. `element` is the tensor type's size in bytes. */
static inline int nbn_check_backward_ex(const void *dy, const void *x, int64_t outer,
                                        int64_t channels, int64_t inner, const void *save_mean,
                                        const void *save_invstd, const void *dx, const void *y,
                                        int activation, const void *residual_out,
                                        size_t element) {
    if (activation == NBN_ACTIVATION_RELU && !y) return NBN_ERR_NULL;
    int status = nbn_check_backward(dy, x, outer, channels, inner, save_mean, save_invstd, dx);
    if (status == NBN_OK) status = nbn_check_activation(activation);
    if (status != NBN_OK || !residual_out) return status;
    /* below INT64_MAX after nbn_check_shape (8-byte elements at most) */
    size_t bytes = (size_t)(outer * channels * inner) * element;
    const void *inputs[] = {x, dy, y, dx};
    for (size_t k = 0; k < sizeof inputs / sizeof inputs[0]; k++)
        if (nbn_overlaps(residual_out, inputs[k], bytes)) return NBN_ERR_ALIAS;
    return NBN_OK;
}

/* (1.3) Group and layer norm. Group norm: x (outer, channels, inner) as batch norm's, and
 * num_groups >= 1 (NBN_ERR_SHAPE) dividing channels (NBN_ERR_VALUE). Layer norm: x (rows, width),
 * both >= 1. One value per group or row is allowed: y is then bias (x_hat = 0), as PyTorch. */
static inline int nbn_check_groups(int64_t outer, int64_t channels, int64_t inner,
                                   int64_t num_groups) {
    int status = nbn_check_shape(outer, channels, inner);
    if (status != NBN_OK) return status;
    if (num_groups < 1) return NBN_ERR_SHAPE;
    return channels % num_groups ? NBN_ERR_VALUE : NBN_OK;
}

static inline int nbn_check_group_norm_forward(const void *x, int64_t outer, int64_t channels,
                                               int64_t inner, int64_t num_groups, double eps,
                                               const void *y, const void *mean,
                                               const void *invstd) {
    if (!x || !y || !mean || !invstd) return NBN_ERR_NULL;
    int status = nbn_check_groups(outer, channels, inner, num_groups);
    return status != NBN_OK ? status : nbn_check_train_eps(eps);
}

static inline int nbn_check_group_norm_backward(const void *dy, const void *x, int64_t outer,
                                                int64_t channels, int64_t inner,
                                                int64_t num_groups, const void *mean,
                                                const void *invstd, const void *dx) {
    if (!dy || !x || !mean || !invstd || !dx) return NBN_ERR_NULL;
    return nbn_check_groups(outer, channels, inner, num_groups);
}

static inline int nbn_check_layer_norm_forward(const void *x, int64_t rows, int64_t width,
                                               double eps, const void *y, const void *mean,
                                               const void *invstd) {
    if (!x || !y || !mean || !invstd) return NBN_ERR_NULL;
    int status = nbn_check_shape(rows, width, 1);
    return status != NBN_OK ? status : nbn_check_train_eps(eps);
}

static inline int nbn_check_layer_norm_backward(const void *dy, const void *x, int64_t rows,
                                                int64_t width, const void *mean,
                                                const void *invstd, const void *dx) {
    if (!dy || !x || !mean || !invstd || !dx) return NBN_ERR_NULL;
    return nbn_check_shape(rows, width, 1);
}

static inline const char *nbn_status_text(int status) {
    switch (status) {
    case NBN_OK: return "NBN_OK: success";
    case NBN_ERR_NULL: return "NBN_ERR_NULL: a required pointer is NULL";
    case NBN_ERR_SHAPE:
        return "NBN_ERR_SHAPE: outer, channels and inner (num_groups, rows, width) must be >= 1, "
               "their product and the call's scratch addressable";
    case NBN_ERR_VALUE:
        return "NBN_ERR_VALUE: training needs 2+ values per channel, eps > 0, momentum in [0, 1]; "
               "eval needs eps >= 0; activation must be an nbn_activation code; a layer's dtype, "
               "flags and buffer must be known codes; num_groups must divide channels";
    case NBN_ERR_INTERNAL: return "NBN_ERR_INTERNAL: out of memory or internal error";
    case NBN_ERR_ALIAS:
        return "NBN_ERR_ALIAS: residual_out overlaps x, dy, y or dx";
    case NBN_ERR_STATE:
        return "NBN_ERR_STATE: the layer has no forward with batch statistics to differentiate "
               "(none yet, its backward ran, or an eval-mode forward came after it)";
    default: return "unknown nbn_status";
    }
}

#endif /* NBN_CHECKS_H */
