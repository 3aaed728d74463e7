// LayerNorm forward/backward (CLIP): y = (x - mean) * rstd * w + b with the population variance,
// one block per row. Forward saves mean and rstd [rows] (f32). Backward writes dx (=) and
// accumulates dw, db (+=, f32) through per-block partial sums that a second kernel reduces in a
// fixed order, so the result is deterministic and no float atomics race.
#include "common.cuh"

// Two passes for the statistics (mean, then the centred sum of squares: stable when |mean| >>
// std), a third writes y. Rows of at most one 16-byte vector per thread keep x in registers;
// longer rows re-read it (L1/L2 hits).
template <typename T>
__device__ void layernorm_fwd(T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                              const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                              int rows, int cols, float eps) {
    __shared__ float scratch[32];
    int row = blockIdx.x;
    if (row >= rows) return;
    const T* xr = x + (long)row * cols;
    T* yr = y + (long)row * cols;
    constexpr int N = V16<T>::N;
    bool vec = (cols % N == 0) && aligned16(xr) && aligned16(yr) && aligned16(w) && aligned16(b);
    if (vec && cols <= (int)blockDim.x * N) {
        // Register path: the row fits one 16-byte vector per thread, so x is read from HBM once
        // and stays in registers across both reductions.
        int c = threadIdx.x * N;
        bool act = c < cols;
        float v[N] = {};
        if (act) ld16(xr + c, v);
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < N; i++) s += v[i];
        float mu = block_sum(s, scratch) / cols;
        float ss = 0.f;
        if (act) {
#pragma unroll
            for (int i = 0; i < N; i++) { float d = v[i] - mu; ss += d * d; }
        }
        float r = rsqrtf(block_sum(ss, scratch) / cols + eps);
        if (threadIdx.x == 0) { mean_out[row] = mu; rstd_out[row] = r; }
        if (act) {
            float g[N], bb[N]; ld16(w + c, g); ld16(b + c, bb);
#pragma unroll
            for (int i = 0; i < N; i++) v[i] = (v[i] - mu) * r * g[i] + bb[i];
            st16(yr + c, v);
        }
        return;
    }
    float s = 0.f;
    if (vec) {
        for (int c = threadIdx.x * N; c < cols; c += blockDim.x * N) {
            float v[N]; ld16(xr + c, v);
#pragma unroll
            for (int i = 0; i < N; i++) s += v[i];
        }
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) s += ld(xr, c);
    }
    float mu = block_sum(s, scratch) / cols;
    float ss = 0.f;
    if (vec) {
        for (int c = threadIdx.x * N; c < cols; c += blockDim.x * N) {
            float v[N]; ld16(xr + c, v);
#pragma unroll
            for (int i = 0; i < N; i++) { float d = v[i] - mu; ss += d * d; }
        }
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) { float d = ld(xr, c) - mu; ss += d * d; }
    }
    float r = rsqrtf(block_sum(ss, scratch) / cols + eps);
    if (threadIdx.x == 0) { mean_out[row] = mu; rstd_out[row] = r; }
    if (vec) {
        for (int c = threadIdx.x * N; c < cols; c += blockDim.x * N) {
            float v[N], g[N], bb[N]; ld16(xr + c, v); ld16(w + c, g); ld16(b + c, bb);
#pragma unroll
            for (int i = 0; i < N; i++) v[i] = (v[i] - mu) * r * g[i] + bb[i];
            st16(yr + c, v);
        }
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) st(yr, c, (ld(xr, c) - mu) * r * ld(w, c) + ld(b, c));
    }
}

