// Token sampling for rollouts (src/ops/sample.rs holds the CPU reference that defines the
// semantics): one block per logits row; the row is read several times (it stays in L2).
//   A: max (lowest index: the greedy token) and min of x = logit * inv_t;
//   top-k: bisection over the order-preserving u32 keys of x (count of keys >= mid);
//   B: full-vocab and survivor masses in fixed point (q = round(exp(x - max) * 2^40), u64 sums:
//      exact, so independent of summation order), the smallest survivor key with q > 0;
//   top-p: bisection on the survivor mass of keys >= mid against top_p * Z_S (f64);
//   Gumbel-max over kept (key >= threshold): argmax of x + g(key, j), lowest index on ties.
// exp, ln, the hash and every f32 operation on these paths are written with explicit _rn
// intrinsics (no FMA contraction) exactly as in the Rust reference, so thresholds and tokens are
// bit-identical to the CPU; only logp's final f64 log may differ in the last bits.
// GPU-only safe behaviour: a NaN logit reads as -inf and +inf as the largest finite f32; a row
// with no finite value gets token 0 and logp NaN, which the launcher reports as an error.
#include "common.cuh"

#define POS_INF __int_as_float(0x7f800000)
#define F32_MAX __int_as_float(0x7f7fffff)
#define I32_MAX 0x7fffffff
#define SAMPLE_THREADS 1024

