// Fused attention backward on tensor cores (bf16 in/out, f32 accumulate), FlashAttention-2
// style, over variable-length packed sequences, causal or not, any GQA ratio, head dims 64, 80,
// 128. Layouts: q/dout/dq [T, hq, D], k/v/dk/dv [T, hkv, D], lse/dvec [hq, T]. Which kernels a
// call takes: `plan_bwd` in src/ops/attention/mod.rs.
//
// attention_bwd_qhead_bf16_d{64,80,128} (every sequence ≤ 64 tokens): one block = 64 keys of one
//   (sequence, q head), 4 warps of 16 keys; loops over the query tiles that see them, recomputes P
//   from lse, accumulates dK, dV in registers and adds dQ = dS·K into an f32 buffer with atomics.
//   With GQA each q head writes its own f32 dK/dV partial and attention_bwd_finish_bf16 sums the
//   group; it also rounds dQ to bf16. D = rowsum(dO∘O) comes from attention_simple.cu's
//   attention_bwd_dot.
//
// attention_bwd_kvhead_bf16_d{64,80,128} (longer sequences), with attention_bwd_rowdot_bf16 before
//   it and attention_bwd_dq_round_bf16 after it: described below.
#include "attention_mma.cuh"


template <int D>
__device__ __forceinline__ void bwd_body(float* __restrict__ dq_acc, void* __restrict__ dk_out, void* __restrict__ dv_out,
                                         const bf16* __restrict__ q, const bf16* __restrict__ k,
                                         const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                         const float* __restrict__ lse, const float* __restrict__ dvec,
                                         const int* __restrict__ cu, int T_, int hq, int hkv, float scale, float sl2,
                                         int causal) {
    constexpr int BM = ATT_TILE, BN = ATT_TILE, LD = D + 8, LDS = BM + 8, KS = D / 16, ND = D / 8, NQ = BM / 8;
    extern __shared__ __align__(16) unsigned char att_smem[];
    bf16* sK = reinterpret_cast<bf16*>(att_smem);  // [BN][LD]
    bf16* sV = sK + BN * LD;                        // [BN][LD]
    bf16* sQ = sV + BN * LD;                        // [BM][LD]
    bf16* sO = sQ + BM * LD;                        // [BM][LD] dO
    bf16* sS = sO + BM * LD;                        // [BN][LDS] dSᵀ (keys x queries)
    float* sL = reinterpret_cast<float*>(sS + BN * LDS);  // [BM] lse * log2(e)
    float* sD = sL + BM;                                   // [BM] dvec

    // Grid (key tiles, heads, sequences). (Key tile slowest was measured slower for this kernel:
    // 6.75 vs 6.58 ms causal, 1.13-1.24 vs 1.01 ms non-causal d64; run 2, PERF-attention.md.)
    const int sq = blockIdx.z, h = blockIdx.y;
    const int n0 = blockIdx.x * BN;  // key tile; tile 0 has the most work when causal and starts first
    const int start = cu[sq], len = cu[sq + 1] - start;
    if (n0 >= len) return;
    const int grp = hq / hkv, hk = h / grp;
    const long qs = (long)hq * D, ks = (long)hkv * D;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane >> 2, tig = lane & 3;

    load_rows<D, BN>(sK, k + (long)(start + n0) * ks + hk * D, ks, min(BN, len - n0));
    load_rows<D, BN>(sV, v + (long)(start + n0) * ks + hk * D, ks, min(BN, len - n0));
    const int mbeg = causal ? n0 - n0 % BM : 0;  // first query tile that sees these keys
    const int nmt = CEIL_DIV(len - mbeg, BM);
    const bf16* qh = q + (long)start * qs + h * D;
    const bf16* oh = dout + (long)start * qs + h * D;
    const float* lh = lse + (long)h * T_ + start;
    const float* dh = dvec + (long)h * T_ + start;
    // Query tile m: Q and dO rows by cp.async, lse/dvec by plain stores (visible after the next barrier).
    auto load_q = [&](int m) {
        load_rows<D, BM>(sQ, qh + m * qs, qs, min(BM, len - m));
        load_rows<D, BM>(sO, oh + m * qs, qs, min(BM, len - m));
        if (threadIdx.x < BM) {
            int r = m + threadIdx.x;
            sL[threadIdx.x] = r < len ? lh[r] * ATT_LOG2E : 0.f;
            sD[threadIdx.x] = r < len ? dh[r] : 0.f;
        }
        cp_commit();
    };
    load_q(mbeg);

    float dk[ND][4], dv[ND][4];
#pragma unroll
    for (int dn = 0; dn < ND; dn++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[dn][e] = dv[dn][e] = 0.f;
    const int kr0 = warp * 16;             // the warp's key rows within the tile
    const int key_lo = n0 + kr0 + g;       // this thread's keys: key_lo, key_lo + 8

    for (int it = 0; it < nmt; it++) {
        const int m = mbeg + it * BM;
        cp_wait_all();
        __syncthreads();  // Q, dO, lse, dvec of tile m visible; every warp is done reading sS

        // Sᵀ = K Qᵀ for the warp's 16 keys x 64 queries.
        float s[NQ][4];
#pragma unroll
        for (int nb = 0; nb < NQ; nb++) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KS; kk++) {
            u32 a[4];
            ldsm4(a_addr(sK, LD, kr0, kk * 16, lane), a);
#pragma unroll
            for (int nb = 0; nb < NQ; nb += 2) {
                u32 b[4];
                ldsm4(b_addr(sQ, LD, nb * 8, kk * 16, lane), b);
                mma_bf16(s[nb], a, b[0], b[1]);
                mma_bf16(s[nb + 1], a, b[2], b[3]);
            }
        }
        // Pᵀ = exp2(S·sl2 − lse·log2e), zero where masked, kept as bf16 A fragments (registers).
        const bool edge = m + BM > len || n0 + BN > len || (causal && n0 + BN - 1 > m);
#pragma unroll
        for (int nb = 0; nb < NQ; nb++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int qc = nb * 8 + 2 * tig + (e & 1);
                int qpos = m + qc, kpos = key_lo + (e >> 1) * 8;
                bool ok = !edge || (qpos < len && kpos < len && (!causal || kpos <= qpos));
                s[nb][e] = ok ? exp2f(s[nb][e] * sl2 - sL[qc]) : 0.f;
            }
        u32 ap[NQ / 2][4];
#pragma unroll
        for (int kk = 0; kk < NQ / 2; kk++) c_to_a(ap[kk], s[2 * kk], s[2 * kk + 1]);
        // dV += Pᵀ dO.
#pragma unroll
        for (int kk = 0; kk < NQ / 2; kk++)
#pragma unroll
            for (int dn = 0; dn < ND; dn += 2) {
                u32 b[4];
                ldsm4t(bt_addr(sO, LD, kk * 16, dn * 8, lane), b);
                mma_bf16(dv[dn], ap[kk], b[0], b[1]);
                mma_bf16(dv[dn + 1], ap[kk], b[2], b[3]);
            }
        // dPᵀ = V dOᵀ.
        float dp[NQ][4];
#pragma unroll
        for (int nb = 0; nb < NQ; nb++) dp[nb][0] = dp[nb][1] = dp[nb][2] = dp[nb][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KS; kk++) {
            u32 a[4];
            ldsm4(a_addr(sV, LD, kr0, kk * 16, lane), a);
#pragma unroll
            for (int nb = 0; nb < NQ; nb += 2) {
                u32 b[4];
                ldsm4(b_addr(sO, LD, nb * 8, kk * 16, lane), b);
                mma_bf16(dp[nb], a, b[0], b[1]);
                mma_bf16(dp[nb + 1], a, b[2], b[3]);
            }
        }
        // dSᵀ = Pᵀ ∘ (dPᵀ − D), with P as rounded for dV (s[nb][e] is half e&1 of ap[nb/2][(nb&1)*2 + e/2]).
#pragma unroll
        for (int nb = 0; nb < NQ; nb++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                u32 w = ap[nb / 2][(nb & 1) * 2 + (e >> 1)];
                float p = (e & 1) ? bf_hi(w) : bf_lo(w);
                dp[nb][e] = p * (dp[nb][e] - sD[nb * 8 + 2 * tig + (e & 1)]);
            }
        // dK += dSᵀ Q (the scale is applied at the end).
#pragma unroll
        for (int kk = 0; kk < NQ / 2; kk++) {
            u32 as[4];
            c_to_a(as, dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
            for (int dn = 0; dn < ND; dn += 2) {
                u32 b[4];
                ldsm4t(bt_addr(sQ, LD, kk * 16, dn * 8, lane), b);
                mma_bf16(dk[dn], as, b[0], b[1]);
                mma_bf16(dk[dn + 1], as, b[2], b[3]);
            }
        }
        // dSᵀ (bf16) to shared memory for dQ, which needs it with queries as rows.
#pragma unroll
        for (int nb = 0; nb < NQ; nb++) {
            *reinterpret_cast<u32*>(sS + (kr0 + g) * LDS + nb * 8 + 2 * tig) = pack_bf2(dp[nb][0], dp[nb][1]);
            *reinterpret_cast<u32*>(sS + (kr0 + g + 8) * LDS + nb * 8 + 2 * tig) = pack_bf2(dp[nb][2], dp[nb][3]);
        }
        __syncthreads();  // dSᵀ visible; every warp is done with Q, dO, lse, dvec of tile m
        if (it + 1 < nmt) load_q(m + BM);  // overlaps the dQ work below

        // dQ[warp's 16 queries, D] += scale · dS[16 x 64 keys] · K[64 keys x D], by f32 atomics.
        u32 af[BN / 16][4];
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) ldsm4t(at_addr(sS, LDS, kk * 16, warp * 16, lane), af[kk]);
        const int q_lo = m + warp * 16 + g;
        float* dq_lo = dq_acc + (long)(start + q_lo) * qs + h * D + 2 * tig;
        float* dq_hi = dq_lo + 8 * qs;
#pragma unroll
        for (int dn = 0; dn < ND; dn += 2) {
            float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
            for (int kk = 0; kk < BN / 16; kk++) {
                u32 b[4];
                ldsm4t(bt_addr(sK, LD, kk * 16, dn * 8, lane), b);
                mma_bf16(acc[0], af[kk], b[0], b[1]);
                mma_bf16(acc[1], af[kk], b[2], b[3]);
            }
#pragma unroll
            for (int jj = 0; jj < 2; jj++) {
                int col = (dn + jj) * 8;
                if (q_lo < len) red_add2(dq_lo + col, acc[jj][0] * scale, acc[jj][1] * scale);
                if (q_lo + 8 < len) red_add2(dq_hi + col, acc[jj][2] * scale, acc[jj][3] * scale);
            }
        }
    }

    // dK (scaled) and dV: bf16 straight into [T, hkv, D] without GQA, else this head's f32 partial [T, hq, D].
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        int kp = key_lo + hh * 8;
        if (kp >= len) continue;
        long tok = start + kp;
#pragma unroll
        for (int dn = 0; dn < ND; dn++) {
            int col = dn * 8 + 2 * tig;
            float k0 = dk[dn][2 * hh] * scale, k1 = dk[dn][2 * hh + 1] * scale;
            float v0 = dv[dn][2 * hh], v1 = dv[dn][2 * hh + 1];
            if (grp == 1) {
                long o = tok * ks + hk * D + col;
                *reinterpret_cast<u32*>(reinterpret_cast<bf16*>(dk_out) + o) = pack_bf2(k0, k1);
                *reinterpret_cast<u32*>(reinterpret_cast<bf16*>(dv_out) + o) = pack_bf2(v0, v1);
            } else {
                long o = tok * qs + h * D + col;
                *reinterpret_cast<float2*>(reinterpret_cast<float*>(dk_out) + o) = make_float2(k0, k1);
                *reinterpret_cast<float2*>(reinterpret_cast<float*>(dv_out) + o) = make_float2(v0, v1);
            }
        }
    }
}

