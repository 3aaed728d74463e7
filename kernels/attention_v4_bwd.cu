// Fourth-generation attention backward (src/ops/attention/v4_bwd.rs, `Variant::V4`): same inputs,
// outputs and layouts as V1/V2 (q/dout/dq [T, hq, D], k/v/dk/dv [T, hkv, D], lse/dvec [hq, T]),
// bf16 in/out, f32 accumulate, D in {64, 80, 128}, causal or not, varlen, any GQA ratio. Design
// and counts: PERF-attention.md, "Round 5: V4 backward".
//
// attention_bwd_rowdot_bf16 (attention_bwd_rows.cuh): dvec[h, t] = dout·out of row (t, h) (one thread per row, 16-byte loads).
//
// attention_bwd_v4_bf16_d{64,80,128}: one block = 64 keys of one (sequence, kv head), 4 warps,
//   walking the query tiles (64 rows) of every q head of the GQA group (V2's walk and grid: dK/dV
//   summed over the group in registers, stored once as bf16; dQ by f32 atomics). What changes is
//   how the five products of a step are split over the warps (FA2's 2 × 2 warp tiles, so every
//   ldmatrix fragment feeds 4 mma instead of 2 where V2 gave each warp 16 keys × everything):
//   warp w = (kw = w / 2, x = w % 2):
//     Sᵀ = K Qᵀ and dPᵀ = V dOᵀ for keys 32kw..+31 × queries 32x..+31 (two m16 key fragments
//       share every Q/dO fragment, two n-pairs share every K/V fragment);
//     P and dS (bf16) go to shared memory ([keys][queries]); after a 64-thread barrier of the
//       pair (warps 2kw, 2kw+1: the same keys, the other query half)
//     dV += Pᵀ dO and dK += dSᵀ Q for keys 32kw..+31 × head-dim half x over all 64 queries (the
//       warp's own query half from registers, the partner's from shared memory);
//     after the block barrier, dQ = dS K for queries 32kw..+31 × head-dim half x over the 64
//       keys, added into dq_acc by red.global.add.v2.f32.
//   128 ldmatrix.x4 per 320 mma per warp at d128 (V2: 180). Two block barriers per step as V2 (+ the
//   pair's): Q is double-buffered (step i+1 loads during the whole of step i), dO/lse/dvec load
//   after the second barrier (their last reader is before it), covered by dQ and the next S.
//   Grid: causal (kv heads, sequences, key tiles), key tile slowest = longest blocks first;
//   non-causal (key tiles, kv heads, sequences) for L2 locality (as V2).
//
// attention_bwd_dq_round_bf16 (attention_bwd_rows.cuh): dq = bf16(dq_acc), 8 elements per thread.
#include "attention_mma.cuh"
#include "attention_bwd_rows.cuh"

#define V4_BN 64    // keys per block
#define V4_BM 64    // query rows per step
#define V4_NT 128   // 4 warps
#define V4_LDS 72   // row stride (elements) of the P / dS tiles [64 keys][64 queries + 8]

// Vector atomic add of two adjacent floats (8-byte aligned).
__device__ __forceinline__ void red_add2(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}

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
__device__ __forceinline__ float v4_exp2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

// Hides an integer's value from the optimizer, so that indices derived from it are recomputed
// where used instead of being hoisted into registers the accumulators need.
__device__ __forceinline__ int v4_opaque_i(int x) {
    asm volatile("" : "+r"(x));
    return x;
}

// Shared-memory layout (byte offsets): K, V [64][D+8]; two stages of Q [64][D+8]; dO [64][D+8];
// P, dS [64 keys][72] bf16; lse then dvec [64] f32 of the current step.
template <int D>
struct V4Smem {
    static constexpr int LDB = (D + 8) * 2;           // tile row stride, bytes
    static constexpr int LDSB = V4_LDS * 2;           // P / dS row stride, bytes
    static constexpr u32 TILE = V4_BN * LDB;
    static constexpr u32 K = 0, V = TILE, Q = 2 * TILE, DO = 4 * TILE;
    static constexpr u32 P = 5 * TILE, DS = P + V4_BN * LDSB, L = DS + V4_BN * LDSB;
    static constexpr u32 BYTES = L + 2 * V4_BM * 4;
};

