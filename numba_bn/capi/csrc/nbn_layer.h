/* nbn_layer.h: the layer handle of numba_bn.h (1.2) over the typed entry points.
 *
 * Included at the end of nbn_entry_points.h, so every backend built on it (the shim, the
 * reference backend) has the handle. There is no arithmetic here: a forward or a backward is one
 * call of nbn_forward_train_ex_*, nbn_forward_eval_ex_* or nbn_backward_ex_* with the layer's
 * own buffers, so a layer gives those calls' bits and status codes, and writes its buffers
 * only when the call succeeds. What the layer adds is state, changed only after a call
 * succeeded:
 *   num_batches_tracked   += 1 per training forward with running statistics (also the
 *                         cumulative average's count);
 *   pending               the forward with batch statistics that backward differentiates
 *                         (its outer, inner and activation); cleared by a backward and by a
 *                         forward with running statistics.
 */
#ifndef NBN_LAYER_H
#define NBN_LAYER_H

#include <stdlib.h>
#include <string.h>

#include "nbn_checks.h"

enum { NBN_LAYER_VECTORS = NBN_LAYER_GRAD_BIAS + 1 }; /* the per-channel buffers */

struct nbn_layer {
    int64_t channels;
    int f64;
    uint32_t flags;
    double eps, momentum;
    int training;
    void *vectors[NBN_LAYER_VECTORS]; /* by nbn_layer_buffer; NULL when the flags leave it out */
    void *storage;                    /* the one allocation the vectors live in */
    int64_t num_batches_tracked;
    int pending, activation; /* the forward backward differentiates, and its shape */
    int64_t outer, inner;
};

static int layer_has(uint32_t flags, int which) {
    switch (which) {
    case NBN_LAYER_WEIGHT:
    case NBN_LAYER_BIAS:
    case NBN_LAYER_GRAD_WEIGHT:
    case NBN_LAYER_GRAD_BIAS: return (flags & NBN_LAYER_AFFINE) != 0;
    case NBN_LAYER_RUNNING_MEAN:
    case NBN_LAYER_RUNNING_VAR: return (flags & NBN_LAYER_TRACK_RUNNING_STATS) != 0;
    default: return 1; /* the saved statistics */
    }
}

static void layer_fill(void *vector, int f64, int64_t n, double value) {
    for (int64_t i = 0; i < n; i++) {
        if (f64)
            ((double *)vector)[i] = value;
        else
            ((float *)vector)[i] = (float)value;
    }
}

NBN_API int nbn_layer_create(nbn_layer **layer, int64_t channels, int dtype, double eps,
                             double momentum, uint32_t flags) {
    const uint32_t known = NBN_LAYER_AFFINE | NBN_LAYER_TRACK_RUNNING_STATS |
                           NBN_LAYER_CUMULATIVE_AVERAGE;
    if (!layer) return NBN_ERR_NULL;
    if (channels < 1) return NBN_ERR_SHAPE;
    if (dtype != NBN_DTYPE_FLOAT32 && dtype != NBN_DTYPE_FLOAT64) return NBN_ERR_VALUE;
    if (flags & ~known) return NBN_ERR_VALUE;
    if (nbn_check_train_eps(eps) != NBN_OK) return NBN_ERR_VALUE;
    if (!(flags & NBN_LAYER_CUMULATIVE_AVERAGE) && !(momentum >= 0.0 && momentum <= 1.0))
        return NBN_ERR_VALUE;
    const int f64 = dtype == NBN_DTYPE_FLOAT64;
    int64_t count = 0;
    for (int which = 0; which < NBN_LAYER_VECTORS; which++) count += layer_has(flags, which);
    size_t bytes;
    int status = nbn_bytes(nbn_mul(count, channels), f64 ? sizeof(double) : sizeof(float), &bytes);
    if (status != NBN_OK) return status;

    nbn_layer *created = calloc(1, sizeof *created);
    void *storage = created ? calloc(bytes, 1) : NULL; /* zeros, in float and double alike */
    if (!storage) {
        free(created);
        return NBN_ERR_INTERNAL;
    }
    *created = (nbn_layer){.channels = channels, .f64 = f64, .flags = flags, .eps = eps,
                           .momentum = momentum, .training = 1, .storage = storage,
                           .activation = NBN_ACTIVATION_NONE};
    char *next = storage;
    for (int which = 0; which < NBN_LAYER_VECTORS; which++) {
        if (!layer_has(flags, which)) continue;
        created->vectors[which] = next;
        next += (size_t)channels * (f64 ? sizeof(double) : sizeof(float));
    }
    if (flags & NBN_LAYER_AFFINE)
        layer_fill(created->vectors[NBN_LAYER_WEIGHT], f64, channels, 1.0);
    if (flags & NBN_LAYER_TRACK_RUNNING_STATS)
        layer_fill(created->vectors[NBN_LAYER_RUNNING_VAR], f64, channels, 1.0);
    *layer = created;
    return NBN_OK;
}

NBN_API void nbn_layer_destroy(nbn_layer *layer) {
    if (!layer) return;
    free(layer->storage);
    free(layer);
}

NBN_API int nbn_layer_set_training(nbn_layer *layer, int training) {
    if (!layer) return NBN_ERR_NULL;
    layer->training = training != 0;
    return NBN_OK;
}