#define ATT_BWD_QHEAD_ENTRY(D)                                                                                       \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_bwd_qhead_bf16_d##D(                         \
        float* dq_acc, void* dk_out, void* dv_out, const bf16* q, const bf16* k, const bf16* v, const bf16* dout,    \
        const float* lse, const float* dvec, const int* cu, int T_, int hq, int hkv, float scale, float sl2,         \
        int causal) {                                                                                                \
        bwd_body<D>(dq_acc, dk_out, dv_out, q, k, v, dout, lse, dvec, cu, T_, hq, hkv, scale, sl2, causal);          \
    }
ATT_BWD_QHEAD_ENTRY(64)
ATT_BWD_QHEAD_ENTRY(80)
ATT_BWD_QHEAD_ENTRY(128)

// dq = bf16(dq_acc); with GQA partials, dk/dv[t, hk, :] = sum over the group's q heads of the
// f32 partials [t, hk*grp + j, :]. One thread per element of dq (the larger of the outputs).
extern "C" __global__ void attention_bwd_finish_bf16(bf16* dq, bf16* dk, bf16* dv, const float* dq_acc,
                                                     const float* dk_part, const float* dv_part, int T_, int hq,
                                                     int hkv, int d, int partials) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)T_ * hq * d) return;
    dq[i] = f2bf(dq_acc[i]);
    if (partials && i < (long)T_ * hkv * d) {
        int c = (int)(i % d);
        long th = i / d;
        int hk = (int)(th % hkv);
        long t = th / hkv;
        int grp = hq / hkv;
        long base = (t * hq + (long)hk * grp) * d + c;
        float sk = 0.f, sv = 0.f;
        for (int j = 0; j < grp; j++) {
            sk += dk_part[base + (long)j * d];
            sv += dv_part[base + (long)j * d];
        }
        dk[i] = f2bf(sk);
        dv[i] = f2bf(sv);
    }
}

