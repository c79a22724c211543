/* nbn_entry_points.h: the typed entry points of numba_bn.h over a backend's generic operations.
 *
 * Include it at the end of a C backend that defines, as static functions with `int f64` (0: float,
 * 1: double) in front and the tensor arguments as void pointers,
 *   forward_train_ex(f64, x, outer, channels, inner, weight, bias, eps, y, save_mean,
 *                    save_invstd, running_mean, running_var, momentum, residual, activation)
 *   forward_eval_ex(f64, x, outer, channels, inner, weight, bias, running_mean, running_var, eps,
 *                   y, residual, activation)
 *   backward_ex(f64, dy, x, outer, channels, inner, weight, save_mean, save_invstd, dx, dweight,
 *               dbias, y, activation, residual_out)
 * and (1.3)
 *   group_norm_forward(f64, x, outer, channels, inner, num_groups, weight, bias, eps, y, mean,
 *                      invstd)
 *   group_norm_backward(f64, dy, x, outer, channels, inner, num_groups, weight, mean, invstd,
 *                       dx, dweight, dbias)
 *   layer_norm_forward(f64, x, rows, width, weight, bias, eps, y, mean, invstd)
 *   layer_norm_backward(f64, dy, x, rows, width, weight, mean, invstd, dx, dweight, dbias)
 * (statistics and parameter gradients as double *). It defines nbn_version, nbn_status_string,
 * the six nbn_*_ex_f32/_f64 functions (1.1) and the six plain nbn_*_f32/_f64 ones, which call
 * the _ex operations with no residual, no activation and no residual gradient, (1.2) the layer
 * handle over them (nbn_layer.h) and (1.3) the eight nbn_group_norm_* and nbn_layer_norm_*
 * functions.
 */
#ifndef NBN_ENTRY_POINTS_H
#define NBN_ENTRY_POINTS_H

#include "nbn_checks.h"

NBN_API uint32_t nbn_version(void) { return NBN_VERSION_NUMBER; }

NBN_API const char *nbn_status_string(int status) { return nbn_status_text(status); }

#define NBN_ENTRY_POINTS(T, SUFFIX, F64)                                                          \
    NBN_API int nbn_forward_train_ex_##SUFFIX(                                                    \
        const T *x, int64_t outer, int64_t channels, int64_t inner, const T *weight,              \
        const T *bias, double eps, T *y, T *save_mean, T *save_invstd, T *running_mean,           \
        T *running_var, double momentum, const T *residual, int activation) {                     \
        return forward_train_ex(F64, x, outer, channels, inner, weight, bias, eps, y, save_mean,  \
                                save_invstd, running_mean, running_var, momentum, residual,       \
                                activation);                                                      \
    }                                                                                             \
    NBN_API int nbn_forward_eval_ex_##SUFFIX(                                                     \
        const T *x, int64_t outer, int64_t channels, int64_t inner, const T *weight,              \
        const T *bias, const T *running_mean, const T *running_var, double eps, T *y,             \
        const T *residual, int activation) {                                                      \
        return forward_eval_ex(F64, x, outer, channels, inner, weight, bias, running_mean,        \
                               running_var, eps, y, residual, activation);                        \
    }                                                                                             \
    NBN_API int nbn_backward_ex_##SUFFIX(                                                         \
        const T *dy, const T *x, int64_t outer, int64_t channels, int64_t inner,                  \
        const T *weight, const T *save_mean, const T *save_invstd, T *dx, T *dweight, T *dbias,   \
        const T *y, int activation, T *residual_out) {                                            \
        return backward_ex(F64, dy, x, outer, channels, inner, weight, save_mean, save_invstd,    \
                           dx, dweight, dbias, y, activation, residual_out);                      \
    }                                                                                             \
    NBN_API int nbn_forward_train_##SUFFIX(                                                       \
        const T *x, int64_t outer, int64_t channels, int64_t inner, const T *weight,              \
        const T *bias, double eps, T *y, T *save_mean, T *save_invstd, T *running_mean,           \
        T *running_var, double momentum) {                                                        \
        return forward_train_ex(F64, x, outer, channels, inner, weight, bias, eps, y, save_mean,  \
                                save_invstd, running_mean, running_var, momentum, NULL,           \
                                NBN_ACTIVATION_NONE);                                             \
    }                                                                                             \
    NBN_API int nbn_forward_eval_##SUFFIX(const T *x, int64_t outer, int64_t channels,            \
                                          int64_t inner, const T *weight, const T *bias,          \
                                          const T *running_mean, const T *running_var,            \
                                          double eps, T *y) {                                     \
        return forward_eval_ex(F64, x, outer, channels, inner, weight, bias, running_mean,        \
                               running_var, eps, y, NULL, NBN_ACTIVATION_NONE);                   \
    }                                                                                             \
    NBN_API int nbn_backward_##SUFFIX(const T *dy, const T *x, int64_t outer, int64_t channels,   \
                                      int64_t inner, const T *weight, const T *save_mean,         \
                                      const T *save_invstd, T *dx, T *dweight, T *dbias) {        \
        return backward_ex(F64, dy, x, outer, channels, inner, weight, save_mean, save_invstd,    \
                           dx, dweight, dbias, NULL, NBN_ACTIVATION_NONE, NULL);                  \
    }                                                                                             \
    NBN_API int nbn_group_norm_forward_##SUFFIX(                                                  \
        const T *x, int64_t outer, int64_t channels, int64_t inner, int64_t num_groups,           \
        const T *weight, const T *bias, double eps, T *y, double *mean, double *invstd) {         \
        return group_norm_forward(F64, x, outer, channels, inner, num_groups, weight, bias, eps,  \
                                  y, mean, invstd);                                               \
    }                                                                                             \
    NBN_API int nbn_group_norm_backward_##SUFFIX(                                                 \
        const T *dy, const T *x, int64_t outer, int64_t channels, int64_t inner,                  \
        int64_t num_groups, const T *weight, const double *mean, const double *invstd, T *dx,     \
        double *dweight, double *dbias) {                                                         \
        return group_norm_backward(F64, dy, x, outer, channels, inner, num_groups, weight, mean,  \
                                   invstd, dx, dweight, dbias);                                   \
    }                                                                                             \
    NBN_API int nbn_layer_norm_forward_##SUFFIX(const T *x, int64_t rows, int64_t width,          \
                                                const T *weight, const T *bias, double eps, T *y, \
                                                double *mean, double *invstd) {                   \
        return layer_norm_forward(F64, x, rows, width, weight, bias, eps, y, mean, invstd);       \
    }                                                                                             \
    NBN_API int nbn_layer_norm_backward_##SUFFIX(                                                 \
        const T *dy, const T *x, int64_t rows, int64_t width, const T *weight,                    \
        const double *mean, const double *invstd, T *dx, double *dweight, double *dbias) {        \
        return layer_norm_backward(F64, dy, x, rows, width, weight, mean, invstd, dx, dweight,    \
                                   dbias);                                                        \
    }

NBN_ENTRY_POINTS(float, f32, 0)
NBN_ENTRY_POINTS(double, f64, 1)

#undef NBN_ENTRY_POINTS

#include "nbn_layer.h"

#endif /* NBN_ENTRY_POINTS_H */
