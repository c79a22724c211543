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
 * threads may call at once (numba_bn's library keeps one pool of worker threads; a call that
 * finds it busy runs on its calling thread alone, with the same results). The one exception is
 * the layer handle (1.2, at the end of this file): an nbn_layer owns its parameters, running
 * buffers, saved statistics and gradients until nbn_layer_destroy.
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
#define NBN_VERSION_MINOR 4 /* bumped when symbols are added; 1: the _ex entry points (fused
                              residual add and activation, nbn_activation, NBN_ERR_ALIAS);
                              2: the layer handle (nbn_layer_*, nbn_dtype, nbn_layer_flags,
                              nbn_layer_buffer, NBN_ERR_STATE); 3: group (and instance) norm
                              and layer norm (nbn_group_norm_*, nbn_layer_norm_*); 4: batch
                              norm with double statistics (nbn_forward_train_stats_*,
                              nbn_backward_stats_*; numba_bn's library only) */
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
                             the call's scratch) overflows; (1.3) num_groups, rows or
                             width < 1 */
    NBN_ERR_VALUE = 3,    /* one value per channel in training, eps <= 0 in training (< 0 in
                             eval) or NaN, momentum outside [0, 1] or NaN, an unknown
                             activation code (1.1); (1.3) num_groups not dividing channels */
    NBN_ERR_INTERNAL = 4, /* out of memory for scratch, or a bug */
    NBN_ERR_ALIAS = 5,    /* (1.1) an output overlaps a buffer it must not: residual_out of
                             nbn_backward_ex_* with x, dy, y or dx */
    NBN_ERR_STATE = 6     /* (1.2) nbn_layer_backward* with no forward to differentiate: none
                             with batch statistics since the layer was created, since the last
                             backward, or since a forward with running statistics (eval) */
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

/* Threads per call (the caller's included), for every thread of the process: n <= 0 means all
 * the CPUs this process may run on (the default). Results do not depend on the number of
 * threads. numba_bn's library starts its workers on the first call that needs them, keeps them
 * parked between calls, ends those a lower n leaves idle (waiting for a call in flight), and
 * ends them all at unload and exit. */
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

/* ------------------------------------------------------- double statistics (1.4)
 * An addition of numba_bn's library (other backends need not export it): the training forward
 * and backward with the batch statistics and the backward's sums in double, as the kernels keep
 * them, so that a caller can save them for its backward unrounded, make the running update of
 * another convention, or give the parameter gradients of numba_bn.BatchNorm bit for bit.
 *
 * nbn_forward_train_stats_*: nbn_forward_train_* with mean, invstd = 1 / sqrt(var + eps) and
 * m2 = sum((x - mean)^2) per channel in double (var = m2 / (outer * inner); none may be NULL),
 * and the running update's batch variance chosen: m2 / (m - 1) (PyTorch's) when unbiased != 0,
 * m2 / m (Keras', Flax's, ONNX's) when 0. nbn_backward_stats_*: nbn_backward_* given those
 * mean and invstd, with sum_dy = sum(dy) (= dbias) and sum_dy_xmu = sum(dy * (x - mean))
 * (dweight = invstd * sum_dy_xmu) in double, either NULL: not written. */
NBN_API int nbn_forward_train_stats_f32(const float *x, int64_t outer, int64_t channels,
                                        int64_t inner, const float *weight, const float *bias,
                                        double eps, float *y, double *mean, double *invstd,
                                        double *m2, float *running_mean, float *running_var,
                                        double momentum, int unbiased);
NBN_API int nbn_backward_stats_f32(const float *dy, const float *x, int64_t outer,
                                   int64_t channels, int64_t inner, const float *weight,
                                   const double *mean, const double *invstd, float *dx,
                                   double *sum_dy, double *sum_dy_xmu);
NBN_API int nbn_forward_train_stats_f64(const double *x, int64_t outer, int64_t channels,
                                        int64_t inner, const double *weight, const double *bias,
                                        double eps, double *y, double *mean, double *invstd,
                                        double *m2, double *running_mean, double *running_var,
                                        double momentum, int unbiased);
NBN_API int nbn_backward_stats_f64(const double *dy, const double *x, int64_t outer,
                                   int64_t channels, int64_t inner, const double *weight,
                                   const double *mean, const double *invstd, double *dx,
                                   double *sum_dy, double *sum_dy_xmu);

/* ---------------------------------------------------------- group and layer norm (1.3)
 * Normalisation of each sample on its own (PyTorch's group_norm, instance_norm, layer_norm),
 * computed by the same kernels as numba_bn.group_norm_forward and friends over the same work
 * items (a build for this CPU gives their float32 bits; docs/c-abi.md).
 * Unlike the batch norm entry points, the statistics (mean, invstd) and the parameter gradients
 * (dweight, dbias) are double whatever the tensor type: the kernels keep them in double, and a
 * backward given the forward's double statistics computes what numba_bn's layers compute.
 * weight and bias may be NULL (1 and 0), dweight and dbias may be NULL (not written); y may be x
 * and dx may be dy (in place). Checks and failures as above: a call that fails writes nothing. */

/* Group norm forward on x of shape (outer, channels, inner), channels first (NCHW is
 * (N, C, H*W); outer counts the samples), C-contiguous. The channels of each sample form
 * num_groups groups of channels / num_groups consecutive channels; for sample n and group g:
 *   mean[n * num_groups + g], var = mean and biased variance of its channels' values
 *   invstd[n * num_groups + g] = 1 / sqrt(var + eps)
 *   y = (x - mean) * invstd * weight[c] + bias[c]          (per channel c: weight, bias (C))
 * mean and invstd have outer * num_groups values. num_groups >= 1 (NBN_ERR_SHAPE) divides
 * channels (NBN_ERR_VALUE); eps > 0. Instance norm is num_groups = channels; its running
 * statistics (PyTorch's InstanceNorm with track_running_stats) are the caller's to update from
 * mean and invstd. */
NBN_API int nbn_group_norm_forward_f32(const float *x, int64_t outer, int64_t channels,
                                       int64_t inner, int64_t num_groups, const float *weight,
                                       const float *bias, double eps, float *y, double *mean,
                                       double *invstd);

/* Group norm backward, given dy and the forward's x, mean and invstd (m = values per group,
 * channels / num_groups * inner; x_hat = (x - mean) * invstd; g = dy * weight[c]; per group):
 *   dx      = invstd * (g - sum(g) / m - x_hat * sum(g * x_hat) / m)
 *   dweight[c] = sum over samples and inner of dy * x_hat       (may be NULL: not written)
 *   dbias[c]   = sum over samples and inner of dy               (may be NULL: not written)
 * weight may be NULL (1). dx may be dy. */
NBN_API int nbn_group_norm_backward_f32(const float *dy, const float *x, int64_t outer,
                                        int64_t channels, int64_t inner, int64_t num_groups,
                                        const float *weight, const double *mean,
                                        const double *invstd, float *dx, double *dweight,
                                        double *dbias);

/* Layer norm forward on x of shape (rows, width), C-contiguous (normalized_shape flattened to
 * width, the leading dimensions to rows). Per row r:
 *   mean[r], var = mean and biased variance of the row; invstd[r] = 1 / sqrt(var + eps)
 *   y = (x - mean[r]) * invstd[r] * weight[f] + bias[f]     (per element f of a row: (width))
 * rows, width >= 1 (NBN_ERR_SHAPE); eps > 0. */
NBN_API int nbn_layer_norm_forward_f32(const float *x, int64_t rows, int64_t width,
                                       const float *weight, const float *bias, double eps,
                                       float *y, double *mean, double *invstd);

/* Layer norm backward, given dy and the forward's x, mean and invstd (per row, g = dy * weight[f],
 * x_hat = (x - mean) * invstd):
 *   dx = invstd * (g - sum(g) / width - x_hat * sum(g * x_hat) / width)
 *   dweight[f] = sum over rows of dy * x_hat, dbias[f] = sum over rows of dy   (may be NULL)
 * weight may be NULL (1). dx may be dy. */
NBN_API int nbn_layer_norm_backward_f32(const float *dy, const float *x, int64_t rows,
                                        int64_t width, const float *weight, const double *mean,
                                        const double *invstd, float *dx, double *dweight,
                                        double *dbias);

/* The same four for double. */
NBN_API int nbn_group_norm_forward_f64(const double *x, int64_t outer, int64_t channels,
                                       int64_t inner, int64_t num_groups, const double *weight,
                                       const double *bias, double eps, double *y, double *mean,
                                       double *invstd);
NBN_API int nbn_group_norm_backward_f64(const double *dy, const double *x, int64_t outer,
                                        int64_t channels, int64_t inner, int64_t num_groups,
                                        const double *weight, const double *mean,
                                        const double *invstd, double *dx, double *dweight,
                                        double *dbias);
NBN_API int nbn_layer_norm_forward_f64(const double *x, int64_t rows, int64_t width,
                                       const double *weight, const double *bias, double eps,
                                       double *y, double *mean, double *invstd);
NBN_API int nbn_layer_norm_backward_f64(const double *dy, const double *x, int64_t rows,
                                        int64_t width, const double *weight, const double *mean,
                                        const double *invstd, double *dx, double *dweight,
                                        double *dbias);

/* ------------------------------------------------------------------ the layer handle (1.2)
 * PyTorch's BatchNorm for C programs that do not want to manage per-channel buffers: an
 * nbn_layer owns weight, bias, running_mean, running_var, the saved statistics of its last
 * forward and the gradients, and runs each forward and backward as one call of the entry points
 * above with them (so it gives their bits, and their status codes).
 *
 * Ownership: nbn_layer_create allocates the handle and one block for all its buffers
 * (NBN_ERR_INTERNAL when malloc fails, never an abort); nbn_layer_destroy frees both. Pointers
 * from nbn_layer_state point into the layer: valid until nbn_layer_destroy, never to be freed.
 * Tensors (x, y, dy, dx, residual, residual_out) stay the caller's: the layer keeps no pointer
 * to them after a call returns, so backward takes x (and y after a ReLU) again.
 *
 * Threads: one call at a time per layer (a layer is state); different layers may be used from
 * different threads at once. Each call runs the library's worker threads as the entry points do.
 *
 * Errors: a layer call that fails changes nothing, neither its tensors nor the layer (buffers,
 * num_batches_tracked, mode, the pending forward), except after NBN_ERR_INTERNAL raised by the
 * compute code (a bug). Checks: the handle (NBN_ERR_NULL), then the layer's state
 * (NBN_ERR_STATE, backward only), then the arguments in the order of the entry point called.
 *
 * Semantics, as numba_bn.BatchNorm (convention "torch") and torch.nn.BatchNorm*d:
 *   - a layer starts in training mode with weight 1, bias 0, running_mean 0, running_var 1,
 *     num_batches_tracked 0, saved statistics and gradients 0;
 *   - training mode, or any mode without NBN_LAYER_TRACK_RUNNING_STATS: batch statistics
 *     (nbn_forward_train_*), saved for backward; in training mode with running statistics,
 *     running = (1 - momentum) * running + momentum * batch (unbiased batch variance) and
 *     num_batches_tracked += 1;
 *   - eval mode with running statistics: nbn_forward_eval_* with them. Such a forward has no
 *     backward here (NBN_ERR_STATE): its dx would be dy * weight / sqrt(running_var + eps).
 *   - backward differentiates the last forward, once (as PyTorch frees its graph): it writes
 *     dx and sets grad_weight and grad_bias (=, not +=) with the layer's weight as it is then,
 *     so step the parameters after backward, as an optimizer does. */

/* The tensor type of a layer: every tensor given to it, and its buffers, have this type. */
typedef enum {
    NBN_DTYPE_FLOAT32 = 1, /* float */
    NBN_DTYPE_FLOAT64 = 2  /* double */
} nbn_dtype;

/* The flags of nbn_layer_create (an OR of them; unknown bits: NBN_ERR_VALUE). */
typedef enum {
    NBN_LAYER_AFFINE = 1, /* weight and bias, learnt: grad_weight and grad_bias. Without:
                             y = x_hat, and those four buffers do not exist (PyTorch's
                             affine=False) */
    NBN_LAYER_TRACK_RUNNING_STATS = 2, /* running_mean and running_var: updated in training,
                                          used in eval. Without: they do not exist and every
                                          forward uses batch statistics */
    NBN_LAYER_CUMULATIVE_AVERAGE = 4   /* PyTorch's momentum=None: the running update weights
                                          the new batch by 1 / num_batches_tracked (counting
                                          it), an average of all batches; momentum is not read */
} nbn_layer_flags;

/* torch.nn.BatchNorm2d(C)'s: affine, with running statistics (with eps 1e-5, momentum 0.1). */
#define NBN_LAYER_DEFAULT (NBN_LAYER_AFFINE | NBN_LAYER_TRACK_RUNNING_STATS)

/* What nbn_layer_state gives: a vector of `channels` values of the layer's type, except
 * NBN_LAYER_NUM_BATCHES_TRACKED (one int64_t). */
typedef enum {
    NBN_LAYER_WEIGHT = 0,       /* read, write (load, optimizer step); NBN_LAYER_AFFINE only */
    NBN_LAYER_BIAS = 1,         /* as weight */
    NBN_LAYER_RUNNING_MEAN = 2, /* read, write; NBN_LAYER_TRACK_RUNNING_STATS only */
    NBN_LAYER_RUNNING_VAR = 3,  /* as running_mean (unbiased, PyTorch's convention) */
    NBN_LAYER_SAVE_MEAN = 4,    /* the last batch-statistics forward's mean (backward reads it:
                                   read only) */
    NBN_LAYER_SAVE_INVSTD = 5,  /* its 1 / sqrt(biased var + eps) (read only, as save_mean) */
    NBN_LAYER_GRAD_WEIGHT = 6,  /* sum(dy * x_hat) of the last backward; NBN_LAYER_AFFINE only */
    NBN_LAYER_GRAD_BIAS = 7,    /* sum(dy) of the last backward; NBN_LAYER_AFFINE only */
    NBN_LAYER_NUM_BATCHES_TRACKED = 8 /* int64_t: read, write (load a checkpoint); < 0 with
                                         NBN_LAYER_CUMULATIVE_AVERAGE fails training forwards
                                         with NBN_ERR_VALUE */
} nbn_layer_buffer;

typedef struct nbn_layer nbn_layer; /* opaque */

/* A layer of `channels` channels (>= 1, else NBN_ERR_SHAPE; NBN_ERR_SHAPE too when its buffers'
 * bytes overflow) of type `dtype` (an nbn_dtype, else NBN_ERR_VALUE), in training mode.
 * eps > 0 (NBN_ERR_VALUE otherwise, NaN included); momentum in [0, 1], the weight of the new
 * batch (PyTorch's; NBN_ERR_VALUE otherwise), not read with NBN_LAYER_CUMULATIVE_AVERAGE.
 * On success *layer is the new layer, owned by the caller until nbn_layer_destroy; on failure
 * *layer is not written. layer NULL: NBN_ERR_NULL. */
NBN_API int nbn_layer_create(nbn_layer **layer, int64_t channels, int dtype, double eps,
                             double momentum, uint32_t flags);

/* Frees the layer and every buffer it owns; NULL is a no-op. */
NBN_API void nbn_layer_destroy(nbn_layer *layer);

/* Training mode (training != 0, the default) or eval mode (0). The pending forward, if any,
 * stays pending: backward differentiates the forward as it ran. */
NBN_API int nbn_layer_set_training(nbn_layer *layer, int training);

/* *data = the layer's buffer `which` (an nbn_layer_buffer; NBN_ERR_VALUE otherwise), or NULL
 * when the layer's flags leave it out (weight without NBN_LAYER_AFFINE, say). The pointer stays
 * valid and the same until nbn_layer_destroy. layer or data NULL: NBN_ERR_NULL. */
NBN_API int nbn_layer_state(nbn_layer *layer, int which, void **data);

/* y = BN(x) for x of shape (outer, channels, inner) and the layer's type; y may be x, but a
 * backward needs x as it was. With batch statistics it needs outer * inner >= 2. */
NBN_API int nbn_layer_forward(nbn_layer *layer, const void *x, int64_t outer, int64_t inner,
                              void *y);

/* y = activation(BN(x) + residual), as nbn_forward_train_ex_* / nbn_forward_eval_ex_*:
 * residual NULL or shaped like x, activation an nbn_activation. The layer remembers the
 * activation for the backward. With NULL and NBN_ACTIVATION_NONE it is nbn_layer_forward. */
NBN_API int nbn_layer_forward_ex(nbn_layer *layer, const void *x, int64_t outer, int64_t inner,
                                 void *y, const void *residual, int activation);

/* Backward of the pending forward (NBN_ERR_STATE when there is none), given dy and that
 * forward's x and shape (another outer or inner: NBN_ERR_SHAPE): dx (may be dy), and with
 * NBN_LAYER_AFFINE grad_weight and grad_bias. After a forward with NBN_ACTIVATION_RELU it
 * needs y: use nbn_layer_backward_ex (this one then returns NBN_ERR_NULL). */
NBN_API int nbn_layer_backward(nbn_layer *layer, const void *dy, const void *x, int64_t outer,
                               int64_t inner, void *dx);

/* nbn_layer_backward with the arguments of nbn_backward_ex_*: y, the forward's output
 * (required after NBN_ACTIVATION_RELU, else not read), and residual_out (NULL, or written with
 * the residual's gradient; it must not overlap x, dy, y or dx: NBN_ERR_ALIAS). */
NBN_API int nbn_layer_backward_ex(nbn_layer *layer, const void *dy, const void *x, int64_t outer,
                                  int64_t inner, void *dx, const void *y, void *residual_out);

#ifdef __cplusplus
}
#endif

#endif /* NUMBA_BN_H */