// dvec[h, t] = Σ_c dout[t, h, c] · out[t, h, c] (f32 sum of the bf16 values), one thread per row;
// d a multiple of 8 and rows 16-byte aligned (the launcher checks).
extern "C" __global__ void attention_bwd_rowdot_bf16(float* dvec, const bf16* dout, const bf16* out, int T_, int hq, int d) {
    const long row = (long)blockIdx.x * blockDim.x + threadIdx.x;  // t * hq + h
    if (row >= (long)T_ * hq) return;
    const bf16* a = dout + row * d;
    const bf16* b = out + row * d;
    float s = 0.f;
#pragma unroll 4
    for (int c = 0; c < d; c += 8) {
        float x[8], y[8];
        ld16(a + c, x);
        ld16(b + c, y);
#pragma unroll
        for (int i = 0; i < 8; i++) s = fmaf(x[i], y[i], s);
    }
    const int t = (int)(row / hq), h = (int)(row - (long)t * hq);
    dvec[(long)h * T_ + t] = s;
}

// dq = bf16(dq_acc): n8 groups of 8 elements (16-byte aligned).
extern "C" __global__ void attention_bwd_dq_round_bf16(bf16* dq, const float* dq_acc, long n8) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8) return;
    float x[8];
    ld16(dq_acc + 8 * i, x);
    ld16(dq_acc + 8 * i + 4, x + 4);
    st16(dq + 8 * i, x);
}

