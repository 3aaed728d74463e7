// Grouped log-prob fused with the lm_head (the GEMMs are cuBLAS calls in src/ops/logprob/gpu.rs).
// The logits of a token chunk arrive one vocab tile at a time as f32 [n, nv]; these kernels fold
// each tile into per-row running statistics (online log-sum-exp), finish log p(target) and the
// entropy, and form d logits = dlogp * (onehot(target) - softmax) for the backward GEMMs.
// Per-row running state, stats[row] = {m, s, u, target logit} with
//   m = running max, s = sum e^(l - m), u = sum e^(l - m) (l - m),
// so lse = m + log s, entropy = log s - u / s.
// Helpers pack the active (unmasked) tokens and scatter results back.
#include "common.cuh"

#define NAN_F __int_as_float(0x7fc00000)

// One block per row of the tile. logits: [n, nv] f32 (columns v0 .. v0 + nv of the vocab);
// stats: [n, 4]; targets: [n]. first: this is the row's first tile (v0 == 0).
// When store is not null (fused forward+backward) the tile is also kept, as l - m_new in the
// storage type, at store[row * V + v0 + c], and m_new goes to moff[row * nsub + sub]: values
// relative to the running max keep their precision for the tokens that carry the probability.
template <typename T>
__device__ void logprob_fold(float* __restrict__ stats, T* __restrict__ store, float* __restrict__ moff,
                             const float* __restrict__ logits, const int* __restrict__ targets, int n, int nv,
                             int v0, int V, int sub, int nsub, int first) {
    __shared__ float scratch[32];
    __shared__ float s_mnew;
    int row = blockIdx.x;
    if (row >= n) return;
    const float* lr = logits + (long)row * nv;
    bool vec4 = (nv % 4 == 0) && aligned16(lr);
    float m = NEG_INF;
    if (vec4) {
        for (int c = threadIdx.x * 4; c < nv; c += blockDim.x * 4) {
            float4 x = *reinterpret_cast<const float4*>(lr + c);
            m = fmaxf(m, fmaxf(fmaxf(x.x, x.y), fmaxf(x.z, x.w)));
        }
    } else {
        for (int c = threadIdx.x; c < nv; c += blockDim.x) m = fmaxf(m, lr[c]);
    }
    float M = block_max(m, scratch);
    float s = 0.f, u = 0.f;
    if (M != NEG_INF) {   // uniform over the block
        if (vec4) {
            for (int c = threadIdx.x * 4; c < nv; c += blockDim.x * 4) {
                float4 x = *reinterpret_cast<const float4*>(lr + c);
                float d0 = x.x - M, d1 = x.y - M, d2 = x.z - M, d3 = x.w - M;
                float e0 = expf(d0), e1 = expf(d1), e2 = expf(d2), e3 = expf(d3);
                s += (e0 + e1) + (e2 + e3);
                u += (e0 * d0 + e1 * d1) + (e2 * d2 + e3 * d3);
            }
        } else {
            for (int c = threadIdx.x; c < nv; c += blockDim.x) {
                float d = lr[c] - M, e = expf(d);
                s += e;
                u += e * d;
            }
        }
    }
    s = block_sum(s, scratch);
    u = block_sum(u, scratch);
    if (threadIdx.x == 0) {
        float* st = stats + (long)row * 4;
        float m0 = first ? NEG_INF : st[0];
        float s0 = first ? 0.f : st[1];
        float u0 = first ? 0.f : st[2];
        float tg = first ? NAN_F : st[3];
        float mn = fmaxf(m0, M);
        float sn = 0.f, un = 0.f;
        if (s0 != 0.f) { float a = expf(m0 - mn); sn += a * s0; un += a * (u0 + (m0 - mn) * s0); }
        if (s != 0.f) { float b = expf(M - mn); sn += b * s; un += b * (u + (M - mn) * s); }
        int tgi = targets[row];
        if (tgi >= v0 && tgi < v0 + nv) tg = lr[tgi - v0];
        st[0] = mn;
        st[1] = sn;
        st[2] = un;
        st[3] = tg;
        if (moff) moff[(long)row * nsub + sub] = mn;
        s_mnew = mn;
    }
    if (store == nullptr) return;   // uniform over the block
    __syncthreads();
    float mn = s_mnew;
    T* sr = store + (long)row * V + v0;
    constexpr int N = V16<T>::N;
    if ((nv % N == 0) && aligned16(sr) && aligned16(lr)) {
        for (int c = threadIdx.x * N; c < nv; c += blockDim.x * N) {
            float x[N];
#pragma unroll
            for (int i = 0; i < N; i += 4) ld16<float>(lr + c + i, x + i);
#pragma unroll
            for (int i = 0; i < N; i++) x[i] -= mn;
            st16<T>(sr + c, x);
        }
    } else {
        for (int c = threadIdx.x; c < nv; c += blockDim.x) st(sr, c, lr[c] - mn);
    }
}