// Async load of 64 rows of D bf16 (global row stride gstride elements) into a [64][D+8] shared
// tile at byte address s by the block's 128 threads; rows >= nvalid are zero-filled (g must stay
// a valid address). The caller commits.
template <int D>
__device__ __forceinline__ void v4_load_tile(u32 s, const bf16* g, int gstride, int nvalid) {
    constexpr int CH = D / 8, ITER = V4_BM * CH / V4_NT, LDB = (D + 8) * 2;
    static_assert(V4_BM * CH % V4_NT == 0, "whole chunks per thread");
    const int tid = v4_opaque_i(threadIdx.x);
#pragma unroll
    for (int i = 0; i < ITER; i++) {
        const int c = tid + i * V4_NT;
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
__device__ __forceinline__ void v4_kstep(float (*acc)[ND2][4], const u32 (*a)[4], u32 bt) {
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
__device__ __forceinline__ void v4_sq(float (*s)[4][4], u32 ka, u32 qb) {
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
__device__ __forceinline__ void v4_store_frag(unsigned char* base, int r0, int c0, int g, int tig, const u32 (*w)[2][4]) {
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int j = 0; j < 2; j++) {
            u32* p = reinterpret_cast<u32*>(base + (r0 + 16 * mi + g) * (V4_LDS * 2) + (c0 + 16 * j + 2 * tig) * 2);
            p[0] = w[j][mi][0];
            p[8 * V4_LDS / 2] = w[j][mi][1];
            p[4] = w[j][mi][2];
            p[8 * V4_LDS / 2 + 4] = w[j][mi][3];
        }
}

template <int D>
__device__ __forceinline__ void bwd_v4_body(float* __restrict__ dq_acc, bf16* __restrict__ dk_out, bf16* __restrict__ dv_out,
                                            const bf16* __restrict__ q, const bf16* __restrict__ k,
                                            const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                            const float* __restrict__ lse, const float* __restrict__ dvec,
                                            const int* __restrict__ cu, int T_, int hq, int hkv, float scale, float sl2,
                                            int causal) {
    using L = V4Smem<D>;
    constexpr int BM = V4_BM, BN = V4_BN, LDB = L::LDB, LDSB = L::LDSB, DH = D / 2, NDH = DH / 8;
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
        v4_load_tile<D>(sb + L::Q + (it & 1) * L::TILE, q + (start + m) * qs + h * D, qs, min(BM, len - m));
    };
    // dO rows and lse, dvec of the step's 64 queries (threads 0-63: lse, 64-127: dvec).
    auto load_o = [&](int it) {
        const int h = step_h(it), m = step_m(it);
        v4_load_tile<D>(sb + L::DO, dout + (start + m) * qs + h * D, qs, min(BM, len - m));
        const int t = v4_opaque_i(threadIdx.x), r = m + (t & 63);
        const float* src = (t < 64 ? lse : dvec) + h * T_ + start;
        cp_async4(sb + L::L + t * 4, r < len ? src + r : src, r < len ? 4 : 0);
    };
    v4_load_tile<D>(sb + L::K, k + (start + n0) * ks + hk * D, ks, min(BN, len - n0));
    v4_load_tile<D>(sb + L::V, v + (start + n0) * ks + hk * D, ks, min(BN, len - n0));
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
        const int ln = v4_opaque_i(lane);
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
            v4_sq<D>(s, sb + L::K + 32 * kw * LDB + lxt, sQ + 32 * x * LDB + lyt);
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
                    for (int e = 0; e < 4; e++) s[mi][nb][e] = v4_exp2(s[mi][nb][e] * sl2 - ((e & 1) ? l1 : l0));
            }
#pragma unroll
            for (int mi = 0; mi < 2; mi++)
#pragma unroll
                for (int j = 0; j < 2; j++) c_to_a(pp[j][mi], s[mi][2 * j], s[mi][2 * j + 1]);
        }
        v4_store_frag(att_smem + L::P, 32 * kw, 32 * x, g, tig, pp);

        // dPᵀ = V dOᵀ; dSᵀ = scale · Pᵀ ∘ (dPᵀ − D) with P as rounded to bf16 (as V1/V2); the softmax
        // scale is folded into dS here, so dK and dQ need no multiply.
        u32 ps[2][2][4];  // dS, same order
        {
            float dp[2][4][4];
            v4_sq<D>(dp, sb + L::V + 32 * kw * LDB + lxt, sb + L::DO + 32 * x * LDB + lyt);
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
        v4_store_frag(att_smem + L::DS, 32 * kw, 32 * x, g, tig, ps);
        bar_pair(kw);  // the pair's P and dS (its 32 keys × all 64 queries) visible

        // dV += Pᵀ dO and dK += dSᵀ Q over the 64 queries for keys 32kw.. × columns DH·x..: the
        // warp's own query half (k-steps 2x, 2x+1) from registers, the partner's from shared memory.
        {
            const u32 colb = x * DH * 2 + lxt;  // column DH·x of a tile row (bytes) plus this lane's offset
#pragma unroll
            for (int j = 0; j < 2; j++) {
                const int kq = 2 * x + j;  // own k-step
                v4_kstep<NDH>(dv, pp[j], sb + L::DO + 16 * kq * LDB + colb);
                v4_kstep<NDH>(dk, ps[j], sQ + 16 * kq * LDB + colb);
            }
#pragma unroll
            for (int j = 0; j < 2; j++) {
                const int kq = 2 * (x ^ 1) + j;  // the partner's k-step
                const u32 fo = 32 * kw * LDSB + 16 * kq * 2 + lxs;  // keys 32kw.., queries 16kq..
                u32 a[2][4];
                ldsm4(sb + L::P + fo, a[0]);
                ldsm4(sb + L::P + fo + 16 * LDSB, a[1]);
                v4_kstep<NDH>(dv, a, sb + L::DO + 16 * kq * LDB + colb);
                ldsm4(sb + L::DS + fo, a[0]);
                ldsm4(sb + L::DS + fo + 16 * LDSB, a[1]);
                v4_kstep<NDH>(dk, a, sQ + 16 * kq * LDB + colb);
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
#define ATT_V4_BWD_ENTRY(D, MINB)                                                                               \
    extern "C" __global__ void __launch_bounds__(V4_NT, MINB) attention_bwd_v4_bf16_d##D(                        \
        float* dq_acc, bf16* dk, bf16* dv, const bf16* q, const bf16* k, const bf16* v, const bf16* dout,        \
        const float* lse, const float* dvec, const int* cu, int T_, int hq, int hkv, float scale, float sl2,     \
        int causal) {                                                                                            \
        bwd_v4_body<D>(dq_acc, dk, dv, q, k, v, dout, lse, dvec, cu, T_, hq, hkv, scale, sl2, causal);               \
    }
ATT_V4_BWD_ENTRY(64, 3)
ATT_V4_BWD_ENTRY(80, 2)
ATT_V4_BWD_ENTRY(128, 2)