// The backward for sequences longer than 64 tokens (src/ops/attention/bwd.rs): same inputs,
// outputs and layouts as the q-head kernel. Design and counts: PERF-attention.md, "Round 5".
//
// attention_bwd_rowdot_bf16 (above): dvec[h, t] = dout·out of row (t, h) (one thread per row,
// 16-byte loads).
//
// attention_bwd_kvhead_bf16_d{64,80,128}: one block = 64 keys of one (sequence, kv head), 4 warps,
//   walking the query tiles (64 rows) of every q head of the GQA group (dK/dV summed over the
//   group in registers, stored once as bf16; dQ by f32 atomics), with the five products of a
//   step split over the warps as FA2's 2 × 2 warp tiles, so every ldmatrix fragment feeds 4 mma
//   instead of 2:
//   warp w = (kw = w / 2, x = w % 2):
//     Sᵀ = K Qᵀ and dPᵀ = V dOᵀ for keys 32kw..+31 × queries 32x..+31 (two m16 key fragments
//       share every Q/dO fragment, two n-pairs share every K/V fragment);
//     P and dS (bf16) go to shared memory ([keys][queries]); after a 64-thread barrier of the
//       pair (warps 2kw, 2kw+1: the same keys, the other query half)
//     dV += Pᵀ dO and dK += dSᵀ Q for keys 32kw..+31 × head-dim half x over all 64 queries (the
//       warp's own query half from registers, the partner's from shared memory);
//     after the block barrier, dQ = dS K for queries 32kw..+31 × head-dim half x over the 64
//       keys, added into dq_acc by red.global.add.v2.f32.
//   128 ldmatrix.x4 per 320 mma per warp at d128. Two block barriers per step (+ the pair's): Q is double-buffered (step i+1 loads during the whole of step i), dO/lse/dvec load
//   after the second barrier (their last reader is before it), covered by dQ and the next S.
//   Grid: causal (kv heads, sequences, key tiles), key tile slowest = longest blocks first;
//   non-causal (key tiles, kv heads, sequences) for L2 locality.
//
// attention_bwd_dq_round_bf16 (above): dq = bf16(dq_acc), 8 elements per thread.

#define KVH_BN 64    // keys per block
#define KVH_BM 64    // query rows per step
#define KVH_NT 128   // 4 warps
#define KVH_LDS 72   // row stride (elements) of the P / dS tiles [64 keys][64 queries + 8]


// 4-byte async copy global -> shared; bytes = 0 writes zero and reads nothing.
__device__ __forceinline__ void cp_async4(u32 dst, const void* src, int bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}

// Named barrier 1 + pair over the pair's 64 threads (immediate ids: ptxas then reserves 3
// barriers, not all 16).
__device__ __forceinline__ void bar_pair(int pair) {
    if (pair) asm volatile("bar.sync 2, 64;\n" ::: "memory");
    else asm volatile("bar.sync 1, 64;\n" ::: "memory");
}

// 2^x by the SFU without exp2f's denormal range handling (x ≤ ~0 here; -inf gives 0).
__device__ __forceinline__ float kvh_exp2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

// Hides an integer's value from the optimizer, so that indices derived from it are recomputed
// where used instead of being hoisted into registers the accumulators need.
__device__ __forceinline__ int kvh_opaque_i(int x) {
    asm volatile("" : "+r"(x));
    return x;
}