// One thread per row: lse = m + log s, logp = target logit - lse, entropy = log s - u / s.
// A target outside the vocabulary never set its logit, so its logp is NaN.
extern "C" __global__ void logprob_finalize(float* __restrict__ logp, float* __restrict__ lse,
                                            float* __restrict__ ent, const float* __restrict__ stats, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float* st = stats + (long)i * 4;
    float ls = logf(st[1]);
    float l = st[0] + ls;
    lse[i] = l;
    logp[i] = st[3] - l;
    if (ent) ent[i] = ls - st[2] / st[1];
}

// In place over the stored chunk buf [n, V] (values l - moff[row, c / vc]):
// d logit = g * (onehot(target) - e^(l - lse)), g = dlogp[row]; rows with g == 0 become 0.
// Grid: (ceil(V / (blockDim * N)), n); each thread owns N consecutive columns.
template <typename T>
__device__ void logprob_dlogits_stored(T* __restrict__ buf, const float* __restrict__ moff,
                                       const float* __restrict__ lse, const float* __restrict__ dlogp,
                                       const int* __restrict__ targets, int n, int V, int vc, int nsub) {
    constexpr int N = V16<T>::N;
    int row = blockIdx.y;
    long c0 = ((long)blockIdx.x * blockDim.x + threadIdx.x) * N;
    if (row >= n || c0 >= V) return;
    T* br = buf + (long)row * V;
    float g = dlogp[row], L = lse[row];
    int tg = targets[row];
    const float* mo = moff + (long)row * nsub;
    if ((V % N == 0) && (vc % N == 0) && aligned16(br)) {
        float x[N];
        ld16<T>(br + c0, x);
        float off = mo[c0 / vc] - L;
#pragma unroll
        for (int i = 0; i < N; i++) {
            float d = -g * expf(x[i] + off);
            if (c0 + i == tg) d += g;
            x[i] = g == 0.f ? 0.f : d;
        }
        st16<T>(br + c0, x);
    } else {
        for (int i = 0; i < N && c0 + i < V; i++) {
            long c = c0 + i;
            float d = -g * expf(ld(br, c) + mo[c / vc] - L);
            if (c == tg) d += g;
            st(br, c, g == 0.f ? 0.f : d);
        }
    }
}

// Backward with recompute: out [n, nv] (storage type) from the recomputed f32 tile logits [n, nv]
// (vocab columns v0 ..): d logit = g * (onehot(target) - e^(l - lse)). Grid: (ceil(nv / (blockDim * N)), n).
template <typename T>
__device__ void logprob_dlogits(T* __restrict__ out, const float* __restrict__ logits,
                                const float* __restrict__ lse, const float* __restrict__ dlogp,
                                const int* __restrict__ targets, int n, int nv, int v0) {
    constexpr int N = V16<T>::N;
    int row = blockIdx.y;
    long c0 = ((long)blockIdx.x * blockDim.x + threadIdx.x) * N;
    if (row >= n || c0 >= nv) return;
    const float* lr = logits + (long)row * nv;
    T* orow = out + (long)row * nv;
    float g = dlogp[row], L = lse[row];
    long tg = (long)targets[row] - v0;
    if ((nv % N == 0) && aligned16(lr) && aligned16(orow)) {
        float x[N];
#pragma unroll
        for (int i = 0; i < N; i += 4) ld16<float>(lr + c0 + i, x + i);
#pragma unroll
        for (int i = 0; i < N; i++) {
            float d = -g * expf(x[i] - L);
            if (c0 + i == tg) d += g;
            x[i] = g == 0.f ? 0.f : d;
        }
        st16<T>(orow + c0, x);
    } else {
        for (int i = 0; i < N && c0 + i < nv; i++) {
            long c = c0 + i;
            float d = -g * expf(lr[c] - L);
            if (c == tg) d += g;
            st(orow, c, g == 0.f ? 0.f : d);
        }
    }
}

