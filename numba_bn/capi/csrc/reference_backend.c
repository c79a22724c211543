/* reference_backend.c: a plain C backend with the ABI of numba_bn.h.
 *
 * Inputs are copied to double, computed by reference.h (one thread, two-pass statistics) and
 * rounded back to the tensor type. Slow and simple on purpose: it is what numba_bn's tests
 * compare against, and the template for anyone who plugs their own C kernels into numba_bn
 * (`numba_bn.register_backend("mine", "libmine.so")`). The typed nbn_*_f32/_f64 entry points
 * and their _ex variants (1.1: residual and activation), and group and layer norm (1.3), come
 * from nbn_entry_points.h, over the seven generic operations below.
 *
 *   cc -std=c11 -O2 -fPIC -shared -I $CSRC $CSRC/reference_backend.c -o libnbn_reference.so -lm
 *   (CSRC: this folder, numba_bn/capi/csrc; installed, numba_bn.capi.csrc_dir())
 */
#include <stdlib.h>
#include <string.h>

#include "nbn_checks.h"
#include "reference.h"

/* ------------------------------------------------------------------ float or double <-> double */
static double *to_double(const void *src, int f64, int64_t n) {
    double *dst = malloc((size_t)n * sizeof(double));
    if (!dst) return NULL;
    if (f64) {
        memcpy(dst, src, (size_t)n * sizeof(double));
    } else {
        for (int64_t i = 0; i < n; i++) dst[i] = ((const float *)src)[i];
    }
    return dst;
}

static void from_double(void *dst, int f64, const double *src, int64_t n) {
    if (f64) {
        memcpy(dst, src, (size_t)n * sizeof(double));
    } else {
        for (int64_t i = 0; i < n; i++) ((float *)dst)[i] = (float)src[i];
    }
}

/* Copies of the optional inputs: NULL stays NULL. Sets *failed when malloc fails. */
static double *optional_to_double(const void *src, int f64, int64_t n, int *failed) {
    if (!src) return NULL;
    double *dst = to_double(src, f64, n);
    if (!dst) *failed = 1;
    return dst;
}

/* NBN_ERR_SHAPE when the double copies of a tensor, or of 3 per-channel vectors (the most one
 * allocation below holds), exceed what one object may span: then no byte count below wraps.
 * On 64-bit targets nbn_check_shape already implies it; a 32-bit size_t does not. */
static int check_copies(int64_t outer, int64_t channels, int64_t inner) {
    size_t bytes;
    int status = nbn_bytes(outer * channels * inner, sizeof(double), &bytes);
    return status != NBN_OK ? status : nbn_bytes(3 * channels, sizeof(double), &bytes);
}

/* ------------------------------------------------------------------------------ operations */
static int forward_train_ex(int f64, const void *x, int64_t outer, int64_t channels,
                            int64_t inner, const void *weight, const void *bias, double eps,
                            void *y, void *save_mean, void *save_invstd, void *running_mean,
                            void *running_var, double momentum, const void *residual,
                            int activation) {
    int status = nbn_check_forward_train_ex(x, outer, channels, inner, eps, y, save_mean,
                                            save_invstd, running_mean, running_var, momentum,
                                            activation);
    if (status == NBN_OK) status = check_copies(outer, channels, inner);
    if (status != NBN_OK) return status;
    int64_t size = outer * channels * inner;
    int failed = 0;
    double *xd = optional_to_double(x, f64, size, &failed);
    double *wd = optional_to_double(weight, f64, channels, &failed);
    double *bd = optional_to_double(bias, f64, channels, &failed);
    double *rm = optional_to_double(running_mean, f64, channels, &failed);
    double *rv = optional_to_double(running_var, f64, channels, &failed);
    double *zd = optional_to_double(residual, f64, size, &failed);
    double *yd = malloc((size_t)size * sizeof(double));
    double *stats = malloc(3 * (size_t)channels * sizeof(double));
    if (!failed && yd && stats) {
        double *mean = stats, *invstd = stats + channels, *var_unbiased = stats + 2 * channels;
        reference_forward_train(xd, outer, channels, inner, wd, bd, eps, yd, mean, invstd,
                                var_unbiased);
        reference_epilogue(yd, size, zd, activation == NBN_ACTIVATION_RELU);
        from_double(y, f64, yd, size);
        from_double(save_mean, f64, mean, channels);
        from_double(save_invstd, f64, invstd, channels);
        if (rm) {
            reference_running_update(channels, mean, var_unbiased, momentum, rm, rv);
            from_double(running_mean, f64, rm, channels);
            from_double(running_var, f64, rv, channels);
        }
    } else {
        status = NBN_ERR_INTERNAL;
    }
    free(xd), free(wd), free(bd), free(rm), free(rv), free(zd), free(yd), free(stats);
    return status;
}