// N consecutive f32 accumulators (N a multiple of 4, 16-byte aligned) as float4 accesses: in
// shared memory a float4 per thread is conflict-free, where N scalar strided accesses are not.
template <int N> __device__ __forceinline__ void ld_f32(const float* p, float* v) {
#pragma unroll
    for (int k = 0; k < N; k += 4) ld16<float>(p + k, v + k);
}
template <int N> __device__ __forceinline__ void st_f32(float* p, const float* v) {
#pragma unroll
    for (int k = 0; k < N; k += 4) st16<float>(p + k, v + k);
}
template <int N> __device__ __forceinline__ void add_f32(float* p, const float* v) {
    float a[N];
    ld_f32<N>(p, a);
#pragma unroll
    for (int i = 0; i < N; i++) a[i] += v[i];
    st_f32<N>(p, a);
}

// A raw 16-byte load, unpacked later (N values of T).
template <typename T> __device__ __forceinline__ Vec16 ld_raw(const T* p) { return *reinterpret_cast<const Vec16*>(p); }
// Element i of a packed 16-byte vector of T, as f32 (i must be a compile-time constant after unrolling).
template <typename T> __device__ __forceinline__ float elem(const Vec16& v, int i);
template <> __device__ __forceinline__ float elem<bf16>(const Vec16& v, int i) { return (i & 1) ? bf_hi(v.w[i >> 1]) : bf_lo(v.w[i >> 1]); }
template <> __device__ __forceinline__ float elem<float>(const Vec16& v, int i) { return __uint_as_float(v.w[i]); }

// With xh = (x - mean) * rstd and g = dy * w:
//   dx = rstd * (g - mean(g) - xh * mean(g * xh)),  dw += dy * xh,  db += dy.
// Block b owns rows [r0, r1) and writes part[b] = [dw partial (cols), db partial (cols)]. Each
// thread owns a fixed set of columns for the whole kernel, so its running column sums `acc`
// ([dw; db], 2*cols floats) need no atomics or extra barriers. `acc` is dynamic shared memory
// when the launcher gives it (use_smem = 1), else part[b] itself (global, L2-resident).
// Launch with <= 512 threads (__launch_bounds__ below).

// Single-vector path, for rows of at most one 16-byte vector per thread (cols <= blockDim * N).
template <typename T>
__device__ void layernorm_bwd_vec1(T* __restrict__ dx, float* acc, const T* __restrict__ dy, const T* __restrict__ x,
                                   const T* __restrict__ w, const float* __restrict__ mean, const float* __restrict__ rstd,
                                   int r0, int r1, int cols, float* scratch) {
    constexpr int N = V16<T>::N;
    // Each thread owns one 16-byte vector of columns: x and dy are read from HBM once per row and
    // kept in registers, w stays in registers, and the next row's x and dy are loaded before this
    // row's reductions so their latency overlaps the barriers. Everything stays packed to fit 64
    // registers (two 512-thread blocks per SM); the column sums go to `acc` (shared memory).
    int c = threadIdx.x * N;
    bool act = c < cols;
    Vec16 wp = {}, xp = {}, gp = {};
    if (act) {
        float z[N] = {};
        st_f32<N>(acc + c, z);
        st_f32<N>(acc + cols + c, z);
        wp = ld_raw(w + c);
        if (r0 < r1) { xp = ld_raw(x + (long)r0 * cols + c); gp = ld_raw(dy + (long)r0 * cols + c); }
    }
    for (int row = r0; row < r1; row++) {
        Vec16 xc = xp, gc = gp;   // this row, packed; unpacked element by element on use
        if (act && row + 1 < r1) { xp = ld_raw(x + (long)(row + 1) * cols + c); gp = ld_raw(dy + (long)(row + 1) * cols + c); }
        float mu = mean[row], r = rstd[row];
        float sg = 0.f, sgx = 0.f;
#pragma unroll
        for (int i = 0; i < N; i++) {   // inactive lanes hold zeros and add nothing
            float g = elem<T>(gc, i) * elem<T>(wp, i);
            sg += g;
            sgx += g * (elem<T>(xc, i) - mu) * r;
        }
        float mg = block_sum(sg, scratch) / cols;
        float mgx = block_sum(sgx, scratch) / cols;
        if (act) {
            float o[N], dwv[N], dbv[N];
#pragma unroll
            for (int i = 0; i < N; i++) {
                float gy = elem<T>(gc, i);
                float xh = (elem<T>(xc, i) - mu) * r;
                o[i] = r * (gy * elem<T>(wp, i) - mg - xh * mgx);
                dwv[i] = gy * xh;
                dbv[i] = gy;
            }
            st16(dx + (long)row * cols + c, o);
            add_f32<N>(acc + c, dwv);
            add_f32<N>(acc + cols + c, dbv);
        }
    }
}