// Backward with recompute at LogitPrecision::Bf16: the tile's logits
// arrive rounded to the storage type, as in the fused pass and in `fwd` of that mode (whose lse
// this uses), and are replaced in place by d logit = g * (onehot(target) - e^(l - lse)).
// buf: [n, nv] (vocab columns v0 ..). Grid: (ceil(nv / (blockDim * N)), n).
template <typename T>
__device__ void logprob_dlogits_inplace(T* __restrict__ buf, const float* __restrict__ lse,
                                        const float* __restrict__ dlogp, const int* __restrict__ targets,
                                        int n, int nv, int v0) {
    constexpr int N = V16<T>::N;
    int row = blockIdx.y;
    long c0 = ((long)blockIdx.x * blockDim.x + threadIdx.x) * N;
    if (row >= n || c0 >= nv) return;
    T* br = buf + (long)row * nv;
    float g = dlogp[row], L = lse[row];
    long tg = (long)targets[row] - v0;
    if ((nv % N == 0) && aligned16(br)) {
        float x[N];
        ld16<T>(br + c0, x);
#pragma unroll
        for (int i = 0; i < N; i++) {
            float d = -g * expf(x[i] - L);
            if (c0 + i == tg) d += g;
            x[i] = g == 0.f ? 0.f : d;
        }
        st16<T>(br + c0, x);
    } else {
        for (int i = 0; i < N && c0 + i < nv; i++) {
            long c = c0 + i;
            float d = -g * expf(ld(br, c) - L);
            if (c == tg) d += g;
            st(br, c, g == 0.f ? 0.f : d);
        }
    }
}

// One block per packed row: dst[i, :] = src[idx[i], :].
template <typename T>
__device__ void logprob_gather_rows(T* __restrict__ dst, const T* __restrict__ src, const int* __restrict__ idx,
                                    int n, int cols) {
    int i = blockIdx.x;
    if (i >= n) return;
    const T* s = src + (long)idx[i] * cols;
    T* d = dst + (long)i * cols;
    constexpr int N = V16<T>::N;
    if ((cols % N == 0) && aligned16(s) && aligned16(d)) {
        for (int c = threadIdx.x * N; c < cols; c += blockDim.x * N)
            *reinterpret_cast<Vec16*>(d + c) = *reinterpret_cast<const Vec16*>(s + c);
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) d[c] = s[c];
    }
}

// One block per packed row: dst[r, :] = g[i] * sum_{p < nsplit} src[p * pstride + i * cols + :]
// (f32 -> storage type), r = idx[i], or row0 + i when idx is null; g null means 1. The partials
// are the split-K slices of the dhidden GEMM (PERF-logprob.md, Round 4), summed in order p = 0, 1, ..
template <typename T>
__device__ void logprob_scatter_sum(T* __restrict__ dst, const float* __restrict__ src, const float* __restrict__ g,
                                    const int* __restrict__ idx, int row0, int n, int cols, int nsplit, long pstride) {
    int i = blockIdx.x;
    if (i >= n) return;
    long r = idx ? (long)idx[i] : (long)row0 + i;
    float gi = g ? g[i] : 1.f;
    const float* s = src + (long)i * cols;
    T* d = dst + r * cols;
    constexpr int N = V16<T>::N;
    if ((cols % N == 0) && (pstride % 4 == 0) && aligned16(s) && aligned16(d)) {
        for (int c = threadIdx.x * N; c < cols; c += blockDim.x * N) {
            float x[N];
#pragma unroll
            for (int j = 0; j < N; j += 4) ld16<float>(s + c + j, x + j);
            for (int p = 1; p < nsplit; p++) {
                float y[N];
                const float* sp = s + (long)p * pstride + c;
#pragma unroll
                for (int j = 0; j < N; j += 4) ld16<float>(sp + j, y + j);
#pragma unroll
                for (int j = 0; j < N; j++) x[j] += y[j];
            }
#pragma unroll
            for (int j = 0; j < N; j++) x[j] *= gi;
            st16<T>(d + c, x);
        }
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            float x = s[c];
            for (int p = 1; p < nsplit; p++) x += s[(long)p * pstride + c];
            st(d, c, gi * x);
        }
    }
}

