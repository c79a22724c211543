/* numba_bn.h: batch normalisation from C (the C ABI of numba_bn).
 *
 * libnumba_bn.so is built from numba_bn's own Numba kernels (`numba-bn build-plugin --out DIR`)
 * and needs only libc, libm and libpthread at run time. Any shared library that exports these
 * symbols can also serve numba_bn's Python API as a backend (numba_bn.register_backend).
 *
 * Tensors are C-contiguous arrays of shape (outer, channels, inner): NCHW is
 * (N, C, H*W), NHWC is (N*H*W, C, 1), (N, C) is (N, C, 1). Per-channel vectors have length
 * `channels`. Statistics are accumulated in double precision whatever the tensor type.
 *
 * Ownership: the caller owns every buffer; the library keeps no pointer after a call returns
 * and allocates only scratch that it frees before returning. Calls are thread-safe: several
 * threads may call at once (each call then runs its own worker threads).
 *
 * Errors: every function returns an nbn_status. On failure nothing is written, except after
 * NBN_ERR_INTERNAL raised by the compute code itself (a bug), when outputs are unspecified.
 * The order of checks: NULL pointers, then shapes, then values, then overlapping buffers; then
 * the call's scratch (NBN_ERR_SHAPE when its byte count would overflow, NBN_ERR_INTERNAL when
 * malloc fails).
 */
#ifndef NUMBA_BN_H
#define NUMBA_BN_H

#include <stdint.h>

#define NBN_VERSION_MAJOR 1 /* bumped when a signature or a meaning changes */
#define NBN_VERSION_MINOR 1 /* bumped when symbols are added; 1: the _ex entry points (fused
                              residual add and activation, nbn_activation, NBN_ERR_ALIAS) */
#define NBN_VERSION_PATCH 0 /* 1.0.1: eps <= 0 in training and scratch that overflows refused */
#define NBN_VERSION_NUMBER (NBN_VERSION_MAJOR * 10000 + NBN_VERSION_MINOR * 100 + NBN_VERSION_PATCH)

#if defined(_WIN32)
#define NBN_API __declspec(dllexport)
#elif defined(__GNUC__)
#define NBN_API __attribute__((visibility("default")))
#else
#define NBN_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    NBN_OK = 0,
    NBN_ERR_NULL = 1,     /* a required pointer is NULL (or only one running buffer is given) */
    NBN_ERR_SHAPE = 2,    /* outer, channels or inner < 1, or their product (or the bytes of
                             the call's scratch) overflows */
    NBN_ERR_VALUE = 3,    /* one value per channel in training, eps <= 0 in training (< 0 in
                             eval) or NaN, momentum outside [0, 1] or NaN, an unknown
                             activation code (1.1) */
    NBN_ERR_INTERNAL = 4, /* out of memory for scratch, or a bug */
    NBN_ERR_ALIAS = 5     /* (1.1) an output overlaps a buffer it must not: residual_out of
                             nbn_backward_ex_* with x, dy, y or dx */
} nbn_status;

/* (1.1) The activation of the fused entry points (the `activation` argument of the _ex
 * functions); an int in their signatures, so that codes can be added. */
typedef enum {
    NBN_ACTIVATION_NONE = 0, /* y = BN(x) (+ residual) */
    NBN_ACTIVATION_RELU = 1  /* y = max(BN(x) (+ residual), 0); NaN stays NaN (as torch.relu) */
} nbn_activation;

/* NBN_VERSION_NUMBER of the library loaded: major * 10000 + minor * 100 + patch. */
NBN_API uint32_t nbn_version(void);

/* "NBN_OK: success", "NBN_ERR_NULL: ...": a static string, also for unknown codes. */
NBN_API const char *nbn_status_string(int status);

/* Worker threads per call, for every thread of the process: n <= 0 means all the CPUs this
 * process may run on (the default). Results do not depend on the number of threads. */
NBN_API void nbn_set_num_threads(int n);
NBN_API int nbn_get_num_threads(void);

/* Which compiled variant runs here, chosen at load time ("x86-64-v4" = AVX-512,
 * "x86-64-v3" = AVX2/FMA, "x86-64-v2"); NBN_ISA=<name> in the environment picks a lower one.
 * An addition of numba_bn's library: other backends need not export it. */
NBN_API const char *nbn_isa(void);

/* Training forward with batch statistics:
 *   mean, var = per-channel mean and biased variance of x over outer and inner
 *   y = (x - mean) / sqrt(var + eps) * weight + bias
 *   save_mean = mean, save_invstd = 1 / sqrt(var + eps)     (what nbn_backward_* takes)
 * weight and bias may be NULL (1 and 0). running_mean and running_var may both be NULL (no
 * update); otherwise they are updated in place, PyTorch-style:
 *   running = (1 - momentum) * running + momentum * batch  (unbiased batch variance).
 * Needs outer * inner >= 2 and eps > 0 (a channel of equal values has variance 0). y may be x
 * (in place). */
NBN_API int nbn_forward_train_f32(const float *x, int64_t outer, int64_t channels, int64_t inner,
                                  const float *weight, const float *bias, double eps, float *y,
                                  float *save_mean, float *save_invstd, float *running_mean,
                                  float *running_var, double momentum);

/* Inference forward with frozen statistics:
 *   y = (x - running_mean) / sqrt(running_var + eps) * weight + bias
 * weight and bias may be NULL. y may be x. eps >= 0: with eps = 0 a channel whose running_var
 * is 0 gets y = inf or NaN (IEEE, as PyTorch), not an error. */
