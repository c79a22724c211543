/* bench_host.c: times libnumba_bn.so from C, with no Python in the process.
 *
 *   cc -std=c11 -O2 -I $CSRC $CSRC/bench_host.c -L DIR -lnumba_bn -Wl,-rpath,DIR -o bench
 *   (CSRC: this folder, numba_bn/capi/csrc; installed, numba_bn.capi.csrc_dir())
 *   ./bench OUTER CHANNELS INNER [THREADS [REPEAT [GAP_US]]]   e.g. ./bench 32 64 3136
 *
 * float32, PyTorch-style training forward (with running buffers), eval forward and backward:
 * the first call (the process's first call of the library for forward-train: it starts the
 * worker threads; the first touch of the outputs' pages for each), the median and the fastest
 * of REPEAT runs (default 20) after it, and the bandwidth of the median against the bytes each
 * must move at least (train: read x, write y; eval: the same; backward: read dy, x, write dx).
 * On a shared machine the fastest run is the steadier number. GAP_US (default 0) sleeps that many
 * microseconds before each call, as a program that does other things between its calls: the
 * library's workers go to sleep 10 ms after a step (nbn_pool.h), and waking them, like the
 * calling thread's own return from sleep, costs what back-to-back calls never show.
 * `numba-bn demo --shape N,C,H,W` prints the JIT backend's times for the same operations.
 */
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "numba_bn.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s OUTER CHANNELS INNER [THREADS [REPEAT [GAP_US]]]\n",
                argv[0]);
        return 2;
    }
    int64_t outer = atoll(argv[1]), channels = atoll(argv[2]), inner = atoll(argv[3]);
    if (argc > 4) nbn_set_num_threads(atoi(argv[4]));
    int repeat = argc > 5 ? atoi(argv[5]) : 20;
    if (repeat < 1) repeat = 1;
    long gap_us = argc > 6 ? atol(argv[6]) : 0;
    struct timespec gap = {gap_us / 1000000, gap_us % 1000000 * 1000};
    int64_t size = outer * channels * inner;
    float *x = malloc((size_t)size * sizeof *x), *y = malloc((size_t)size * sizeof *y);
    float *dy = malloc((size_t)size * sizeof *dy), *dx = malloc((size_t)size * sizeof *dx);
    float *vectors = malloc(8 * (size_t)channels * sizeof *vectors);
    double *times = malloc((size_t)repeat * sizeof *times);
    if (!x || !y || !dy || !dx || !vectors || !times) return 1;
    for (int64_t i = 0; i < size; i++) {
        x[i] = 3.0f + (float)((i * 7919) % 1000) / 250.0f;
        dy[i] = (float)((i * 104729) % 1000) / 500.0f - 1.0f;
    }
    float *weight = vectors, *bias = vectors + channels, *mean = vectors + 2 * channels;
    float *invstd = vectors + 3 * channels, *rm = vectors + 4 * channels;
    float *rv = vectors + 5 * channels, *dweight = vectors + 6 * channels;
    float *dbias = vectors + 7 * channels;
    for (int64_t c = 0; c < channels; c++) weight[c] = 1.0f, bias[c] = 0.0f, rm[c] = 0, rv[c] = 1;

    printf("libnumba_bn %u, isa %s, %d threads, float32 (%lld, %lld, %lld), %.1f MiB per tensor, "
           "%ld us between calls\n",
           nbn_version(), nbn_isa(), nbn_get_num_threads(), (long long)outer,
           (long long)channels, (long long)inner, (double)size * 4 / (1 << 20), gap_us);
    printf("  %-14s %10s %10s %10s %10s\n", "operation", "first ms", "median ms", "min ms",
           "GB/s");
    const char *names[] = {"forward-train", "forward-eval", "backward"};
    const double bytes[] = {8.0 * (double)size, 8.0 * (double)size, 12.0 * (double)size};
    for (int op = 0; op < 3; op++) {
        double first = 0;
        for (int r = -1; r < repeat; r++) {
            if (gap_us > 0) nanosleep(&gap, NULL);
            double start = now();
            int status = op == 0 ? nbn_forward_train_f32(x, outer, channels, inner, weight, bias,
                                                         1e-5, y, mean, invstd, rm, rv, 0.1)
                         : op == 1 ? nbn_forward_eval_f32(x, outer, channels, inner, weight, bias,
                                                          rm, rv, 1e-5, y)
                                   : nbn_backward_f32(dy, x, outer, channels, inner, weight, mean,
                                                      invstd, dx, dweight, dbias);
            if (status != NBN_OK) {
                fprintf(stderr, "%s: %s\n", names[op], nbn_status_string(status));
                return 1;
            }
            if (r >= 0)
                times[r] = now() - start;
            else
                first = now() - start;
        }
        qsort(times, (size_t)repeat, sizeof *times, by_value);
        double median = times[repeat / 2];
        printf("  %-14s %10.3f %10.3f %10.3f %10.1f\n", names[op], first * 1e3, median * 1e3,
               times[0] * 1e3, bytes[op] / median / 1e9);
    }
    free(x), free(y), free(dy), free(dx), free(vectors), free(times);
    return 0;
}