#define LOGPROB_ENTRY(T, S)                                                                          \
    extern "C" __global__ void logprob_fold_##S(float* stats, T* store, float* moff, const float* logits, \
                                                const int* targets, int n, int nv, int v0, int V,     \
                                                int sub, int nsub, int first) {                       \
        logprob_fold<T>(stats, store, moff, logits, targets, n, nv, v0, V, sub, nsub, first);         \
    }                                                                                                 \
    extern "C" __global__ void logprob_dlogits_stored_##S(T* buf, const float* moff, const float* lse, \
                                                          const float* dlogp, const int* targets,     \
                                                          int n, int V, int vc, int nsub) {           \
        logprob_dlogits_stored<T>(buf, moff, lse, dlogp, targets, n, V, vc, nsub);                    \
    }                                                                                                 \
    extern "C" __global__ void logprob_dlogits_##S(T* out, const float* logits, const float* lse,     \
                                                   const float* dlogp, const int* targets, int n,     \
                                                   int nv, int v0) {                                  \
        logprob_dlogits<T>(out, logits, lse, dlogp, targets, n, nv, v0);                              \
    }                                                                                                 \
    extern "C" __global__ void logprob_dlogits_inplace_##S(T* buf, const float* lse, const float* dlogp, \
                                                           const int* targets, int n, int nv, int v0) { \
        logprob_dlogits_inplace<T>(buf, lse, dlogp, targets, n, nv, v0);                             \
    }                                                                                                 \
    extern "C" __global__ void logprob_gather_rows_##S(T* dst, const T* src, const int* idx, int n,   \
                                                       int cols) {                                    \
        logprob_gather_rows<T>(dst, src, idx, n, cols);                                               \
    }                                                                                                 \
    extern "C" __global__ void logprob_scatter_sum_##S(T* dst, const float* src, const float* g,      \
                                                       const int* idx, int row0, int n, int cols,     \
                                                       int nsplit, long pstride) {                    \
        logprob_scatter_sum<T>(dst, src, g, idx, row0, n, cols, nsplit, pstride);                     \
    }
AM3_BOTH_DTYPES(LOGPROB_ENTRY)

// One block of 1024 threads (a multiple of 32). Stream compaction of the tokens with
// flags[i] != 0 (NaN counts as set): idx[0 .. count) = their indices in order, pos[i] = the
// packed index of token i or -1, count[0] = how many.
extern "C" __global__ void logprob_scan_nonzero(int* __restrict__ idx, int* __restrict__ pos,
                                                int* __restrict__ count, const float* __restrict__ flags,
                                                int n) {
    __shared__ int warp_tot[32];
    __shared__ int base;
    int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP, nw = blockDim.x / WARP;
    if (threadIdx.x == 0) base = 0;
    __syncthreads();
    for (int start = 0; start < n; start += blockDim.x) {
        int i = start + threadIdx.x;
        int f = (i < n && flags[i] != 0.f) ? 1 : 0;
        int x = f;   // inclusive scan within the warp
#pragma unroll
        for (int o = 1; o < WARP; o <<= 1) {
            int y = __shfl_up_sync(0xffffffffu, x, o);
            if (lane >= o) x += y;
        }
        if (lane == WARP - 1) warp_tot[wid] = x;
        __syncthreads();
        if (wid == 0) {   // inclusive scan of the warp totals
            int t = lane < nw ? warp_tot[lane] : 0;
#pragma unroll
            for (int o = 1; o < WARP; o <<= 1) {
                int y = __shfl_up_sync(0xffffffffu, t, o);
                if (lane >= o) t += y;
            }
            warp_tot[lane] = t;
        }
        __syncthreads();
        int excl = base + (wid > 0 ? warp_tot[wid - 1] : 0) + x - f;
        if (i < n) {
            if (f) idx[excl] = i;
            pos[i] = f ? excl : -1;
        }
        __syncthreads();
        if (threadIdx.x == 0) base += warp_tot[nw - 1];
        __syncthreads();
    }
    if (threadIdx.x == 0) count[0] = base;
}

// dst[p] = scale * src[idx ? idx[p] : p] for p in [p0, p0 + n).
extern "C" __global__ void logprob_gather_vec_f32(float* __restrict__ dst, const float* __restrict__ src,
                                                  const int* __restrict__ idx, int p0, int n, float scale) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    long p = p0 + i;
    dst[p] = scale * src[idx ? (long)idx[p] : p];
}

