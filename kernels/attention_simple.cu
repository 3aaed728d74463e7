// Attention on CUDA cores, one warp per query row (or per key row for dK/dV): exact f32 math, any
// head dim up to 256, both dtypes. The f32 path and the fallback for head dims without
// tensor-core kernels; also the shared small kernels (backward's D = rowsum(dO*O), KV-cache append).
// Layouts: q/out [T, hq, d], k/v [T, hkv, d], lse/D [hq, T]; cu = cumulative sequence offsets.
#include "common.cuh"

#define MAXD 256
#define PER_LANE (MAXD / WARP)   // head-dim elements each lane holds

// The sequence owning token t: the s with cu[s] <= t < cu[s+1] (binary search over nseq+1 offsets).
__device__ __forceinline__ int seq_of(const int* cu, int nseq, int t) {
    int lo = 0, hi = nseq - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (cu[mid] <= t) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// Loads a d-vector into lane-strided registers: x[i] = p[lane + 32 i] (0 past d).
template <typename T>
__device__ __forceinline__ void load_row(float* x, const T* p, int d, int lane) {
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) {
        int c = lane + WARP * i;
        x[i] = c < d ? ld(p, c) : 0.f;
    }
}

template <typename T>
__device__ __forceinline__ float dot_row(const float* x, const T* p, int d, int lane) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) {
        int c = lane + WARP * i;
        if (c < d) s += x[i] * ld(p, c);
    }
    return warp_sum(s);
}

// out, lse for query row (token t, head h): online softmax over the row's keys.
template <typename T>
__device__ void simple_fwd(T* __restrict__ out, float* __restrict__ lse, const T* __restrict__ q,
                           const T* __restrict__ k, const T* __restrict__ v, const int* __restrict__ cu,
                           int nseq, int T_, int hq, int hkv, int d, float scale, int causal) {
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= (long)T_ * hq) return;
    int t = (int)(row / hq), h = (int)(row % hq);
    int sq = seq_of(cu, nseq, t);
    int start = cu[sq], end = causal ? t + 1 : cu[sq + 1];
    int hk = h / (hq / hkv);
    float qr[PER_LANE], acc[PER_LANE];
    load_row(qr, q + ((long)t * hq + h) * d, d, lane);
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) acc[i] = 0.f;
    float m = NEG_INF, l = 0.f;
    for (int j = start; j < end; j++) {
        long ko = ((long)j * hkv + hk) * d;
        float s = dot_row(qr, k + ko, d, lane) * scale;
        float mn = fmaxf(m, s);
        float corr = expf(m - mn), p = expf(s - mn);   // m = -inf at j = start: corr = 0
        l = l * corr + p;
#pragma unroll
        for (int i = 0; i < PER_LANE; i++) {
            int c = lane + WARP * i;
            acc[i] = acc[i] * corr + (c < d ? p * ld(v + ko, c) : 0.f);
        }
        m = mn;
    }
    float inv = l > 0.f ? 1.f / l : 0.f;
    T* o = out + ((long)t * hq + h) * d;
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) {
        int c = lane + WARP * i;
        if (c < d) st(o, c, acc[i] * inv);
    }
    if (lane == 0) lse[(long)h * T_ + t] = m + logf(l);
}

// dvec[h, t] = sum_c dout[t, h, c] * out[t, h, c] (f32), one warp per row.
template <typename T>
__device__ void bwd_dot(float* __restrict__ dvec, const T* __restrict__ dout, const T* __restrict__ out,
                        int T_, int hq, int d) {
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= (long)T_ * hq) return;
    int t = (int)(row / hq), h = (int)(row % hq);
    const T* a = dout + row * d;
    const T* b = out + row * d;
    float s = 0.f;
    for (int c = lane; c < d; c += WARP) s += ld(a, c) * ld(b, c);
    s = warp_sum(s);
    if (lane == 0) dvec[(long)h * T_ + t] = s;
}