// General path: any cols, 16-byte vectors when `vec`, else scalars; x and dy are read twice per
// row (the second read hits L1/L2).
template <typename T>
__device__ void layernorm_bwd_general(T* __restrict__ dx, float* acc, const T* __restrict__ dy, const T* __restrict__ x,
                                      const T* __restrict__ w, const float* __restrict__ mean, const float* __restrict__ rstd,
                                      int r0, int r1, int cols, bool vec, float* scratch) {
    constexpr int N = V16<T>::N;
    if (vec) {
        float z[N] = {};
        for (int c = threadIdx.x * N; c < cols; c += blockDim.x * N) { st_f32<N>(acc + c, z); st_f32<N>(acc + cols + c, z); }
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) { acc[c] = 0.f; acc[cols + c] = 0.f; }
    }
    for (int row = r0; row < r1; row++) {
        const T* xr = x + (long)row * cols;
        const T* dyr = dy + (long)row * cols;
        T* dxr = dx + (long)row * cols;
        float mu = mean[row], r = rstd[row];
        float sg = 0.f, sgx = 0.f;
        if (vec) {
            for (int c = threadIdx.x * N; c < cols; c += blockDim.x * N) {
                float xv[N], gv[N], wv[N]; ld16(xr + c, xv); ld16(dyr + c, gv); ld16(w + c, wv);
#pragma unroll
                for (int i = 0; i < N; i++) {
                    float g = gv[i] * wv[i];
                    sg += g;
                    sgx += g * (xv[i] - mu) * r;
                }
            }
        } else {
            for (int c = threadIdx.x; c < cols; c += blockDim.x) {
                float g = ld(dyr, c) * ld(w, c);
                sg += g;
                sgx += g * (ld(xr, c) - mu) * r;
            }
        }
        // block_sum begins with a barrier, so back-to-back calls may share `scratch`.
        float mg = block_sum(sg, scratch) / cols;
        float mgx = block_sum(sgx, scratch) / cols;
        if (vec) {
            for (int c = threadIdx.x * N; c < cols; c += blockDim.x * N) {
                float xv[N], gv[N], wv[N], o[N]; ld16(xr + c, xv); ld16(dyr + c, gv); ld16(w + c, wv);
                float dwv[N];
#pragma unroll
                for (int i = 0; i < N; i++) {
                    float xh = (xv[i] - mu) * r;
                    o[i] = r * (gv[i] * wv[i] - mg - xh * mgx);
                    dwv[i] = gv[i] * xh;
                }
                st16(dxr + c, o);
                add_f32<N>(acc + c, dwv);
                add_f32<N>(acc + cols + c, gv);
            }
        } else {
            for (int c = threadIdx.x; c < cols; c += blockDim.x) {
                float gy = ld(dyr, c);
                float xh = (ld(xr, c) - mu) * r;
                st(dxr, c, r * (gy * ld(w, c) - mg - xh * mgx));
                acc[c] += gy * xh;
                acc[cols + c] += gy;
            }
        }
    }
}

