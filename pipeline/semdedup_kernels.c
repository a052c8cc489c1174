/* The passes around the int8 similarity matmul of the SemDeDup rule (pipeline/semdedup.py), fused so that each
   reads its data once: torch needs ~20 separate passes and dispatches per cluster for the same work.
   Compiled on first use by pipeline/native.py (cc -O3 -march=native -fopenmp); OpenMP is the runtime torch
   already loaded (same soname), so these share its threads. */
#include <math.h>
#include <stdint.h>

/* x[rows] (rows of a row-major n_all x d float matrix) -> int8 codes q (n x d) with one scale s = max|x| / 127;
   out[0] = s, out[1] = the largest L2 norm of a row's rounding error, in the units of x. */
void quantise_rows(const float *x, int64_t d, const int64_t *rows, int64_t n, int8_t *q, double *out) {
    float amax = 0.f;
#pragma omp parallel for reduction(max : amax) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *r = x + rows[i] * d;
        float m = 0.f;
#pragma omp simd reduction(max : m)
        for (int64_t k = 0; k < d; k++) {  /* ternaries, not fmaxf: fmaxf's NaN rule blocks vectorising */
            const float v = fabsf(r[k]);
            m = v > m ? v : m;
        }
        amax = m > amax ? m : amax;
    }
    const float s = amax > 0.f ? amax / 127.0f : 1.0f, inv = 1.0f / s;
    float emax = 0.f;
#pragma omp parallel for reduction(max : emax) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *r = x + rows[i] * d;
        int8_t *o = q + i * d;
        float e2 = 0.f;
#pragma omp simd reduction(+ : e2)
        for (int64_t k = 0; k < d; k++) {
            const float y = r[k] * inv, z = rintf(y);
            o[k] = (int8_t)z;
            e2 += (z - y) * (z - y);
        }
        emax = e2 > emax ? e2 : emax;
    }
    out[0] = s;
    out[1] = sqrt((double)emax) * s;
}

/* One lower-triangle block: sim holds rows a..a+r of the integer similarity matrix over columns 0..b (row-major,
   leading dimension b). Row i may only look at earlier rows, columns < a + i. vals[i] = that row's max
   (INT32_MIN when it has none); args[i] = the first column holding it when vals[i] >= thr, else -1 (rows below
   thr are never candidates, so their index is not searched for). */
void row_max(const int32_t *sim, int64_t r, int64_t b, int64_t a, int32_t thr, int32_t *vals, int64_t *args) {
#pragma omp parallel for schedule(static, 8)
    for (int64_t i = 0; i < r; i++) {
        const int32_t *row = sim + i * b;
        const int64_t lim = a + i;
        int32_t m = INT32_MIN;
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < lim; j++) m = row[j] > m ? row[j] : m;
        int64_t arg = -1;
        if (lim > 0 && m >= thr) {
            int64_t j = 0;
            for (; j + 16 <= lim; j += 16) {  /* 16 compares at a time (vectorised), then the hit inside */
                int hit = 0;
#pragma omp simd reduction(| : hit)
                for (int k = 0; k < 16; k++) hit |= row[j + k] == m;
                if (hit) break;
            }
            for (; j < lim; j++)
                if (row[j] == m) { arg = j; break; }
        }
        vals[i] = m;
        args[i] = arg;
    }
}

/* out[t] = x[gi[t]] . x[gj[t]] in fp32, rows read in place. */
void pair_dots(const float *x, int64_t d, const int64_t *gi, const int64_t *gj, int64_t m, float *out) {
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < m; t++) {
        const float *u = x + gi[t] * d, *v = x + gj[t] * d;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < d; k++) acc += u[k] * v[k];
        out[t] = acc;
    }
}