// dq for query row (t, h): sum over keys j of ds_j k_j * scale, ds_j = p_j (dout.v_j - D).
template <typename T>
__device__ void simple_bwd_dq(T* __restrict__ dq, const T* __restrict__ q, const T* __restrict__ k,
                              const T* __restrict__ v, const T* __restrict__ dout, const float* __restrict__ lse,
                              const float* __restrict__ dvec, const int* __restrict__ cu, int nseq, int T_,
                              int hq, int hkv, int d, float scale, int causal) {
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= (long)T_ * hq) return;
    int t = (int)(row / hq), h = (int)(row % hq);
    int sq = seq_of(cu, nseq, t);
    int start = cu[sq], end = causal ? t + 1 : cu[sq + 1];
    int hk = h / (hq / hkv);
    float qr[PER_LANE], dor[PER_LANE], acc[PER_LANE];
    load_row(qr, q + row * d, d, lane);
    load_row(dor, dout + row * d, d, lane);
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) acc[i] = 0.f;
    float L = lse[(long)h * T_ + t], D = dvec[(long)h * T_ + t];
    for (int j = start; j < end; j++) {
        long ko = ((long)j * hkv + hk) * d;
        float p = expf(dot_row(qr, k + ko, d, lane) * scale - L);
        float ds = p * (dot_row(dor, v + ko, d, lane) - D);
#pragma unroll
        for (int i = 0; i < PER_LANE; i++) {
            int c = lane + WARP * i;
            if (c < d) acc[i] += ds * ld(k + ko, c);
        }
    }
    T* o = dq + row * d;
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) {
        int c = lane + WARP * i;
        if (c < d) st(o, c, acc[i] * scale);
    }
}