// Order-preserving encoding: a < b (floats, no NaN, no -0) iff key(a) < key(b) (unsigned).
__device__ __forceinline__ u32 fkey(float x) {
    u32 b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float fkey_inv(u32 k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// x = logit * inv_t with the GPU's NaN/+inf rule, overflow clamped, -0 made +0.
__device__ __forceinline__ float to_x(float l, float inv_t) {
    if (l != l) l = NEG_INF;
    else if (l == POS_INF) l = F32_MAX;
    float x = __fmul_rn(l, inv_t);
    if (fabsf(x) == POS_INF && fabsf(l) != POS_INF) x = copysignf(F32_MAX, x);
    return __fadd_rn(x, 0.0f);
}

// exp(d) for d <= 0; 0 below -32 (those terms are under the 2^-41 fixed-point resolution).
__device__ __forceinline__ float det_exp(float d) {
    if (!(d >= -32.0f)) return 0.0f;
    float n = rintf(__fmul_rn(d, __int_as_float(0x3fb8aa3b)));          // log2(e)
    float r = __fmaf_rn(-n, __int_as_float(0x3f317200), d);            // ln2 hi
    r = __fmaf_rn(-n, __int_as_float(0x35bfbe8e), r);                  // ln2 lo
    float p = __int_as_float(0x39500d01);                              // 1/5040
    p = __fmaf_rn(p, r, __int_as_float(0x3ab60b61));                   // 1/720
    p = __fmaf_rn(p, r, __int_as_float(0x3c088889));                   // 1/120
    p = __fmaf_rn(p, r, __int_as_float(0x3d2aaaab));                   // 1/24
    p = __fmaf_rn(p, r, __int_as_float(0x3e2aaaab));                   // 1/6
    p = __fmaf_rn(p, r, 0.5f);
    p = __fmaf_rn(p, r, 1.0f);
    p = __fmaf_rn(p, r, 1.0f);
    return __fmul_rn(p, __int_as_float(((int)n + 127) << 23));
}

// Fixed-point mass of x: round(exp(x - m) * 2^40), ties to even.
__device__ __forceinline__ u64 mass_q(float x, float m) {
    return __float2ull_rn(__fmul_rn(det_exp(__fsub_rn(x, m)), 1099511627776.0f));
}

// ln(x) for a positive normal x.
__device__ __forceinline__ float det_ln(float x) {
    u32 b = __float_as_uint(x);
    int e = (int)((b >> 23) & 0xffu) - 127;
    float m = __uint_as_float((b & 0x007fffffu) | 0x3f800000u);
    if (m > __int_as_float(0x3fb504f3)) { m = __fmul_rn(m, 0.5f); e += 1; }   // sqrt(2)
    float s = __fdiv_rn(__fsub_rn(m, 1.0f), __fadd_rn(m, 1.0f));
    float s2 = __fmul_rn(s, s);
    float p = __int_as_float(0x3de38e39);                              // 1/9
    p = __fmaf_rn(p, s2, __int_as_float(0x3e124925));                  // 1/7
    p = __fmaf_rn(p, s2, __int_as_float(0x3e4ccccd));                  // 1/5
    p = __fmaf_rn(p, s2, __int_as_float(0x3eaaaaab));                  // 1/3
    p = __fmaf_rn(p, s2, 1.0f);
    float t = __fmul_rn(s, p);
    float lnm = __fadd_rn(t, t);
    float ef = (float)e;
    return __fmaf_rn(ef, __int_as_float(0x3f317200), __fmaf_rn(ef, __int_as_float(0x35bfbe8e), lnm));
}

__device__ __forceinline__ u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Gumbel noise of token j; `rowseed` = mix64(stream key). u in (0, 1) on a 2^-23 grid.
__device__ __forceinline__ float gumbel(u64 rowseed, int j) {
    u64 h = mix64(rowseed ^ ((u64)(j + 1) * 0x9E3779B97F4A7C15ull));
    float u = __fmul_rn(__fadd_rn((float)(u32)(h >> 41), 0.5f), __int_as_float(0x34000000));   // 2^-23
    return -det_ln(-det_ln(u));
}

// Calls f(j, x) for every token of the row; each thread sees its tokens in increasing j.
template <typename T, typename F>
__device__ __forceinline__ void scan_row(const T* row, int V, float inv_t, F&& f) {
    constexpr int N = V16<T>::N;
    if (V % N == 0 && aligned16(row)) {
        for (int base = threadIdx.x * N; base < V; base += blockDim.x * N) {
            float v[N];
            ld16(row + base, v);
#pragma unroll
            for (int i = 0; i < N; i++) f(base + i, to_x(v[i], inv_t));
        }
    } else {
        for (int j = threadIdx.x; j < V; j += blockDim.x) f(j, to_x(ld(row, (long)j), inv_t));
    }
}

// (x, i) is better than (y, k): larger value, then lower index.
__device__ __forceinline__ void take_better(float& x, int& i, float y, int k) {
    if (y > x || (y == x && k < i)) { x = y; i = k; }
}
// Block argmax of (x, i); every thread gets the result.
__device__ __forceinline__ void block_argmax(float& x, int& i, float* sx, int* si) {
    int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP, nw = CEIL_DIV(blockDim.x, WARP);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) take_better(x, i, __shfl_xor_sync(0xffffffffu, x, o), __shfl_xor_sync(0xffffffffu, i, o));
    __syncthreads();
    if (lane == 0) { sx[wid] = x; si[wid] = i; }
    __syncthreads();
    x = lane < nw ? sx[lane] : NEG_INF;
    i = lane < nw ? si[lane] : I32_MAX;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) take_better(x, i, __shfl_xor_sync(0xffffffffu, x, o), __shfl_xor_sync(0xffffffffu, i, o));
}
__device__ __forceinline__ u64 block_sum_u64(u64 v, u64* s) {
    int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP, nw = CEIL_DIV(blockDim.x, WARP);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) s[wid] = v;
    __syncthreads();
    v = lane < nw ? s[lane] : 0ull;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float block_min(float v, float* s) {
    int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP, nw = CEIL_DIV(blockDim.x, WARP);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) s[wid] = v;
    __syncthreads();
    v = lane < nw ? s[lane] : POS_INF;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ u32 block_min_u32(u32 v, u32* s) {
    int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP, nw = CEIL_DIV(blockDim.x, WARP);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) { u32 w = __shfl_xor_sync(0xffffffffu, v, o); v = w < v ? w : v; }
    __syncthreads();
    if (lane == 0) s[wid] = v;
    __syncthreads();
    v = lane < nw ? s[lane] : 0xffffffffu;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) { u32 w = __shfl_xor_sync(0xffffffffu, v, o); v = w < v ? w : v; }
    return v;
}

