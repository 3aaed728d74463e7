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

// ---- V2 backward (perf round 3) ----------------------------------------------------------------
// Persistent blocks: block b handles rows b, b + gridDim, ...; thread t owns the 16-byte column
// vectors j = t + k * blockDim (k < VPT) for the whole kernel. So x and dy are read from HBM once
// per row and held packed in registers (the next row's are loaded before this row's reduction,
// so their latency overlaps it), w is loaded once, and the dw column sums stay in registers until
// the block writes its partial row part[b] = [cols] at the end. Needs cols % N == 0, 16-byte
// aligned pointers and cols <= VPT * blockDim * N (the launcher checks). One block_sum per row.
template <typename T> __device__ __forceinline__ float rn_elem(const Vec16& v, int i);
template <> __device__ __forceinline__ float rn_elem<bf16>(const Vec16& v, int i) { return (i & 1) ? bf_hi(v.w[i >> 1]) : bf_lo(v.w[i >> 1]); }
template <> __device__ __forceinline__ float rn_elem<float>(const Vec16& v, int i) { return __uint_as_float(v.w[i]); }
__device__ __forceinline__ Vec16 rn_ld(const void* p) { return *reinterpret_cast<const Vec16*>(p); }

template <typename T, int VPT>
__device__ void rmsnorm_bwd_vec16(T* __restrict__ dx, float* __restrict__ part, const T* __restrict__ dy,
                               const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ rstd,
                               int rows, int cols) {
    __shared__ float scratch[32];
    constexpr int N = V16<T>::N;
    const int nvec = cols / N;
    Vec16 wp[VPT], xp[VPT], gp[VPT];
    float acc[VPT][N];
#pragma unroll
    for (int k = 0; k < VPT; k++) {
        int j = threadIdx.x + k * blockDim.x;
        wp[k] = Vec16{}; xp[k] = Vec16{}; gp[k] = Vec16{};
        if (j < nvec) wp[k] = rn_ld(w + (long)j * N);
#pragma unroll
        for (int i = 0; i < N; i++) acc[k][i] = 0.f;
    }
    int row = blockIdx.x;
    if (row < rows) {
#pragma unroll
        for (int k = 0; k < VPT; k++) {
            int j = threadIdx.x + k * blockDim.x;
            if (j < nvec) { xp[k] = rn_ld(x + (long)row * cols + (long)j * N); gp[k] = rn_ld(dy + (long)row * cols + (long)j * N); }
        }
    }
    for (; row < rows; row += gridDim.x) {
        Vec16 xc[VPT], gc[VPT];
#pragma unroll
        for (int k = 0; k < VPT; k++) { xc[k] = xp[k]; gc[k] = gp[k]; }
        int nxt = row + gridDim.x;
        if (nxt < rows) {
#pragma unroll
            for (int k = 0; k < VPT; k++) {
                int j = threadIdx.x + k * blockDim.x;
                if (j < nvec) { xp[k] = rn_ld(x + (long)nxt * cols + (long)j * N); gp[k] = rn_ld(dy + (long)nxt * cols + (long)j * N); }
            }
        }
        float r = rstd[row];
        float dot = 0.f;   // inactive vectors hold zeros and add nothing
#pragma unroll
        for (int k = 0; k < VPT; k++)
#pragma unroll
            for (int i = 0; i < N; i++) dot += rn_elem<T>(gc[k], i) * rn_elem<T>(wp[k], i) * rn_elem<T>(xc[k], i);
        dot = block_sum(dot, scratch) / cols;
        float rrd = r * r * dot;
#pragma unroll
        for (int k = 0; k < VPT; k++) {
            int j = threadIdx.x + k * blockDim.x;
            if (j < nvec) {
                float o[N];
#pragma unroll
                for (int i = 0; i < N; i++) {
                    float g = rn_elem<T>(gc[k], i), xv = rn_elem<T>(xc[k], i);
                    o[i] = r * (g * rn_elem<T>(wp[k], i) - xv * rrd);
                    acc[k][i] += g * xv * r;
                }
                st16(dx + (long)row * cols + (long)j * N, o);
            }
        }
    }
    float* pb = part + (long)blockIdx.x * cols;
#pragma unroll
    for (int k = 0; k < VPT; k++) {
        int j = threadIdx.x + k * blockDim.x;
        if (j < nvec) {
#pragma unroll
            for (int i = 0; i < N; i += 4) st16<float>(pb + (long)j * N + i, &acc[k][i]);
        }
    }
}

// Deterministic column sums of per-block partials, shared by the V2 norm backwards and bias_bwd
// (launched from other modules by name): for j < ncols, s = sum over p of part[p][j] in a fixed
// order; out0[j] += s when j < split, else out1[j - split] += s. Block (32, 16): threadIdx.x picks
// the column, the 16 y-lanes take every 16th partial, then lane y = 0 adds the 16 in order.
extern "C" __global__ void __launch_bounds__(512) param_colsum_reduce(float* __restrict__ out0, float* __restrict__ out1,
                                                                      const float* __restrict__ part, int nparts,
                                                                      int ncols, int split) {
    __shared__ float s[16][33];
    int j = blockIdx.x * 32 + threadIdx.x;
    float t = 0.f;
    if (j < ncols)
        for (int p = threadIdx.y; p < nparts; p += 16) t += part[(long)p * ncols + j];
    s[threadIdx.y][threadIdx.x] = t;
    __syncthreads();
    if (threadIdx.y == 0 && j < ncols) {
        float u = 0.f;
#pragma unroll
        for (int k = 0; k < 16; k++) u += s[k][threadIdx.x];
        if (j < split) out0[j] += u;
        else out1[j - split] += u;
    }
}

// __launch_bounds__: 3 blocks of 256 per SM for VPT <= 2, one for VPT = 4 (no spills).
#define RMSNORM_VEC16_VPT(T, S, VPT, MINB)                                                                          \
    extern "C" __global__ void __launch_bounds__(256, MINB) rmsnorm_bwd_vec16_vpt##VPT##_##S(T* dx, float* part,     \
        const T* dy, const T* x, const T* w, const float* rstd, int rows, int cols) {                               \
        rmsnorm_bwd_vec16<T, VPT>(dx, part, dy, x, w, rstd, rows, cols);                                                \
    }
#define RMSNORM_VEC16_ENTRY(T, S) RMSNORM_VEC16_VPT(T, S, 1, 3) RMSNORM_VEC16_VPT(T, S, 2, 3) RMSNORM_VEC16_VPT(T, S, 4, 1)
AM3_BOTH_DTYPES(RMSNORM_VEC16_ENTRY)