// dk, dv for key row (token j, kv head hk): sums over the group's query heads and the queries
// that see key j (all of the sequence, or those at or after j when causal). No atomics.
template <typename T>
__device__ void simple_bwd_dkv(T* __restrict__ dk, T* __restrict__ dv, const T* __restrict__ q,
                               const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
                               const float* __restrict__ lse, const float* __restrict__ dvec,
                               const int* __restrict__ cu, int nseq, int T_, int hq, int hkv, int d,
                               float scale, int causal) {
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= (long)T_ * hkv) return;
    int j = (int)(row / hkv), hk = (int)(row % hkv);
    int sq = seq_of(cu, nseq, j);
    int first = causal ? j : cu[sq], end = cu[sq + 1];
    int grp = hq / hkv;
    float kr[PER_LANE], vr[PER_LANE], ak[PER_LANE], av[PER_LANE];
    load_row(kr, k + row * d, d, lane);
    load_row(vr, v + row * d, d, lane);
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) { ak[i] = 0.f; av[i] = 0.f; }
    for (int h = hk * grp; h < (hk + 1) * grp; h++) {
        for (int t = first; t < end; t++) {
            long qo = ((long)t * hq + h) * d;
            float p = expf(dot_row(kr, q + qo, d, lane) * scale - lse[(long)h * T_ + t]);
            float ds = p * (dot_row(vr, dout + qo, d, lane) - dvec[(long)h * T_ + t]);
#pragma unroll
            for (int i = 0; i < PER_LANE; i++) {
                int c = lane + WARP * i;
                if (c < d) {
                    ak[i] += ds * ld(q + qo, c);
                    av[i] += p * ld(dout + qo, c);
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) {
        int c = lane + WARP * i;
        if (c < d) {
            st(dk + row * d, c, ak[i] * scale);
            st(dv + row * d, c, av[i]);
        }
    }
}

// Decode, one warp per query row (b, i, h) of q/out [B, n_new, hq, d] against the cache
// k/v [B, max_len, hkv, d]: new token i sits at position lens[b] - n_new + i.
// One query row of decode against sequence b's cache: keys 0..end (online softmax, f32).
template <typename T>
__device__ __forceinline__ void decode_row(T* __restrict__ o, const T* __restrict__ qrow, const T* __restrict__ kc,
                                           const T* __restrict__ vc, int b, int end, int hk, int hkv, int d,
                                           int max_len, float scale, int lane) {
    float qr[PER_LANE], acc[PER_LANE];
    load_row(qr, qrow, d, lane);
#pragma unroll
    for (int c = 0; c < PER_LANE; c++) acc[c] = 0.f;
    float m = NEG_INF, l = 0.f;
    for (int j = 0; j < end; j++) {
        long ko = (((long)b * max_len + j) * hkv + hk) * d;
        float s = dot_row(qr, kc + ko, d, lane) * scale;
        float mn = fmaxf(m, s);
        float corr = expf(m - mn), p = expf(s - mn);
        l = l * corr + p;
#pragma unroll
        for (int c = 0; c < PER_LANE; c++) {
            int cc = lane + WARP * c;
            acc[c] = acc[c] * corr + (cc < d ? p * ld(vc + ko, cc) : 0.f);
        }
        m = mn;
    }
    float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
    for (int c = 0; c < PER_LANE; c++) {
        int cc = lane + WARP * c;
        if (cc < d) st(o, cc, acc[c] * inv);
    }
}

// Decode, one warp per query row: out/q [B, n_new, hq, d]; sequence b's cache holds lens[b]
// tokens, the last n_new of them new.
template <typename T>
__device__ void simple_decode(T* __restrict__ out, const T* __restrict__ q, const T* __restrict__ kc,
                              const T* __restrict__ vc, const int* __restrict__ lens, int B, int n_new, int hq,
                              int hkv, int d, int max_len, float scale, int causal) {
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= (long)B * n_new * hq) return;
    int h = (int)(row % hq);
    int i = (int)((row / hq) % n_new);
    int b = (int)(row / ((long)hq * n_new));
    int len = lens[b];
    int end = causal ? len - n_new + i + 1 : len;
    decode_row(out + row * d, q + row * d, kc, vc, b, end, h / (hq / hkv), hkv, d, max_len, scale, lane);
}

// Ragged decode: out/q [T_new, hq, d] packed by cu [B+1] (sequence b has cu[b+1]-cu[b] new
// tokens, possibly 0); lens[b] already counts them.
template <typename T>
__device__ void simple_decode_varlen(T* __restrict__ out, const T* __restrict__ q, const T* __restrict__ kc,
                                     const T* __restrict__ vc, const int* __restrict__ lens,
                                     const int* __restrict__ cu, int B, int hq, int hkv, int d, int max_len,
                                     float scale, int causal) {
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    int lane = threadIdx.x % WARP;
    int total = cu[B];
    if (row >= (long)total * hq) return;
    int h = (int)(row % hq);
    int t = (int)(row / hq);
    int b = seq_of(cu, B, t);
    int n_b = cu[b + 1] - cu[b];
    int i = t - cu[b];
    int len = lens[b];
    int end = causal ? len - n_b + i + 1 : len;
    decode_row(out + row * d, q + row * d, kc, vc, b, end, h / (hq / hkv), hkv, d, max_len, scale, lane);
}

// KV-cache append, one block per new row t of knew/vnew [T_new, row]: sequence b owns rows
// b*uniform_n.. (uniform_n > 0) or cu[b]..cu[b+1]; its rows go to positions lens[b]... The host
// checked that they fit in max_len and updates lens after this kernel.
template <typename T>
__device__ void kv_append(T* __restrict__ kc, T* __restrict__ vc, const int* __restrict__ lens,
                          const T* __restrict__ knew, const T* __restrict__ vnew, const int* __restrict__ cu,
                          int nseq, int uniform_n, int max_len, int row) {
    int t = blockIdx.x;
    int b, off;
    if (uniform_n > 0) { b = t / uniform_n; off = t % uniform_n; }
    else { b = seq_of(cu, nseq, t); off = t - cu[b]; }
    long dst = ((long)b * max_len + lens[b] + off) * row;
    const T* ks = knew + (long)t * row;
    const T* vs = vnew + (long)t * row;
    constexpr int N = V16<T>::N;
    if (row % N == 0 && aligned16(ks) && aligned16(vs) && aligned16(kc + dst) && aligned16(vc + dst)) {
        for (int c = threadIdx.x * N; c < row; c += blockDim.x * N) {
            *reinterpret_cast<Vec16*>(kc + dst + c) = *reinterpret_cast<const Vec16*>(ks + c);
            *reinterpret_cast<Vec16*>(vc + dst + c) = *reinterpret_cast<const Vec16*>(vs + c);
        }
    } else {
        for (int c = threadIdx.x; c < row; c += blockDim.x) {
            kc[dst + c] = ks[c];
            vc[dst + c] = vs[c];
        }
    }
}

#define ATTN_SIMPLE_ENTRY(T, S)                                                                                   \
    extern "C" __global__ void attention_simple_fwd_##S(T* out, float* lse, const T* q, const T* k, const T* v,     \
                                                        const int* cu, int nseq, int T_, int hq, int hkv, int d,   \
                                                        float scale, int causal) {                                 \
        simple_fwd<T>(out, lse, q, k, v, cu, nseq, T_, hq, hkv, d, scale, causal);                                 \
    }                                                                                                             \
    extern "C" __global__ void attention_bwd_dot_##S(float* dvec, const T* dout, const T* out, int T_, int hq,     \
                                                     int d) {                                                      \
        bwd_dot<T>(dvec, dout, out, T_, hq, d);                                                                    \
    }                                                                                                             \
    extern "C" __global__ void attention_simple_bwd_dq_##S(T* dq, const T* q, const T* k, const T* v,              \
                                                           const T* dout, const float* lse, const float* dvec,     \
                                                           const int* cu, int nseq, int T_, int hq, int hkv,       \
                                                           int d, float scale, int causal) {                       \
        simple_bwd_dq<T>(dq, q, k, v, dout, lse, dvec, cu, nseq, T_, hq, hkv, d, scale, causal);                   \
    }                                                                                                             \
    extern "C" __global__ void attention_simple_bwd_dkv_##S(T* dk, T* dv, const T* q, const T* k, const T* v,      \
                                                            const T* dout, const float* lse, const float* dvec,    \
                                                            const int* cu, int nseq, int T_, int hq, int hkv,      \
                                                            int d, float scale, int causal) {                      \
        simple_bwd_dkv<T>(dk, dv, q, k, v, dout, lse, dvec, cu, nseq, T_, hq, hkv, d, scale, causal);              \
    }                                                                                                             \
    extern "C" __global__ void attention_simple_decode_##S(T* out, const T* q, const T* kc, const T* vc,           \
                                                           const int* lens, int B, int n_new, int hq, int hkv,     \
                                                           int d, int max_len, float scale, int causal) {          \
        simple_decode<T>(out, q, kc, vc, lens, B, n_new, hq, hkv, d, max_len, scale, causal);                      \
    }                                                                                                             \
    extern "C" __global__ void attention_simple_decode_varlen_##S(T* out, const T* q, const T* kc, const T* vc,    \
                                                                  const int* lens, const int* cu, int B, int hq,  \
                                                                  int hkv, int d, int max_len, float scale,       \
                                                                  int causal) {                                   \
        simple_decode_varlen<T>(out, q, kc, vc, lens, cu, B, hq, hkv, d, max_len, scale, causal);                  \
    }                                                                                                             \
    extern "C" __global__ void attention_kv_append_##S(T* kc, T* vc, const int* lens, const T* knew,              \
                                                       const T* vnew, const int* cu, int nseq, int uniform_n,      \
                                                       int max_len, int row) {                                     \
        kv_append<T>(kc, vc, lens, knew, vnew, cu, nseq, uniform_n, max_len, row);                                 \
    }
AM3_BOTH_DTYPES(ATTN_SIMPLE_ENTRY)