template <typename T>
__device__ void layernorm_bwd(T* __restrict__ dx, float* __restrict__ part, const T* __restrict__ dy,
                              const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ mean,
                              const float* __restrict__ rstd, int rows, int cols, int rows_per_block, int use_smem) {
    __shared__ float scratch[32];
    extern __shared__ __align__(16) float smem_acc[];
    constexpr int N = V16<T>::N;
    int r0 = blockIdx.x * rows_per_block;
    int r1 = min(rows, r0 + rows_per_block);
    float* pout = part + (long)blockIdx.x * 2 * cols;
    float* acc = use_smem ? smem_acc : pout;   // [dw (cols), db (cols)]
    // Uniform for the whole block (row starts stay aligned when cols % N == 0).
    bool vec = (cols % N == 0) && aligned16(x) && aligned16(dy) && aligned16(dx) && aligned16(w);
    if (vec && cols <= (int)blockDim.x * N)
        layernorm_bwd_vec1<T>(dx, acc, dy, x, w, mean, rstd, r0, r1, cols, scratch);
    else
        layernorm_bwd_general<T>(dx, acc, dy, x, w, mean, rstd, r0, r1, cols, vec, scratch);
    if (use_smem) {   // the same column ownership as both paths: each thread copies only its own
        if (vec) {
            for (int c = threadIdx.x * N; c < cols; c += blockDim.x * N) {
                float v[N];
                ld_f32<N>(acc + c, v); st_f32<N>(pout + c, v);
                ld_f32<N>(acc + cols + c, v); st_f32<N>(pout + cols + c, v);
            }
        } else {
            for (int c = threadIdx.x; c < cols; c += blockDim.x) { pout[c] = acc[c]; pout[cols + c] = acc[cols + c]; }
        }
    }
}

// dw[c] += sum_b part[b][0][c];  db[c] += sum_b part[b][1][c]  (one thread per entry of [dw; db]).
extern "C" __global__ void layernorm_param_reduce(float* __restrict__ dw, float* __restrict__ db,
                                                  const float* __restrict__ part, int nparts, int cols) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;   // in [0, 2*cols)
    if (j >= 2 * cols) return;
    float s = 0.f;
    for (int b = 0; b < nparts; b++) s += part[(long)b * 2 * cols + j];
    if (j < cols) dw[j] += s;
    else db[j - cols] += s;
}

#define LAYERNORM_ENTRY(T, S)                                                                           \
    extern "C" __global__ void layernorm_fwd_##S(T* y, float* mean, float* rstd, const T* x, const T* w, \
                                                  const T* b, int rows, int cols, float eps) {            \
        layernorm_fwd<T>(y, mean, rstd, x, w, b, rows, cols, eps);                                        \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(512, 2) layernorm_bwd_##S(T* dx, float* part, const T* dy, const T* x, const T* w, \
                                                  const float* mean, const float* rstd, int rows,         \
                                                  int cols, int rows_per_block, int use_smem) {           \
        layernorm_bwd<T>(dx, part, dy, x, w, mean, rstd, rows, cols, rows_per_block, use_smem);           \
    }
AM3_BOTH_DTYPES(LAYERNORM_ENTRY)

// ---- V2 forward and backward (perf round 3) ----------------------------------------------------
// Persistent blocks: block b handles rows b, b + gridDim, ...; thread t owns the 16-byte column
// vectors j = t + k * blockDim (k < VPT) for the whole kernel, so x (and dy) are read from HBM
// once per row and held packed in registers; the next row's are loaded before this row's
// reductions so their latency overlaps the barriers; w (and b) are loaded once. Needs cols % N
// == 0, 16-byte aligned pointers and cols <= VPT * blockDim * N (the launcher checks).

// Both sums of a pair over the block with one pair of barriers; `scratch` holds >= 32 float2.
__device__ __forceinline__ float2 ln_block_sum2(float a, float b, float2* scratch) {
    int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP, nw = CEIL_DIV(blockDim.x, WARP);
    a = warp_sum(a);
    b = warp_sum(b);
    __syncthreads();
    if (lane == 0) scratch[wid] = make_float2(a, b);
    __syncthreads();
    float2 v = lane < nw ? scratch[lane] : make_float2(0.f, 0.f);
    return make_float2(warp_sum(v.x), warp_sum(v.y));
}

