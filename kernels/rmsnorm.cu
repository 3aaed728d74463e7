// RMSNorm forward/backward: y = x * rsqrt(mean(x^2) + eps) * w, one block per row.
// Forward saves rstd [rows] (f32) for backward. Backward writes dx (=) and accumulates dw (+=)
// through per-block partial sums that a second kernel reduces, so no float atomics race.
#include "common.cuh"

template <typename T>
__device__ void rmsnorm_fwd(T* __restrict__ y, float* __restrict__ rstd, const T* __restrict__ x,
                            const T* __restrict__ w, int rows, int cols, float eps) {
    __shared__ float scratch[32];
    int row = blockIdx.x;
    if (row >= rows) return;
    const T* xr = x + (long)row * cols;
    T* yr = y + (long)row * cols;
    constexpr int N = V16<T>::N;
    bool vec = (cols % N == 0) && aligned16(xr) && aligned16(yr) && aligned16(w);
    float ss = 0.f;
    if (vec) {
        for (int c = threadIdx.x * N; c < cols; c += blockDim.x * N) {
            float v[N]; ld16(xr + c, v);
#pragma unroll
            for (int i = 0; i < N; i++) ss += v[i] * v[i];
        }
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) { float v = ld(xr, c); ss += v * v; }
    }
    ss = block_sum(ss, scratch);
    float r = rsqrtf(ss / cols + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    if (vec) {
        for (int c = threadIdx.x * N; c < cols; c += blockDim.x * N) {
            float v[N], g[N]; ld16(xr + c, v); ld16(w + c, g);
#pragma unroll
            for (int i = 0; i < N; i++) v[i] = v[i] * r * g[i];
            st16(yr + c, v);
        }
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) st(yr, c, ld(xr, c) * r * ld(w, c));
    }
}

// dx = rstd * (g*dy - x * rstd^2 * mean(g*dy*x)); dw_partial[block][c] = sum over the block's rows of dy*x*rstd.
template <typename T>
__device__ void rmsnorm_bwd(T* __restrict__ dx, float* __restrict__ dw_part, const T* __restrict__ dy,
                            const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ rstd,
                            int rows, int cols, int rows_per_block) {
    __shared__ float scratch[32];
    int r0 = blockIdx.x * rows_per_block;
    float* dwp = dw_part + (long)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dwp[c] = 0.f;
    for (int row = r0; row < min(rows, r0 + rows_per_block); row++) {
        const T* xr = x + (long)row * cols;
        const T* dyr = dy + (long)row * cols;
        float r = rstd[row];
        float dot = 0.f;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) dot += ld(dyr, c) * ld(w, c) * ld(xr, c);
        dot = block_sum(dot, scratch) / cols;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            float xv = ld(xr, c), g = ld(dyr, c);
            st(dx + (long)row * cols, c, r * (g * ld(w, c) - xv * r * r * dot));
            dwp[c] += g * xv * r;   // each column owned by one thread: no race
        }
    }
}

// dw[c] (+)= sum_b dw_part[b][c]; dw is f32 (parameter gradients are always f32).
extern "C" __global__ void rmsnorm_dw_reduce(float* __restrict__ dw, const float* __restrict__ part,
                                             int nparts, int cols, int accumulate) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float s = 0.f;
    for (int b = 0; b < nparts; b++) s += part[(long)b * cols + c];
    dw[c] = accumulate ? dw[c] + s : s;
}

#define RMSNORM_ENTRY(T, S)                                                                        \
    extern "C" __global__ void rmsnorm_fwd_##S(T* y, float* rstd, const T* x, const T* w, int rows,  \
                                                int cols, float eps) {                               \
        rmsnorm_fwd<T>(y, rstd, x, w, rows, cols, eps);                                              \
    }                                                                                                \
    extern "C" __global__ void rmsnorm_bwd_##S(T* dx, float* dw_part, const T* dy, const T* x,       \
                                                const T* w, const float* rstd, int rows, int cols,   \
                                                int rows_per_block) {                                \
        rmsnorm_bwd<T>(dx, dw_part, dy, x, w, rstd, rows, cols, rows_per_block);                     \
    }
AM3_BOTH_DTYPES(RMSNORM_ENTRY)