// Shared-memory layout (byte offsets): K, V [64][D+8]; two stages of Q [64][D+8]; dO [64][D+8];
// P, dS [64 keys][72] bf16; lse then dvec [64] f32 of the current step.
template <int D>
struct KvhSmem {
    static constexpr int LDB = (D + 8) * 2;           // tile row stride, bytes
    static constexpr int LDSB = KVH_LDS * 2;           // P / dS row stride, bytes
    static constexpr u32 TILE = KVH_BN * LDB;
    static constexpr u32 K = 0, V = TILE, Q = 2 * TILE, DO = 4 * TILE;
    static constexpr u32 P = 5 * TILE, DS = P + KVH_BN * LDSB, L = DS + KVH_BN * LDSB;
    static constexpr u32 BYTES = L + 2 * KVH_BM * 4;
};

// Async load of 64 rows of D bf16 (global row stride gstride elements) into a [64][D+8] shared
// tile at byte address s by the block's 128 threads; rows >= nvalid are zero-filled (g must stay
// a valid address). The caller commits.
template <int D>
__device__ __forceinline__ void kvh_load_tile(u32 s, const bf16* g, int gstride, int nvalid) {
    constexpr int CH = D / 8, ITER = KVH_BM * CH / KVH_NT, LDB = (D + 8) * 2;
    static_assert(KVH_BM * CH % KVH_NT == 0, "whole chunks per thread");
    const int tid = kvh_opaque_i(threadIdx.x);
#pragma unroll
    for (int i = 0; i < ITER; i++) {
        const int c = tid + i * KVH_NT;
        const int r = c / CH, e = (c - r * CH) * 8;
        const bool ok = r < nvalid;
        cp_async16(s + r * LDB + e * 2, g + (ok ? r * gstride + e : 0), ok ? 16 : 0);
    }
}

// acc[mi][n] (n < ND2 8-column blocks starting at column n0 of a [16·kq..][D+8] tile, stored
// [K][N]) += a[mi] · B for one 16-row k-step: B fragments by ldmatrix.trans at byte address bt
// (row 16·kq, column n0 of the tile, plus this lane's offset). An odd last block uses half of
// an x4 load (the other half reads the neighbouring columns or the row padding, unused).
template <int ND2>
__device__ __forceinline__ void kvh_kstep(float (*acc)[ND2][4], const u32 (*a)[4], u32 bt) {
#pragma unroll
    for (int n = 0; n < ND2; n += 2) {
        u32 b[4];
        ldsm4t(bt + n * 16, b);
#pragma unroll
        for (int mi = 0; mi < 2; mi++) {
            mma_bf16(acc[mi][n], a[mi], b[0], b[1]);
            if (n + 1 < ND2) mma_bf16(acc[mi][n + 1], a[mi], b[2], b[3]);
        }
    }
}

// s[mi][nb] = rows (keys) 16·mi.. of the tile at byte address ka (A, [keys][D+8], lane offset
// included) · columns (queries) 8·nb.. of the tile at qb (B, [queries][D+8], lane offset included):
// a 32 × 32 block over D.
template <int D>
__device__ __forceinline__ void kvh_sq(float (*s)[4][4], u32 ka, u32 qb) {
    constexpr int LDB = (D + 8) * 2;
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int nb = 0; nb < 4; nb++) s[mi][nb][0] = s[mi][nb][1] = s[mi][nb][2] = s[mi][nb][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        u32 b[2][4];
        ldsm4(qb + kk * 32, b[0]);
        ldsm4(qb + 16 * LDB + kk * 32, b[1]);
#pragma unroll
        for (int mi = 0; mi < 2; mi++) {
            u32 a[4];
            ldsm4(ka + mi * 16 * LDB + kk * 32, a);
#pragma unroll
            for (int np = 0; np < 2; np++) {
                mma_bf16(s[mi][2 * np], a, b[np][0], b[np][1]);
                mma_bf16(s[mi][2 * np + 1], a, b[np][2], b[np][3]);
            }
        }
    }
}

// Stores the warp's 32 × 32 bf16 block w[j][mi] (A-fragment order: keys 16·mi + g (+8), queries
// 16·j + 2·tig (+8)) into a [keys][72] tile at row r0, column c0.
__device__ __forceinline__ void kvh_store_frag(unsigned char* base, int r0, int c0, int g, int tig, const u32 (*w)[2][4]) {
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int j = 0; j < 2; j++) {
            u32* p = reinterpret_cast<u32*>(base + (r0 + 16 * mi + g) * (KVH_LDS * 2) + (c0 + 16 * j + 2 * tig) * 2);
            p[0] = w[j][mi][0];
            p[8 * KVH_LDS / 2] = w[j][mi][1];
            p[4] = w[j][mi][2];
            p[8 * KVH_LDS / 2 + 4] = w[j][mi][3];
        }
}