// params: 4 u32 per row {inv_t (f32 bits), top_k (0 = off), top_p (f32 bits), flags (bit 0:
// greedy)}; keys: one u64 per row. out: 2 u32 per row {token, logp (f32 bits)}; thr: the kept-set
// threshold per row (kept = x >= thr; -inf keeps all). The block must be SAMPLE_THREADS wide.
template <typename T>
__device__ void sample_rows(u32* __restrict__ out, float* __restrict__ thr, const T* __restrict__ logits,
                            const u32* __restrict__ params, const u64* __restrict__ keys, int rows, int V) {
    __shared__ float s_f[WARP];
    __shared__ int s_i[WARP];
    __shared__ u64 s_u[WARP];
    __shared__ u32 s_k[WARP];
    int r = blockIdx.x;
    if (r >= rows) return;
    const T* row = logits + (long)r * V;
    const float inv_t = __uint_as_float(params[4 * r + 0]);
    const u32 top_k = params[4 * r + 1];
    const float top_p = __uint_as_float(params[4 * r + 2]);
    const bool greedy = (params[4 * r + 3] & 1u) != 0;

    // A: max with the lowest index, and min.
    float bx = NEG_INF, mn = POS_INF;
    int bi = I32_MAX;
    scan_row(row, V, inv_t, [&](int j, float x) {
        if (x > bx) { bx = x; bi = j; }
        mn = fminf(mn, x);
    });
    block_argmax(bx, bi, s_f, s_i);
    mn = block_min(mn, s_f);
    const float M = bx;
    if (M == NEG_INF) {   // every logit -inf or NaN: flagged by a NaN logp (uniform branch)
        if (threadIdx.x == 0) {
            out[2 * r] = 0;
            out[2 * r + 1] = 0x7fc00000u;
            thr[r] = __int_as_float(0x7fc00000);
        }
        return;
    }
    const u32 kM = fkey(M);

    // top-k: the largest key K with #{key >= K} >= k (= the k-th largest value).
    // Invariant: count(lo) >= k > count(hi).
    u32 kk = 0;
    if (!greedy && top_k > 0 && top_k < (u32)V) {
        u32 lo = fkey(mn), hi = kM + 1;
        while (hi - lo > 1) {
            u32 mid = lo + (hi - lo) / 2;
            u64 c = 0;
            scan_row(row, V, inv_t, [&](int, float x) { c += fkey(x) >= mid; });
            c = block_sum_u64(c, s_u);
            if (c >= top_k) lo = mid; else hi = mid;
        }
        kk = lo;
    }

    // B: full-vocab mass, survivor mass, smallest survivor key with q > 0.
    u64 zf = 0, zs = 0;
    u32 kmin = 0xffffffffu;
    scan_row(row, V, inv_t, [&](int, float x) {
        u64 q = mass_q(x, M);
        zf += q;
        u32 k = fkey(x);
        if (k >= kk) {
            zs += q;
            if (q != 0 && k < kmin) kmin = k;
        }
    });
    zf = block_sum_u64(zf, s_u);
    zs = block_sum_u64(zs, s_u);
    kmin = block_min_u32(kmin, s_k);

    int tok = bi;
    float threshold = M;
    if (!greedy) {
        u32 kt = kk;
        // top-p: the largest key K with mass(key >= K) >= top_p * Z_S among survivors.
        // Invariant: mass(lo) >= target > mass(hi); mass(kmin) = Z_S (q = 0 below kmin).
        if (top_p < 1.0f) {
            const double target = __dmul_rn((double)top_p, __ull2double_rn(zs));
            u32 lo = kmin, hi = kM + 1;
            while (hi - lo > 1) {
                u32 mid = lo + (hi - lo) / 2;
                u64 c = 0;
                scan_row(row, V, inv_t, [&](int, float x) {
                    if (fkey(x) >= mid) c += mass_q(x, M);
                });
                c = block_sum_u64(c, s_u);
                if (__ull2double_rn(c) >= target) lo = mid; else hi = mid;
            }
            kt = lo;
        }
        threshold = kt == 0 ? NEG_INF : fkey_inv(kt);
        // Gumbel-max over kept. g <= 16.64 for u <= 1 - 2^-24, so a token with x + 17 below
        // this thread's best cannot win: skipping it is exact.
        const u64 rowseed = mix64(keys[r]);
        float bs = NEG_INF;
        int bj = I32_MAX;
        scan_row(row, V, inv_t, [&](int j, float x) {
            if (fkey(x) >= kt && !(__fadd_rn(x, 17.0f) < bs)) {
                float s = __fadd_rn(x, gumbel(rowseed, j));
                if (s > bs || (s == bs && j < bj)) { bs = s; bj = j; }
            }
        });
        block_argmax(bs, bj, s_f, s_i);
        tok = bj;
    }
    if (threadIdx.x == 0) {
        float xt = to_x(ld(row, (long)tok), inv_t);
        double lnz = log(__ull2double_rn(zf)) - 27.725887222397812;   // - 40 ln 2
        float logp = (float)(((double)xt - (double)M) - lnz);
        out[2 * r] = (u32)tok;
        out[2 * r + 1] = __float_as_uint(logp);
        thr[r] = threshold;
    }
}

#define SAMPLE_ENTRY(T, S)                                                                               \
    extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)                                         \
        sample_##S(u32* out, float* thr, const T* logits, const u32* params, const u64* keys, int rows,  \
                   int V) {                                                                              \
        sample_rows<T>(out, thr, logits, params, keys, rows, V);                                         \
    }
AM3_BOTH_DTYPES(SAMPLE_ENTRY)