NBN_API int nbn_layer_state(nbn_layer *layer, int which, void **data) {
    if (!layer || !data) return NBN_ERR_NULL;
    if (which == NBN_LAYER_NUM_BATCHES_TRACKED) {
        *data = &layer->num_batches_tracked;
        return NBN_OK;
    }
    if (which < 0 || which >= NBN_LAYER_VECTORS) return NBN_ERR_VALUE;
    *data = layer->vectors[which];
    return NBN_OK;
}

NBN_API int nbn_layer_forward_ex(nbn_layer *layer, const void *x, int64_t outer, int64_t inner,
                                 void *y, const void *residual, int activation) {
    if (!layer) return NBN_ERR_NULL;
    void *const *v = layer->vectors;
    const int64_t channels = layer->channels;
    const int running = (layer->flags & NBN_LAYER_TRACK_RUNNING_STATS) != 0;
    int status;
    if (running && !layer->training) {
        status = layer->f64
                     ? nbn_forward_eval_ex_f64(x, outer, channels, inner, v[NBN_LAYER_WEIGHT],
                                               v[NBN_LAYER_BIAS], v[NBN_LAYER_RUNNING_MEAN],
                                               v[NBN_LAYER_RUNNING_VAR], layer->eps, y, residual,
                                               activation)
                     : nbn_forward_eval_ex_f32(x, outer, channels, inner, v[NBN_LAYER_WEIGHT],
                                               v[NBN_LAYER_BIAS], v[NBN_LAYER_RUNNING_MEAN],
                                               v[NBN_LAYER_RUNNING_VAR], layer->eps, y, residual,
                                               activation);
        if (status == NBN_OK) layer->pending = 0; /* a frozen forward: nothing to differentiate */
        return status;
    }
    /* batch statistics; the running update in training mode only. The cumulative average
     * weights the new batch by 1 / (the batches counted so far, this one included): a count
     * below 0 (written by the caller) gives a weight outside [0, 1], refused by the call. */
    const int update = running && layer->training;
    double momentum = layer->momentum;
    if (layer->flags & NBN_LAYER_CUMULATIVE_AVERAGE)
        momentum = 1.0 / ((double)layer->num_batches_tracked + 1.0);
    void *running_mean = update ? v[NBN_LAYER_RUNNING_MEAN] : NULL;
    void *running_var = update ? v[NBN_LAYER_RUNNING_VAR] : NULL;
    if (!update) momentum = 0.0; /* not read: no running buffers */
    status = layer->f64
                 ? nbn_forward_train_ex_f64(x, outer, channels, inner, v[NBN_LAYER_WEIGHT],
                                            v[NBN_LAYER_BIAS], layer->eps, y,
                                            v[NBN_LAYER_SAVE_MEAN], v[NBN_LAYER_SAVE_INVSTD],
                                            running_mean, running_var, momentum, residual,
                                            activation)
                 : nbn_forward_train_ex_f32(x, outer, channels, inner, v[NBN_LAYER_WEIGHT],
                                            v[NBN_LAYER_BIAS], layer->eps, y,
                                            v[NBN_LAYER_SAVE_MEAN], v[NBN_LAYER_SAVE_INVSTD],
                                            running_mean, running_var, momentum, residual,
                                            activation);
    if (status != NBN_OK) return status;
    if (update && layer->num_batches_tracked < INT64_MAX) layer->num_batches_tracked++;
    layer->pending = 1;
    layer->outer = outer, layer->inner = inner, layer->activation = activation;
    return NBN_OK;
}

NBN_API int nbn_layer_forward(nbn_layer *layer, const void *x, int64_t outer, int64_t inner,
                              void *y) {
    return nbn_layer_forward_ex(layer, x, outer, inner, y, NULL, NBN_ACTIVATION_NONE);
}

NBN_API int nbn_layer_backward_ex(nbn_layer *layer, const void *dy, const void *x, int64_t outer,
                                  int64_t inner, void *dx, const void *y, void *residual_out) {
    if (!layer) return NBN_ERR_NULL;
    if (!layer->pending) return NBN_ERR_STATE;
    /* the entry point's order: NULL pointers, then the shape, which must be the forward's */
    if (!dy || !x || !dx || (layer->activation == NBN_ACTIVATION_RELU && !y)) return NBN_ERR_NULL;
    if (outer != layer->outer || inner != layer->inner) return NBN_ERR_SHAPE;
    void *const *v = layer->vectors;
    const int64_t channels = layer->channels;
    int status =
        layer->f64
            ? nbn_backward_ex_f64(dy, x, outer, channels, inner, v[NBN_LAYER_WEIGHT],
                                  v[NBN_LAYER_SAVE_MEAN], v[NBN_LAYER_SAVE_INVSTD], dx,
                                  v[NBN_LAYER_GRAD_WEIGHT], v[NBN_LAYER_GRAD_BIAS], y,
                                  layer->activation, residual_out)
            : nbn_backward_ex_f32(dy, x, outer, channels, inner, v[NBN_LAYER_WEIGHT],
                                  v[NBN_LAYER_SAVE_MEAN], v[NBN_LAYER_SAVE_INVSTD], dx,
                                  v[NBN_LAYER_GRAD_WEIGHT], v[NBN_LAYER_GRAD_BIAS], y,
                                  layer->activation, residual_out);
    if (status == NBN_OK) layer->pending = 0; /* once per forward, as PyTorch frees its graph */
    return status;
}

NBN_API int nbn_layer_backward(nbn_layer *layer, const void *dy, const void *x, int64_t outer,
                               int64_t inner, void *dx) {
    return nbn_layer_backward_ex(layer, dy, x, outer, inner, dx, NULL, NULL);
}

#endif /* NBN_LAYER_H */