template <int D>
__device__ __forceinline__ void bwd_kvhead_body(float* __restrict__ dq_acc, bf16* __restrict__ dk_out, bf16* __restrict__ dv_out,
                                            const bf16* __restrict__ q, const bf16* __restrict__ k,
                                            const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                            const float* __restrict__ lse, const float* __restrict__ dvec,
                                            const int* __restrict__ cu, int T_, int hq, int hkv, float scale, float sl2,
                                            int causal) {
    using L = KvhSmem<D>;
    constexpr int BM = KVH_BM, BN = KVH_BN, LDB = L::LDB, LDSB = L::LDSB, DH = D / 2, NDH = DH / 8;
    extern __shared__ __align__(16) unsigned char att_smem[];
    const u32 sb = smem_u32(att_smem);

    // Causal: grid (kv heads, sequences, key tiles): blocks start in linear order, so with the key
    // tile slowest every tile 0 (it walks all query tiles of the group) starts first. Non-causal
    // (equal blocks): (key tiles, kv heads, sequences), neighbouring blocks share Q/dO in L2.
    const int hk = causal ? blockIdx.x : blockIdx.y, sq = causal ? blockIdx.y : blockIdx.z;
    const int n0 = (causal ? blockIdx.z : blockIdx.x) * BN;
    const int start = cu[sq], len = cu[sq + 1] - start;
    if (n0 >= len) return;
    const int grp = hq / hkv;
    // Element offsets fit in 32 bits (the launcher checks T·hq·D < 2^31).
    const int qs = hq * D, ks = hkv * D;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane >> 2, tig = lane & 3;
    const int kw = warp >> 1, x = warp & 1;  // keys 32kw..; query half (S, dP) / head-dim half (dV, dK, dQ) x
    const int mbeg = causal ? n0 : 0;        // first query tile that sees these keys (BM = BN)
    const int nmt = CEIL_DIV(len - mbeg, BM), nsteps = grp * nmt;

    // Step it = (q head hk·grp + it / nmt, query tile mbeg + (it % nmt)·BM).
    auto step_h = [&](int it) { return hk * grp + it / nmt; };
    auto step_m = [&](int it) { return mbeg + (it % nmt) * BM; };
    auto load_q = [&](int it) {
        const int h = step_h(it), m = step_m(it);
        kvh_load_tile<D>(sb + L::Q + (it & 1) * L::TILE, q + (start + m) * qs + h * D, qs, min(BM, len - m));
    };
    // dO rows and lse, dvec of the step's 64 queries (threads 0-63: lse, 64-127: dvec).
    auto load_o = [&](int it) {
        const int h = step_h(it), m = step_m(it);
        kvh_load_tile<D>(sb + L::DO, dout + (start + m) * qs + h * D, qs, min(BM, len - m));
        const int t = kvh_opaque_i(threadIdx.x), r = m + (t & 63);
        const float* src = (t < 64 ? lse : dvec) + h * T_ + start;
        cp_async4(sb + L::L + t * 4, r < len ? src + r : src, r < len ? 4 : 0);
    };
    kvh_load_tile<D>(sb + L::K, k + (start + n0) * ks + hk * D, ks, min(BN, len - n0));
    kvh_load_tile<D>(sb + L::V, v + (start + n0) * ks + hk * D, ks, min(BN, len - n0));
    load_q(0);
    load_o(0);
    cp_commit();

    float dk[2][NDH][4], dv[2][NDH][4];
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int n = 0; n < NDH; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) dk[mi][n][e] = dv[mi][n][e] = 0.f;

    const float* sLse = reinterpret_cast<const float*>(att_smem + L::L);
    const float* sDv = sLse + BM;

    for (int it = 0; it < nsteps; it++) {
        const int h = step_h(it), m = step_m(it);
        // This lane's ldmatrix offsets: lx for A fragments ([M][K] tile) and ldmatrix.trans B
        // fragments ([K][N] tile); ly for B fragments ([N][K]) and ldmatrix.trans A fragments
        // ([K][M]); *t: the tile stride (D+8), *s: the P/dS stride (72). Recomputed per step
        // (opaque lane) rather than held in registers across it.
        const int ln = kvh_opaque_i(lane);
        const u32 lxt = (ln & 15) * LDB + (ln >> 4) * 16, lyt = ((ln & 7) + (ln >> 4) * 8) * LDB + ((ln >> 3) & 1) * 16;
        const u32 lxs = (ln & 15) * LDSB + (ln >> 4) * 16, lys = ((ln & 7) + (ln >> 4) * 8) * LDSB + ((ln >> 3) & 1) * 16;
        cp_wait_all();
        __syncthreads();  // B1: Q, dO, lse, dvec of step it visible; every warp is done with step it-1
        if (it + 1 < nsteps) {
            load_q(it + 1);  // the other Q stage (last read in step it-1, before B1)
            cp_commit();
        }
        const u32 sQ = sb + L::Q + (it & 1) * L::TILE;
        const int q0 = m + 32 * x, k0 = n0 + 32 * kw;  // the warp's first query and key (S, dP)
        const bool edge = q0 + 32 > len || k0 + 32 > len || (causal && k0 + 31 > q0);

        // Sᵀ (32 keys × 32 queries), P = exp2(S·sl2 − lse·log2e), zero where masked: bf16 A fragments.
        u32 pp[2][2][4];  // [k-step j (queries 16j..)][key fragment mi][4]
        {
            float s[2][4][4];
            kvh_sq<D>(s, sb + L::K + 32 * kw * LDB + lxt, sQ + 32 * x * LDB + lyt);
            if (edge) {  // warp-uniform: -inf where masked (exp2 then gives 0)
#pragma unroll
                for (int nb = 0; nb < 4; nb++)
#pragma unroll
                    for (int mi = 0; mi < 2; mi++)
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            const int qpos = q0 + 8 * nb + 2 * tig + (e & 1), kpos = k0 + 16 * mi + g + 8 * (e >> 1);
                            if (qpos >= len || kpos >= len || (causal && kpos > qpos)) s[mi][nb][e] = NEG_INF;
                        }
            }
#pragma unroll
            for (int nb = 0; nb < 4; nb++) {
                const float2 lq = *reinterpret_cast<const float2*>(sLse + 32 * x + 8 * nb + 2 * tig);
                const float l0 = lq.x * ATT_LOG2E, l1 = lq.y * ATT_LOG2E;
#pragma unroll
                for (int mi = 0; mi < 2; mi++)
#pragma unroll
                    for (int e = 0; e < 4; e++) s[mi][nb][e] = kvh_exp2(s[mi][nb][e] * sl2 - ((e & 1) ? l1 : l0));
            }
#pragma unroll
            for (int mi = 0; mi < 2; mi++)
#pragma unroll
                for (int j = 0; j < 2; j++) c_to_a(pp[j][mi], s[mi][2 * j], s[mi][2 * j + 1]);
        }
        kvh_store_frag(att_smem + L::P, 32 * kw, 32 * x, g, tig, pp);

        // dPᵀ = V dOᵀ; dSᵀ = scale · Pᵀ ∘ (dPᵀ − D) with P as rounded to bf16 (as the q-head kernel); the softmax
        // scale is folded into dS here, so dK and dQ need no multiply.
        u32 ps[2][2][4];  // dS, same order
        {
            float dp[2][4][4];
            kvh_sq<D>(dp, sb + L::V + 32 * kw * LDB + lxt, sb + L::DO + 32 * x * LDB + lyt);
#pragma unroll
            for (int nb = 0; nb < 4; nb++) {
                const float2 dd = *reinterpret_cast<const float2*>(sDv + 32 * x + 8 * nb + 2 * tig);
                const float d0 = dd.x * scale, d1 = dd.y * scale;
#pragma unroll
                for (int mi = 0; mi < 2; mi++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const u32 w = pp[nb >> 1][mi][(nb & 1) * 2 + (e >> 1)];
                        const float p = (e & 1) ? bf_hi(w) : bf_lo(w);
                        dp[mi][nb][e] = p * (dp[mi][nb][e] * scale - ((e & 1) ? d1 : d0));
                    }
            }
#pragma unroll
            for (int mi = 0; mi < 2; mi++)
#pragma unroll
                for (int j = 0; j < 2; j++) c_to_a(ps[j][mi], dp[mi][2 * j], dp[mi][2 * j + 1]);
        }
        kvh_store_frag(att_smem + L::DS, 32 * kw, 32 * x, g, tig, ps);
        bar_pair(kw);  // the pair's P and dS (its 32 keys × all 64 queries) visible

        // dV += Pᵀ dO and dK += dSᵀ Q over the 64 queries for keys 32kw.. × columns DH·x..: the
        // warp's own query half (k-steps 2x, 2x+1) from registers, the partner's from shared memory.
        {
            const u32 colb = x * DH * 2 + lxt;  // column DH·x of a tile row (bytes) plus this lane's offset
#pragma unroll
            for (int j = 0; j < 2; j++) {
                const int kq = 2 * x + j;  // own k-step
                kvh_kstep<NDH>(dv, pp[j], sb + L::DO + 16 * kq * LDB + colb);
                kvh_kstep<NDH>(dk, ps[j], sQ + 16 * kq * LDB + colb);
            }
#pragma unroll
            for (int j = 0; j < 2; j++) {
                const int kq = 2 * (x ^ 1) + j;  // the partner's k-step
                const u32 fo = 32 * kw * LDSB + 16 * kq * 2 + lxs;  // keys 32kw.., queries 16kq..
                u32 a[2][4];
                ldsm4(sb + L::P + fo, a[0]);
                ldsm4(sb + L::P + fo + 16 * LDSB, a[1]);
                kvh_kstep<NDH>(dv, a, sb + L::DO + 16 * kq * LDB + colb);
                ldsm4(sb + L::DS + fo, a[0]);
                ldsm4(sb + L::DS + fo + 16 * LDSB, a[1]);
                kvh_kstep<NDH>(dk, a, sQ + 16 * kq * LDB + colb);
            }
        }
        __syncthreads();  // B2: all of dS visible (dQ); every warp is done with dO, lse, dvec of step it
        if (it + 1 < nsteps) {
            load_o(it + 1);
            cp_commit();
        }

        // dQ[queries 32kw.., columns DH·x..] += dS (scaled; 32 queries × 64 keys) · K (64 keys × DH).
        {
            u32 af[4][2][4];  // [key k-step][query fragment mi]: ldmatrix.trans of dSᵀ [keys][queries]
#pragma unroll
            for (int kk = 0; kk < 4; kk++)
#pragma unroll
                for (int mi = 0; mi < 2; mi++) ldsm4t(sb + L::DS + 16 * kk * LDSB + (32 * kw + 16 * mi) * 2 + lys, af[kk][mi]);
            const int qa = m + 32 * kw + g;  // this thread's rows: qa + 16mi (+8)
            float* dqrow = dq_acc + (start + qa) * qs + h * D + x * DH + 2 * tig;
#pragma unroll
            for (int n = 0; n < NDH; n += 2) {
                constexpr int W = 2;
                float acc[2][W][4];
#pragma unroll
                for (int mi = 0; mi < 2; mi++)
#pragma unroll
                    for (int c = 0; c < W; c++) acc[mi][c][0] = acc[mi][c][1] = acc[mi][c][2] = acc[mi][c][3] = 0.f;
#pragma unroll
                for (int kk = 0; kk < 4; kk++) {
                    u32 b[4];
                    ldsm4t(sb + L::K + 16 * kk * LDB + (x * DH + 8 * n) * 2 + lxt, b);
#pragma unroll
                    for (int mi = 0; mi < 2; mi++) {
                        mma_bf16(acc[mi][0], af[kk][mi], b[0], b[1]);
                        if (n + 1 < NDH) mma_bf16(acc[mi][1], af[kk][mi], b[2], b[3]);
                    }
                }
#pragma unroll
                for (int mi = 0; mi < 2; mi++)
#pragma unroll
                    for (int c = 0; c < W; c++) {
                        if (n + c >= NDH) continue;
#pragma unroll
                        for (int hh = 0; hh < 2; hh++)
                            if (qa + 16 * mi + 8 * hh < len)
                                red_add2(dqrow + (16 * mi + 8 * hh) * qs + 8 * (n + c), acc[mi][c][2 * hh], acc[mi][c][2 * hh + 1]);
                    }
            }
        }
    }
    cp_wait_all();

    // dK (from the scaled dS) and dV, summed over the group: bf16 straight into [T, hkv, D].
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int hh = 0; hh < 2; hh++) {
            const int kp = n0 + 32 * kw + 16 * mi + g + 8 * hh;
            if (kp >= len) continue;
            const int o = (start + kp) * ks + hk * D + x * DH + 2 * tig;
#pragma unroll
            for (int n = 0; n < NDH; n++) {
                *reinterpret_cast<u32*>(dk_out + o + 8 * n) = pack_bf2(dk[mi][n][2 * hh], dk[mi][n][2 * hh + 1]);
                *reinterpret_cast<u32*>(dv_out + o + 8 * n) = pack_bf2(dv[mi][n][2 * hh], dv[mi][n][2 * hh + 1]);
            }
        }
}


// Two blocks per SM at d128/d80 (255 registers × 128 threads; 104 / 74 KB of shared memory),
// three at d64 (≤ 168 registers; 64 KB).
#define ATT_BWD_KVHEAD_ENTRY(D, MINB)                                                                               \
    extern "C" __global__ void __launch_bounds__(KVH_NT, MINB) attention_bwd_kvhead_bf16_d##D(                        \
        float* dq_acc, bf16* dk, bf16* dv, const bf16* q, const bf16* k, const bf16* v, const bf16* dout,        \
        const float* lse, const float* dvec, const int* cu, int T_, int hq, int hkv, float scale, float sl2,     \
        int causal) {                                                                                            \
        bwd_kvhead_body<D>(dq_acc, dk, dv, q, k, v, dout, lse, dvec, cu, T_, hq, hkv, scale, sl2, causal);               \
    }
ATT_BWD_KVHEAD_ENTRY(64, 3)
ATT_BWD_KVHEAD_ENTRY(80, 2)
ATT_BWD_KVHEAD_ENTRY(128, 2)