static int forward_eval_ex(int f64, const void *x, int64_t outer, int64_t channels,
                           int64_t inner, const void *weight, const void *bias,
                           const void *running_mean, const void *running_var, double eps,
                           void *y, const void *residual, int activation) {
    int status = nbn_check_forward_eval_ex(x, outer, channels, inner, running_mean, running_var,
                                           eps, y, activation);
    if (status == NBN_OK) status = check_copies(outer, channels, inner);
    if (status != NBN_OK) return status;
    int64_t size = outer * channels * inner;
    int failed = 0;
    double *xd = optional_to_double(x, f64, size, &failed);
    double *wd = optional_to_double(weight, f64, channels, &failed);
    double *bd = optional_to_double(bias, f64, channels, &failed);
    double *rm = optional_to_double(running_mean, f64, channels, &failed);
    double *rv = optional_to_double(running_var, f64, channels, &failed);
    double *zd = optional_to_double(residual, f64, size, &failed);
    double *yd = malloc((size_t)size * sizeof(double));
    double *invstd = malloc((size_t)channels * sizeof(double));
    if (!failed && yd && invstd) {
        reference_forward_eval(xd, outer, channels, inner, wd, bd, rm, rv, eps, invstd, yd);
        reference_epilogue(yd, size, zd, activation == NBN_ACTIVATION_RELU);
        from_double(y, f64, yd, size);
    } else {
        status = NBN_ERR_INTERNAL;
    }
    free(xd), free(wd), free(bd), free(rm), free(rv), free(zd), free(yd), free(invstd);
    return status;
}

static int backward_ex(int f64, const void *dy, const void *x, int64_t outer, int64_t channels,
                       int64_t inner, const void *weight, const void *save_mean,
                       const void *save_invstd, void *dx, void *dweight, void *dbias,
                       const void *y, int activation, void *residual_out) {
    int status = nbn_check_backward_ex(dy, x, outer, channels, inner, save_mean, save_invstd, dx,
                                       y, activation, residual_out,
                                       f64 ? sizeof(double) : sizeof(float));
    if (status == NBN_OK) status = check_copies(outer, channels, inner);
    if (status != NBN_OK) return status;
    int64_t size = outer * channels * inner;
    int failed = 0;
    double *dyd = optional_to_double(dy, f64, size, &failed);
    double *xd = optional_to_double(x, f64, size, &failed);
    double *wd = optional_to_double(weight, f64, channels, &failed);
    double *mean = optional_to_double(save_mean, f64, channels, &failed);
    double *invstd = optional_to_double(save_invstd, f64, channels, &failed);
    int relu = activation == NBN_ACTIVATION_RELU;
    double *yd = relu ? optional_to_double(y, f64, size, &failed) : NULL;
    double *dxd = malloc((size_t)size * sizeof(double));
    double *sums = malloc(2 * (size_t)channels * sizeof(double));
    if (!failed && dxd && sums) {
        /* g, the gradient through the activation: the residual's, and what dx comes from */
        if (relu) reference_relu_grad(dyd, yd, size, dyd);
        reference_backward(dyd, xd, outer, channels, inner, wd, mean, invstd, dxd, sums,
                           sums + channels);
        from_double(dx, f64, dxd, size);
        if (dweight) from_double(dweight, f64, sums, channels);
        if (dbias) from_double(dbias, f64, sums + channels, channels);
        if (residual_out) from_double(residual_out, f64, dyd, size);
    } else {
        status = NBN_ERR_INTERNAL;
    }
    free(dyd), free(xd), free(wd), free(mean), free(invstd), free(yd), free(dxd), free(sums);
    return status;
}

/* ---------------------------------------------------------- group and layer norm (1.3) */
/* The statistics and the parameter gradients are double already: only tensors are copied. */
static int group_norm_forward(int f64, const void *x, int64_t outer, int64_t channels,
                              int64_t inner, int64_t num_groups, const void *weight,
                              const void *bias, double eps, void *y, double *mean,
                              double *invstd) {
    int status = nbn_check_group_norm_forward(x, outer, channels, inner, num_groups, eps, y,
                                              mean, invstd);
    if (status == NBN_OK) status = check_copies(outer, channels, inner);
    if (status != NBN_OK) return status;
    int64_t size = outer * channels * inner;
    int failed = 0;
    double *xd = optional_to_double(x, f64, size, &failed);
    double *wd = optional_to_double(weight, f64, channels, &failed);
    double *bd = optional_to_double(bias, f64, channels, &failed);
    double *yd = malloc((size_t)size * sizeof(double));
    if (!failed && yd) {
        reference_group_norm_forward(xd, outer, channels, inner, num_groups, wd, bd, eps, yd,
                                     mean, invstd);
        from_double(y, f64, yd, size);
    } else {
        status = NBN_ERR_INTERNAL;
    }
    free(xd), free(wd), free(bd), free(yd);
    return status;
}