// dst[p] = src[idx[p]] for p < n.
extern "C" __global__ void logprob_gather_vec_i32(int* __restrict__ dst, const int* __restrict__ src,
                                                  const int* __restrict__ idx, int n) {
    long p = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= n) return;
    dst[p] = src[idx[p]];
}

// dst[t] = src[pos[t]] for active tokens, 0 for the others (t < n).
extern "C" __global__ void logprob_expand_vec_f32(float* __restrict__ dst, const float* __restrict__ src,
                                                  const int* __restrict__ pos, int n) {
    long t = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    int q = pos[t];
    dst[t] = q >= 0 ? src[q] : 0.f;
}

// ---- Row fold helpers of the bf16-logit pass (LogitPrecision::Bf16) ----

// Online log-sum-exp state of one thread: m = max, s = sum e^(x - m), u = sum e^(x - m) (x - m).
// Merges (m2, s2, u2) into (m, s, u). An empty side (s == 0) is skipped, so -inf maxima never
// meet; a NaN s propagates.
__device__ __forceinline__ void lse_merge(float& m, float& s, float& u, float m2, float s2, float u2) {
    float mn = fmaxf(m, m2);
    float sn = 0.f, un = 0.f;
    if (s != 0.f) { float d = m - mn, a = expf(d); sn += a * s; un += a * (u + d * s); }
    if (s2 != 0.f) { float d = m2 - mn, a = expf(d); sn += a * s2; un += a * (u2 + d * s2); }
    m = mn;
    s = sn;
    u = un;
}

// Folds K values into the thread's state: one rescale per group at most, one expf per value.
template <int K>
__device__ __forceinline__ void lse_fold_group(const float* x, float& m, float& s, float& u) {
    float g = x[0];
#pragma unroll
    for (int i = 1; i < K; i++) g = fmaxf(g, x[i]);
    if (g > m) {
        if (s != 0.f) { float d = m - g, a = expf(d); u = a * (u + d * s); s = a * s; }
        m = g;
    }
    if (m == NEG_INF) return;   // only -inf (or NaN-free empty) so far
#pragma unroll
    for (int i = 0; i < K; i++) {
        float d = x[i] - m, e = expf(d);
        s += e;
        u += e == 0.f ? 0.f : e * d;   // e^(-inf) * (-inf) would be NaN
    }
}

// ---- The bf16-logit pass (LogitPrecision::Bf16): one logits GEMM per chunk straight into the
// kept buffer at the storage type, then fold and dlogits in one kernel ----
// dlogits = g * u with u = onehot(target) - softmax, which does not depend on g = dlogp: one
// kernel per chunk folds each row, finishes lse / logp / entropy, and overwrites the row with u
// (storage type). The caller applies g after: dhidden = diag(g) (U W) in the scatter and
// dW += U^T (diag(g) hidden). One block per row; the first `cache` values of the row are kept in
// dynamic shared memory between the two passes, the rest are re-read (from L2 when few rows are
// in flight: one 1024-thread block per SM). With write_u == 0 the kernel stops after lse / logp /
// entropy: the no-grad forward of the same precision (`fwd` with LogitPrecision::Bf16) runs the very same
// fold, so its log-probs equal the fused pass's bit for bit (pass `cache` = 0, no shared memory).
// The vector-or-scalar choice depends on V and the row's alignment only, never on `cache`
// (whole 16-byte vectors are cached), so both uses take the same path.

