// Fused attention on tensor cores (bf16 in/out, f32 accumulate), FlashAttention-2 style, over
// variable-length packed sequences (cu = cumulative offsets), causal or not, any GQA ratio,
// head dims 64, 80, 128. Layouts: q/out/dout/dq [T, hq, D], k/v [T, hkv, D], lse/dvec [hq, T].
//
// Forward: one block = 64 query rows of one (sequence, head), 4 warps of 16 rows; K/V tiles of
// 64 keys stream through shared memory (V[j] loads while S = QKᵀ runs, K[j+1] while O += PV
// runs; V[0] with Q and K[0]), online softmax in registers, lse saved (natural log).
// Backward: one block = 64 keys of one (sequence, q head), 4 warps of 16 keys; loops over the
// query tiles that see them, recomputes P from lse, accumulates dK, dV in registers and adds
// dQ = dS·K into an f32 buffer with atomics. With GQA each q head writes its own f32 dK/dV
// partial and attention_bwd_finish sums the group; it also rounds dQ to bf16.
#include "attention_mma.cuh"

// Vector atomic add of two adjacent floats (8-byte aligned).
__device__ __forceinline__ void red_add2(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}

template <int D>
__device__ __forceinline__ void fwd_body(bf16* __restrict__ out, float* __restrict__ lse, const bf16* __restrict__ q,
                                         const bf16* __restrict__ k, const bf16* __restrict__ v,
                                         const int* __restrict__ cu, int T_, int hq, int hkv, float sl2, int causal) {
    constexpr int BM = ATT_TILE, BN = ATT_TILE, LD = D + 8, KS = D / 16, ND = D / 8, NB = BN / 8;
    extern __shared__ __align__(16) unsigned char att_smem[];
    bf16* sQ = reinterpret_cast<bf16*>(att_smem);  // [BM][LD]
    bf16* sK = sQ + BM * LD;                        // [BN][LD]
    bf16* sV = sK + BN * LD;                        // [BN][LD]

    const int sq = blockIdx.z, h = blockIdx.y;
    const int start = cu[sq], len = cu[sq + 1] - start;
    const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;  // last (longest, when causal) tiles start first
    if (m0 >= len) return;
    const int hk = h / (hq / hkv);
    const long qs = (long)hq * D, ks = (long)hkv * D;  // token strides
    const bf16* kg = k + (long)start * ks + hk * D;
    const bf16* vg = v + (long)start * ks + hk * D;
    const int n_end = causal ? min(len, m0 + BM) : len;  // keys any row of the tile sees
    const int ntiles = CEIL_DIV(n_end, BN);
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane >> 2, tig = lane & 3;

    load_rows<D, BM>(sQ, q + (long)(start + m0) * qs + h * D, qs, min(BM, len - m0));
    load_rows<D, BN>(sK, kg, ks, min(BN, len));
    cp_commit();
    load_rows<D, BN>(sV, vg, ks, min(BN, len));  // V[0] too, so short sequences overlap all three loads
    cp_commit();

    u32 qf[KS][4];
    float o[ND][4];
#pragma unroll
    for (int dn = 0; dn < ND; dn++) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.f;
    float mrow[2] = {NEG_INF, NEG_INF}, lrow[2] = {0.f, 0.f};
    const int r_lo = m0 + warp * 16 + g;  // this thread's rows (positions in the sequence): r_lo, r_lo + 8

    for (int j = 0; j < ntiles; j++) {
        const int n0 = j * BN;
        if (j == 0) cp_wait_group<1>();  // Q and K[0] landed; V[0] may still be in flight
        else cp_wait_all();
        __syncthreads();  // K[j] (and Q) visible; every warp is done with V[j-1]
        if (j == 0) {
#pragma unroll
            for (int kk = 0; kk < KS; kk++) ldsm4(a_addr(sQ, LD, warp * 16, kk * 16, lane), qf[kk]);
        } else {
            load_rows<D, BN>(sV, vg + n0 * ks, ks, min(BN, len - n0));
            cp_commit();
        }

        float s[NB][4];
        qk_tile<D, NB>(s, qf, sK, lane);
        if (n0 + BN > len || (causal && n0 + BN - 1 > m0 + warp * 16)) {
#pragma unroll
            for (int nb = 0; nb < NB; nb++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int col = n0 + nb * 8 + 2 * tig + (e & 1);
                    int row = r_lo + (e >> 1) * 8;
                    if (col >= len || (causal && col > row)) s[nb][e] = NEG_INF;
                }
        }
        softmax_step<NB, ND>(s, o, mrow, lrow, sl2);

        cp_wait_all();
        __syncthreads();  // V[j] visible; every warp is done with K[j]
        if (j + 1 < ntiles) {
            load_rows<D, BN>(sK, kg + (n0 + BN) * ks, ks, min(BN, len - n0 - BN));
            cp_commit();
        }
        pv_tile<D, NB>(o, s, sV, lane);
    }

#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        float l = quad_sum(lrow[hh]);
        int r = r_lo + hh * 8;
        if (r < len) {
            float inv = 1.f / l;
            bf16* orow = out + (long)(start + r) * qs + h * D + 2 * tig;
#pragma unroll
            for (int dn = 0; dn < ND; dn++)
                *reinterpret_cast<u32*>(orow + dn * 8) = pack_bf2(o[dn][2 * hh] * inv, o[dn][2 * hh + 1] * inv);
            if (tig == 0) lse[(long)h * T_ + start + r] = mrow[hh] * ATT_LN2 + logf(l);
        }
    }
}

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

#define ATT_TC_ENTRY(D)                                                                                              \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_fwd_bf16_d##D(                               \
        bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, const int* cu, int T_, int hq, int hkv,  \
        float sl2, int causal) {                                                                                     \
        fwd_body<D>(out, lse, q, k, v, cu, T_, hq, hkv, sl2, causal);                                                \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_bwd_bf16_d##D(                               \
        float* dq_acc, void* dk_out, void* dv_out, const bf16* q, const bf16* k, const bf16* v, const bf16* dout,    \
        const float* lse, const float* dvec, const int* cu, int T_, int hq, int hkv, float scale, float sl2,         \
        int causal) {                                                                                                \
        bwd_body<D>(dq_acc, dk_out, dv_out, q, k, v, dout, lse, dvec, cu, T_, hq, hkv, scale, sl2, causal);          \
    }
ATT_TC_ENTRY(64)
ATT_TC_ENTRY(80)
ATT_TC_ENTRY(128)

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