template <typename T, int VPT>
__device__ void layernorm_fwd_vec16(T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                 const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                                 int rows, int cols, float eps) {
    __shared__ float scratch[32];
    constexpr int N = V16<T>::N;
    const int nvec = cols / N;
    Vec16 wp[VPT], bp[VPT], xp[VPT];
#pragma unroll
    for (int k = 0; k < VPT; k++) {
        int j = threadIdx.x + k * blockDim.x;
        wp[k] = Vec16{}; bp[k] = Vec16{}; xp[k] = Vec16{};
        if (j < nvec) { wp[k] = ld_raw(w + (long)j * N); bp[k] = ld_raw(b + (long)j * N); }
    }
    int row = blockIdx.x;
    if (row < rows) {
#pragma unroll
        for (int k = 0; k < VPT; k++) {
            int j = threadIdx.x + k * blockDim.x;
            if (j < nvec) xp[k] = ld_raw(x + (long)row * cols + (long)j * N);
        }
    }
    for (; row < rows; row += gridDim.x) {
        float v[VPT][N];
#pragma unroll
        for (int k = 0; k < VPT; k++)
#pragma unroll
            for (int i = 0; i < N; i++) v[k][i] = elem<T>(xp[k], i);
        int nxt = row + gridDim.x;
        if (nxt < rows) {
#pragma unroll
            for (int k = 0; k < VPT; k++) {
                int j = threadIdx.x + k * blockDim.x;
                if (j < nvec) xp[k] = ld_raw(x + (long)nxt * cols + (long)j * N);
            }
        }
        float s = 0.f;   // inactive vectors hold zeros
#pragma unroll
        for (int k = 0; k < VPT; k++)
#pragma unroll
            for (int i = 0; i < N; i++) s += v[k][i];
        float mu = block_sum(s, scratch) / cols;
        float ss = 0.f;
#pragma unroll
        for (int k = 0; k < VPT; k++) {
            int j = threadIdx.x + k * blockDim.x;
            if (j < nvec) {
#pragma unroll
                for (int i = 0; i < N; i++) { float d = v[k][i] - mu; ss += d * d; }
            }
        }
        float r = rsqrtf(block_sum(ss, scratch) / cols + eps);
        if (threadIdx.x == 0) { mean_out[row] = mu; rstd_out[row] = r; }
#pragma unroll
        for (int k = 0; k < VPT; k++) {
            int j = threadIdx.x + k * blockDim.x;
            if (j < nvec) {
#pragma unroll
                for (int i = 0; i < N; i++) v[k][i] = (v[k][i] - mu) * r * elem<T>(wp[k], i) + elem<T>(bp[k], i);
                st16(y + (long)row * cols + (long)j * N, v[k]);
            }
        }
    }
}