template <typename T>
__device__ void logprob_fold_u(T* __restrict__ buf, float* __restrict__ logp, float* __restrict__ lse_out,
                               float* __restrict__ ent, const int* __restrict__ targets, int n, int V, int cache,
                               int write_u) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* cached = reinterpret_cast<T*>(smem_raw);   // [cache]
    __shared__ float sm[32], ss[32], su[32];
    __shared__ float s_lse;
    int row = blockIdx.x;
    if (row >= n) return;
    T* br = buf + (long)row * V;
    float m = NEG_INF, s = 0.f, u = 0.f;
    constexpr int N = V16<T>::N;
    bool vec = (V % N == 0) && aligned16(br);
    if (vec) {
        int nvec = V / N, ncache = cache / N;
        for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
            float a[N];
            ld16<T>(br + (long)i * N, a);
            if (i < ncache) *reinterpret_cast<Vec16*>(cached + (long)i * N) = *reinterpret_cast<const Vec16*>(br + (long)i * N);
            lse_fold_group<N>(a, m, s, u);
        }
    } else {
        for (int c = threadIdx.x; c < V; c += blockDim.x) {
            float a[1] = {ld(br, c)};
            if (c < cache) cached[c] = br[c];
            lse_fold_group<1>(a, m, s, u);
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        float s2 = __shfl_xor_sync(0xffffffffu, s, o);
        float u2 = __shfl_xor_sync(0xffffffffu, u, o);
        lse_merge(m, s, u, m2, s2, u2);
    }
    int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP, nw = CEIL_DIV(blockDim.x, WARP);
    if (lane == 0) { sm[wid] = m; ss[wid] = s; su[wid] = u; }
    __syncthreads();
    int tg = targets[row];
    if (wid == 0) {
        m = lane < nw ? sm[lane] : NEG_INF;
        s = lane < nw ? ss[lane] : 0.f;
        u = lane < nw ? su[lane] : 0.f;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float m2 = __shfl_xor_sync(0xffffffffu, m, o);
            float s2 = __shfl_xor_sync(0xffffffffu, s, o);
            float u2 = __shfl_xor_sync(0xffffffffu, u, o);
            lse_merge(m, s, u, m2, s2, u2);
        }
        if (lane == 0) {
            float ls = logf(s);
            float L = m + ls;
            float tl = (tg >= 0 && tg < V) ? ld(br, tg) : NAN_F;
            lse_out[row] = L;
            logp[row] = tl - L;
            if (ent) ent[row] = ls - u / s;
            s_lse = L;
        }
    }
    if (!write_u) return;   // uniform over the grid
    __syncthreads();   // every read of pass 1 (and the target logit) is done before pass 2 writes
    float L = s_lse;
    if (vec) {
        int nvec = V / N, ncache = cache / N;
        for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
            float a[N];
            if (i < ncache) ld16<T>(cached + (long)i * N, a);
            else ld16<T>(br + (long)i * N, a);
            long c0 = (long)i * N;
#pragma unroll
            for (int k = 0; k < N; k++) a[k] = (c0 + k == tg ? 1.f : 0.f) - expf(a[k] - L);
            st16<T>(br + c0, a);
        }
    } else {
        for (int c = threadIdx.x; c < V; c += blockDim.x) {
            float x = c < cache ? ld(cached, c) : ld(br, c);
            st(br, c, (c == tg ? 1.f : 0.f) - expf(x - L));
        }
    }
}

// One block per row: dst[i, :] = g[i] * src[i, :] (storage type), i < n.
template <typename T>
__device__ void logprob_scale_rows(T* __restrict__ dst, const T* __restrict__ src, const float* __restrict__ g,
                                   int n, int cols) {
    int i = blockIdx.x;
    if (i >= n) return;
    float gi = g[i];
    const T* s = src + (long)i * cols;
    T* d = dst + (long)i * cols;
    constexpr int N = V16<T>::N;
    if ((cols % N == 0) && aligned16(s) && aligned16(d)) {
        for (int c = threadIdx.x * N; c < cols; c += blockDim.x * N) {
            float x[N];
            ld16<T>(s + c, x);
#pragma unroll
            for (int k = 0; k < N; k++) x[k] *= gi;
            st16<T>(d + c, x);
        }
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) st(d, c, gi * ld(s, c));
    }
}

#define LOGPROB_FOLD_U_ENTRY(T, S)                                                                       \
    extern "C" __global__ void __launch_bounds__(1024) logprob_fold_u_##S(T* buf, float* logp, float* lse, \
                                                     float* ent, const int* targets, int n, int V,    \
                                                     int cache, int write_u) {                        \
        logprob_fold_u<T>(buf, logp, lse, ent, targets, n, V, cache, write_u);                        \
    }                                                                                                 \
    extern "C" __global__ void logprob_scale_rows_##S(T* dst, const T* src, const float* g, int n,    \
                                                      int cols) {                                     \
        logprob_scale_rows<T>(dst, src, g, n, cols);                                                  \
    }
AM3_BOTH_DTYPES(LOGPROB_FOLD_U_ENTRY)