NBN_API int nbn_forward_eval_f32(const float *x, int64_t outer, int64_t channels, int64_t inner,
                                 const float *weight, const float *bias,
                                 const float *running_mean, const float *running_var, double eps,
                                 float *y);

/* Backward of the training forward, given dy = dL/dy and the forward's x, save_mean and
 * save_invstd (x_hat = (x - save_mean) * save_invstd, m = outer * inner):
 *   dbias   = sum(dy)                                      (may be NULL: not written)
 *   dweight = sum(dy * x_hat)                              (may be NULL: not written)
 *   dx      = weight * save_invstd * (dy - dbias / m - x_hat * dweight / m)
 * weight may be NULL (1). dx may be dy. */
NBN_API int nbn_backward_f32(const float *dy, const float *x, int64_t outer, int64_t channels,
                             int64_t inner, const float *weight, const float *save_mean,
                             const float *save_invstd, float *dx, float *dweight, float *dbias);

/* (1.1) The fused forward of a residual block, y = activation(BN(x) + residual), in the same
 * pass over memory as the plain forward: the arguments of nbn_forward_train_f32 followed by
 *   residual   NULL (no residual, y = activation(BN(x))) or a tensor shaped like x, read only;
 *              y may be residual (in place) or x, and must not partially overlap either;
 *   activation NBN_ACTIVATION_NONE or NBN_ACTIVATION_RELU (anything else: NBN_ERR_VALUE).
 * save_mean, save_invstd and the running update are those of the plain forward (statistics of
 * x only). With residual NULL and NBN_ACTIVATION_NONE it is nbn_forward_train_f32. */
NBN_API int nbn_forward_train_ex_f32(const float *x, int64_t outer, int64_t channels,
                                     int64_t inner, const float *weight, const float *bias,
                                     double eps, float *y, float *save_mean, float *save_invstd,
                                     float *running_mean, float *running_var, double momentum,
                                     const float *residual, int activation);

/* (1.1) The fused inference forward, y = activation(BN_eval(x) + residual): the arguments of
 * nbn_forward_eval_f32, then residual and activation as in nbn_forward_train_ex_f32. */
NBN_API int nbn_forward_eval_ex_f32(const float *x, int64_t outer, int64_t channels,
                                    int64_t inner, const float *weight, const float *bias,
                                    const float *running_mean, const float *running_var,
                                    double eps, float *y, const float *residual, int activation);

/* (1.1) Backward of the fused training forward: the arguments of nbn_backward_f32 followed by
 *   y            the fused forward's output, shaped like x, read only: required (else
 *                NBN_ERR_NULL) with NBN_ACTIVATION_RELU, not read (may be NULL) without;
 *   activation   the fused forward's (anything else than its codes: NBN_ERR_VALUE);
 *   residual_out NULL (not wanted) or a tensor shaped like dy, written (=) with the gradient of
 *                the residual, g = dL/d(BN(x) + residual):
 *                  NBN_ACTIVATION_RELU: g = dy where y > 0, else 0;
 *                  NBN_ACTIVATION_NONE: g = dy.
 *                It must not overlap x, dy, y or dx (NBN_ERR_ALIAS).
 * dx, dweight and dbias are those of nbn_backward_f32 with dy replaced by g. With
 * residual_out NULL and relu, g lives in scratch the call allocates (one tensor) and frees.
 * dx may be dy. With NBN_ACTIVATION_NONE and residual_out NULL it is nbn_backward_f32. */
NBN_API int nbn_backward_ex_f32(const float *dy, const float *x, int64_t outer, int64_t channels,
                                int64_t inner, const float *weight, const float *save_mean,
                                const float *save_invstd, float *dx, float *dweight, float *dbias,
                                const float *y, int activation, float *residual_out);

/* The same six for double. */
NBN_API int nbn_forward_train_f64(const double *x, int64_t outer, int64_t channels, int64_t inner,
                                  const double *weight, const double *bias, double eps, double *y,
                                  double *save_mean, double *save_invstd, double *running_mean,
                                  double *running_var, double momentum);
NBN_API int nbn_forward_eval_f64(const double *x, int64_t outer, int64_t channels, int64_t inner,
                                 const double *weight, const double *bias,
                                 const double *running_mean, const double *running_var,
                                 double eps, double *y);
NBN_API int nbn_backward_f64(const double *dy, const double *x, int64_t outer, int64_t channels,
                             int64_t inner, const double *weight, const double *save_mean,
                             const double *save_invstd, double *dx, double *dweight,
                             double *dbias);
NBN_API int nbn_forward_train_ex_f64(const double *x, int64_t outer, int64_t channels,
                                     int64_t inner, const double *weight, const double *bias,
                                     double eps, double *y, double *save_mean,
                                     double *save_invstd, double *running_mean,
                                     double *running_var, double momentum,
                                     const double *residual, int activation);
NBN_API int nbn_forward_eval_ex_f64(const double *x, int64_t outer, int64_t channels,
                                    int64_t inner, const double *weight, const double *bias,
                                    const double *running_mean, const double *running_var,
                                    double eps, double *y, const double *residual,
                                    int activation);
NBN_API int nbn_backward_ex_f64(const double *dy, const double *x, int64_t outer,
                                int64_t channels, int64_t inner, const double *weight,
                                const double *save_mean, const double *save_invstd, double *dx,
                                double *dweight, double *dbias, const double *y, int activation,
                                double *residual_out);

#ifdef __cplusplus
}
#endif

#endif /* NUMBA_BN_H */
