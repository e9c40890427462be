/* Batch-1 sparse GEMV for TEAL decoding: y = x @ Wt over the nonzero entries of x only.
 *
 * Wt is the transposed weight [in, out], row-major, so the row of input i is contiguous and a
 * zero input skips `out` floats of weight traffic (a GEMV is memory-bound: time ~ bytes read).
 * The nonzero rows are split between the threads; each streams whole rows (long contiguous
 * reads, which the hardware prefetcher follows) into its own accumulator of `out` floats, and
 * the accumulators are summed at the end. Splitting the output instead (each thread half of
 * every row) measured 10% slower at 2 threads on the default model (bench/decode.py).
 * Built by sponlab.kernels with the system C compiler (-O3 -march=native -fopenmp); no torch
 * headers, called through ctypes on the tensors' data pointers.
 */
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Indices and values of the nonzero entries of x [n]; returns how many. */
static int64_t gather_nonzero(const float *x, int64_t n, int64_t *idx, float *val) {
    int64_t k = 0;
    for (int64_t i = 0; i < n; ++i) {
        if (x[i] != 0.0f) {
            idx[k] = i;
            val[k] = x[i];
            ++k;
        }
    }
    return k;
}

/* dst [out] = sum over j in [j0, j1) of val[j] * Wt[idx[j], :]. */
static void accumulate_rows(const float *restrict wt, const int64_t *idx, const float *val,
                            int64_t j0, int64_t j1, int64_t out, float *restrict dst) {
    memset(dst, 0, (size_t)out * sizeof(float));
    int64_t j = j0;
    for (; j + 3 < j1; j += 4) { /* four rows per pass: a quarter of the traffic on dst */
        const float a = val[j], b = val[j + 1], c = val[j + 2], d = val[j + 3];
        const float *restrict r0 = wt + idx[j] * out;
        const float *restrict r1 = wt + idx[j + 1] * out;
        const float *restrict r2 = wt + idx[j + 2] * out;
        const float *restrict r3 = wt + idx[j + 3] * out;
        for (int64_t o = 0; o < out; ++o)
            dst[o] += (a * r0[o] + b * r1[o]) + (c * r2[o] + d * r3[o]);
    }
    for (; j < j1; ++j) {
        const float a = val[j];
        const float *restrict r0 = wt + idx[j] * out;
        for (int64_t o = 0; o < out; ++o) dst[o] += a * r0[o];
    }
}

/* y [out] = x [n] @ Wt [n, out] over the nonzero x. idx, val: scratch of n entries; partial:
 * scratch of (threads - 1) * out floats. Returns the number of nonzero inputs. */
int64_t sparse_gemv_f32(const float *x, const float *wt, float *y, int64_t n, int64_t out,
                        int64_t *idx, float *val, int threads, float *partial) {
    const int64_t k = gather_nonzero(x, n, idx, val);
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int t = 0, nt = 1;
#endif
        float *dst = t == 0 ? y : partial + (int64_t)(t - 1) * out;
        accumulate_rows(wt, idx, val, k * t / nt, k * (t + 1) / nt, out, dst);
        if (nt < threads && t == 0) /* fewer threads than asked: the unused partials are 0 */
            memset(partial + (int64_t)(nt - 1) * out, 0,
                   (size_t)(threads - nt) * (size_t)out * sizeof(float));
    }
    for (int t = 1; t < threads; ++t) {
        const float *p = partial + (int64_t)(t - 1) * out;
        for (int64_t o = 0; o < out; ++o) y[o] += p[o];
    }
    return k;
}