static int group_norm_backward(int f64, const void *dy, const void *x, int64_t outer,
                               int64_t channels, int64_t inner, int64_t num_groups,
                               const void *weight, const double *mean, const double *invstd,
                               void *dx, double *dweight, double *dbias) {
    int status = nbn_check_group_norm_backward(dy, x, outer, channels, inner, num_groups, mean,
                                               invstd, dx);
    if (status == NBN_OK) status = check_copies(outer, channels, inner);
    if (status != NBN_OK) return status;
    int64_t size = outer * channels * inner;
    int failed = 0;
    double *dyd = optional_to_double(dy, f64, size, &failed);
    double *xd = optional_to_double(x, f64, size, &failed);
    double *wd = optional_to_double(weight, f64, channels, &failed);
    double *dxd = malloc((size_t)size * sizeof(double));
    double *sums = malloc(2 * (size_t)channels * sizeof(double));
    if (!failed && dxd && sums) {
        reference_group_norm_backward(dyd, xd, outer, channels, inner, num_groups, wd, mean,
                                      invstd, dxd, sums, sums + channels);
        from_double(dx, f64, dxd, size);
        if (dweight) memcpy(dweight, sums, (size_t)channels * sizeof(double));
        if (dbias) memcpy(dbias, sums + channels, (size_t)channels * sizeof(double));
    } else {
        status = NBN_ERR_INTERNAL;
    }
    free(dyd), free(xd), free(wd), free(dxd), free(sums);
    return status;
}

static int layer_norm_forward(int f64, const void *x, int64_t rows, int64_t width,
                              const void *weight, const void *bias, double eps, void *y,
                              double *mean, double *invstd) {
    int status = nbn_check_layer_norm_forward(x, rows, width, eps, y, mean, invstd);
    if (status == NBN_OK) status = check_copies(rows, width, 1);
    if (status != NBN_OK) return status;
    int64_t size = rows * width;
    int failed = 0;
    double *xd = optional_to_double(x, f64, size, &failed);
    double *wd = optional_to_double(weight, f64, width, &failed);
    double *bd = optional_to_double(bias, f64, width, &failed);
    double *yd = malloc((size_t)size * sizeof(double));
    if (!failed && yd) {
        reference_layer_norm_forward(xd, rows, width, wd, bd, eps, yd, mean, invstd);
        from_double(y, f64, yd, size);
    } else {
        status = NBN_ERR_INTERNAL;
    }
    free(xd), free(wd), free(bd), free(yd);
    return status;
}

static int layer_norm_backward(int f64, const void *dy, const void *x, int64_t rows,
                               int64_t width, const void *weight, const double *mean,
                               const double *invstd, void *dx, double *dweight, double *dbias) {
    int status = nbn_check_layer_norm_backward(dy, x, rows, width, mean, invstd, dx);
    if (status == NBN_OK) status = check_copies(rows, width, 1);
    if (status != NBN_OK) return status;
    int64_t size = rows * width;
    int failed = 0;
    double *dyd = optional_to_double(dy, f64, size, &failed);
    double *xd = optional_to_double(x, f64, size, &failed);
    double *wd = optional_to_double(weight, f64, width, &failed);
    double *dxd = malloc((size_t)size * sizeof(double));
    double *sums = malloc(2 * (size_t)width * sizeof(double));
    if (!failed && dxd && sums) {
        reference_layer_norm_backward(dyd, xd, rows, width, wd, mean, invstd, dxd, sums,
                                      sums + width);
        from_double(dx, f64, dxd, size);
        if (dweight) memcpy(dweight, sums, (size_t)width * sizeof(double));
        if (dbias) memcpy(dbias, sums + width, (size_t)width * sizeof(double));
    } else {
        status = NBN_ERR_INTERNAL;
    }
    free(dyd), free(xd), free(wd), free(dxd), free(sums);
    return status;
}

/* ------------------------------------------------------------------------------ the C ABI */
NBN_API void nbn_set_num_threads(int n) { (void)n; } /* always one thread */
NBN_API int nbn_get_num_threads(void) { return 1; }
NBN_API const char *nbn_isa(void) { return "reference"; }

#include "nbn_entry_points.h"