// dx = rstd * (g - mean(g) - xh * mean(g * xh)) with g = dy * w, xh = (x - mean) * rstd;
// part[b] = [dw partial (cols), db partial (cols)], the sums over block b's rows of dy * xh, dy.
// The dw sums stay in registers; the db sums live in dynamic shared memory (cols floats, each
// thread touching only its own vectors, so no barriers) to stay within 80 registers.
template <typename T, int VPT>
__device__ void layernorm_bwd_vec16(T* __restrict__ dx, float* __restrict__ part, const T* __restrict__ dy,
                                 const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ mean,
                                 const float* __restrict__ rstd, int rows, int cols) {
    __shared__ float2 scratch2[32];
    constexpr int N = V16<T>::N;
    const int nvec = cols / N;
    Vec16 wp[VPT], xp[VPT], gp[VPT];
    extern __shared__ __align__(16) float sdb[];   // [cols]
    float adw[VPT][N];
#pragma unroll
    for (int k = 0; k < VPT; k++) {
        int j = threadIdx.x + k * blockDim.x;
        wp[k] = Vec16{}; xp[k] = Vec16{}; gp[k] = Vec16{};
        if (j < nvec) {
            wp[k] = ld_raw(w + (long)j * N);
            float z[N] = {};
            st_f32<N>(sdb + j * N, z);
        }
#pragma unroll
        for (int i = 0; i < N; i++) adw[k][i] = 0.f;
    }
    int row = blockIdx.x;
    if (row < rows) {
#pragma unroll
        for (int k = 0; k < VPT; k++) {
            int j = threadIdx.x + k * blockDim.x;
            if (j < nvec) { xp[k] = ld_raw(x + (long)row * cols + (long)j * N); gp[k] = ld_raw(dy + (long)row * cols + (long)j * N); }
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
                if (j < nvec) { xp[k] = ld_raw(x + (long)nxt * cols + (long)j * N); gp[k] = ld_raw(dy + (long)nxt * cols + (long)j * N); }
            }
        }
        float mu = mean[row], r = rstd[row];
        float sg = 0.f, sgx = 0.f;
#pragma unroll
        for (int k = 0; k < VPT; k++) {
            int j = threadIdx.x + k * blockDim.x;
            if (j < nvec) {   // (x - mu) of an inactive zero vector is not zero: skip it
#pragma unroll
                for (int i = 0; i < N; i++) {
                    float g = elem<T>(gc[k], i) * elem<T>(wp[k], i);
                    sg += g;
                    sgx += g * (elem<T>(xc[k], i) - mu) * r;
                }
            }
        }
        float2 red = ln_block_sum2(sg, sgx, scratch2);
        float mg = red.x / cols, mgx = red.y / cols;
#pragma unroll
        for (int k = 0; k < VPT; k++) {
            int j = threadIdx.x + k * blockDim.x;
            if (j < nvec) {
                float o[N], gv[N];
#pragma unroll
                for (int i = 0; i < N; i++) {
                    float gy = elem<T>(gc[k], i);
                    float xh = (elem<T>(xc[k], i) - mu) * r;
                    o[i] = r * (gy * elem<T>(wp[k], i) - mg - xh * mgx);
                    adw[k][i] += gy * xh;
                    gv[i] = gy;
                }
                st16(dx + (long)row * cols + (long)j * N, o);
                add_f32<N>(sdb + j * N, gv);
            }
        }
    }
    float* pb = part + (long)blockIdx.x * 2 * cols;
#pragma unroll
    for (int k = 0; k < VPT; k++) {
        int j = threadIdx.x + k * blockDim.x;
        if (j < nvec) {
            float db[N];
            ld_f32<N>(sdb + j * N, db);
            st_f32<N>(pb + (long)j * N, adw[k]);
            st_f32<N>(pb + cols + (long)j * N, db);
        }
    }
}

// __launch_bounds__: forward 4 blocks of 256 per SM (<= 64 registers) for VPT <= 2, backward 3
// (<= 80); VPT = 4 keeps its registers at one block per SM rather than spill (src/ops/layernorm.rs
// sizes the grids to match).
#define LAYERNORM_VEC16_VPT(T, S, VPT, MINF, MINB)                                                                        \
    extern "C" __global__ void __launch_bounds__(256, MINF) layernorm_fwd_vec16_vpt##VPT##_##S(T* y, float* mean, float* rstd, \
        const T* x, const T* w, const T* b, int rows, int cols, float eps) {                                          \
        layernorm_fwd_vec16<T, VPT>(y, mean, rstd, x, w, b, rows, cols, eps);                                               \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256, MINB) layernorm_bwd_vec16_vpt##VPT##_##S(T* dx, float* part, const T* dy, \
        const T* x, const T* w, const float* mean, const float* rstd, int rows, int cols) {                           \
        layernorm_bwd_vec16<T, VPT>(dx, part, dy, x, w, mean, rstd, rows, cols);                                            \
    }
#define LAYERNORM_VEC16_ENTRY(T, S) \
    LAYERNORM_VEC16_VPT(T, S, 1, 4, 3) LAYERNORM_VEC16_VPT(T, S, 2, 4, 3) LAYERNORM_VEC16_VPT(T, S, 4, 1, 1)
AM3_BOTH_DTYPES(LAYERNORM_VEC16_ENTRY)
