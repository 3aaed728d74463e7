// Third-generation attention backward (src/ops/attention/v3_bwd.rs, `Variant::V3`): same inputs,
// outputs and layouts as attention.cu's backward (q/dout/dq [T, hq, D], k/v/dk/dv [T, hkv, D],
// lse/dvec [hq, T]), bf16 in/out, f32 accumulate, D in {64, 80, 128}, causal or not, varlen, any
// GQA ratio. Design and counts: PERF-attention.md, "Round 4: V3 backward".
//
// attention_bwd_rowdot_bf16 (attention_bwd_rows.cuh): dvec[h, t] = dout·out of row (t, h) (one thread per row, 16-byte loads).
//
// attention_bwd_v3_bf16_d{64,80,128}: one block = 128 keys of one (sequence, kv head), 8 warps,
//   walking the query tiles (64 rows) of every q head of the group: dK and dV are summed over the
//   group in registers and stored once as bf16. The 8 warps form 4 pairs; pair p owns keys
//   32p..32p+31 of the block. In each step (one 64-row query tile of one q head):
//     warp p     (role P):  Sᵀ = K Qᵀ (32 keys × 64 queries), P = exp2(S·sl2 − lse·log2e), hands
//                           P (bf16) to its partner through shared memory, dV += Pᵀ dO;
//     warp p + 4 (role dS): dPᵀ = V dOᵀ, dSᵀ = Pᵀ ∘ (dPᵀ − D), dK += dSᵀ Q, and dSᵀ into shared
//                           memory for dQ;
//   and the step's dQ = dS K (64 queries × D over the 128 keys, split over all 8 warps) is added
//   into the f32 buffer dq_acc with red.global.add.v2.f32 during the NEXT step: role-dS warps
//   do their part first (while role-P warps compute S and the exponentials), role-P warps last
//   (while role-dS warps do the dS arithmetic), so each sub-partition's tensor pipe has work
//   while its other warp is on the MUFU/ALU. 32 × 64 warp tiles with the P/dS operand of the
//   dV/dK products in registers: 112 ldmatrix.x4 per 320 mma per warp at d128 (V1: 180).
//   Q/dO/lse/dvec go through a two-stage cp.async ring (step i+2 loads while steps i and i+1
//   run) and dSᵀ is double-buffered, so a step needs one block barrier (plus the pair's named
//   barrier for the P hand-off). Query tiles run last to first, head fastest: the blocks of one
//   (sequence, kv head) that run together add into the same dQ tile at about the same time (L2
//   hits for the atomics and the Q/dO reads).
//   Grid: one dimension, key block slowest (longest blocks first when causal).
//
// attention_bwd_dq_round_bf16 (attention_bwd_rows.cuh): dq = bf16(dq_acc), 8 elements per thread.
#include "attention_mma.cuh"
#include "attention_bwd_rows.cuh"

#define V3_BN 128      // keys per block
#define V3_BM 64       // query rows per step
#define V3_THREADS 256 // 8 warps = 4 pairs

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

// Named barriers (ids 1..15) over n threads: the producer arrives, the consumer waits.
__device__ __forceinline__ void bar_arrive(int id, int n) { asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory"); }
__device__ __forceinline__ void bar_sync(int id, int n) { asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory"); }

// Async load of ROWS rows of D bf16 into a [ROWS][D+8] shared tile by V3_THREADS threads; rows
// >= nvalid are zero-filled. g must be a valid address even when nvalid = 0. The caller commits.
template <int D, int ROWS>
__device__ __forceinline__ void v3_load_rows(bf16* sm, const bf16* g, long gstride, int nvalid) {
    constexpr int CH = D / 8;
    for (int c = threadIdx.x; c < ROWS * CH; c += V3_THREADS) {
        int r = c / CH, e = (c - r * CH) * 8;
        bool ok = r < nvalid;
        const bf16* src = ok ? g + r * gstride + e : g;
        cp_async16(smem_u32(sm + r * (D + 8) + e), src, ok ? 16 : 0);
    }
}

// Shared memory of the main kernel in bytes (the launcher computes the same).
template <int D>
struct V3Smem {
    static constexpr int LD = D + 8, LDS = V3_BM + 8;
    static constexpr int KV = 2 * V3_BN * LD * 2;            // sK, sV
    static constexpr int QO = 2 * 2 * V3_BM * LD * 2;        // two stages of sQ, sO
    static constexpr int SS = 2 * V3_BN * LDS * 2;           // two buffers of dSᵀ
    static constexpr int SP = 4 * 2 * 4 * 32 * 16;           // P hand-off: [pair][mb][kk][lane] x 16 B
    static constexpr int LDV = 2 * 2 * V3_BM * 4;            // two stages of lse, dvec
    static constexpr int BYTES = KV + QO + SS + SP + LDV;
};

template <int D>
__device__ __forceinline__ void bwd_v3_body(float* __restrict__ dq_acc, bf16* __restrict__ dk_out, bf16* __restrict__ dv_out,
                                            const bf16* __restrict__ q, const bf16* __restrict__ k,
                                            const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                            const float* __restrict__ lse, const float* __restrict__ dvec,
                                            const int* __restrict__ cu, int nseq, int T_, int hq, int hkv, float scale,
                                            float sl2, int causal) {
    constexpr int BN = V3_BN, BM = V3_BM, LD = D + 8, LDS = BM + 8, KS = D / 16, ND = D / 8, NQ = BM / 8;
    // dQ split over the 8 warps: QG groups of MB·16 query rows × DG groups of NPW 16-column pairs.
    constexpr int NPAIR = D / 16;
    constexpr int MB = D == 128 ? 2 : 1;
    constexpr int QG = BM / (16 * MB);
    constexpr int DG = 8 / QG;
    constexpr int NPW = (NPAIR + DG - 1) / DG;
    extern __shared__ __align__(16) unsigned char att_smem[];
    bf16* sK = reinterpret_cast<bf16*>(att_smem);  // [BN][LD]
    bf16* sV = sK + BN * LD;                        // [BN][LD]
    bf16* sQ = sV + BN * LD;                        // stage s: sQ + s * 2 * BM * LD = Q [BM][LD], then dO [BM][LD]
    bf16* sS = sQ + 4 * BM * LD;                    // buffer b: sS + b * BN * LDS = dSᵀ [BN keys][LDS]
    u32* sP = reinterpret_cast<u32*>(sS + 2 * BN * LDS);  // [4 pairs][2 mb][4 kk][32 lanes][4]
    float* sL = reinterpret_cast<float*>(sP + 4 * 2 * 4 * 32 * 4);  // stage s: sL + s * 2 * BM = lse [BM], then dvec [BM]

    // Block -> (key block, sequence, kv head), key block slowest.
    const int per_kb = nseq * hkv;
    const int kb = blockIdx.x / per_kb, rest = blockIdx.x - kb * per_kb;
    const int sq = rest / hkv, hk = rest - sq * hkv;
    const int start = cu[sq], len = cu[sq + 1] - start;
    const int n0 = kb * BN;
    if (n0 >= len) return;
    const int grp = hq / hkv;
    const long qs = (long)hq * D, ks = (long)hkv * D;  // token strides
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane >> 2, tig = lane & 3;
    const int role = warp >> 2, pair = warp & 3;  // role 0: S, P, dV; role 1: dP, dS, dK
    const int kr0 = pair * 32;                    // the pair's first key row in the block
    const int key0 = n0 + kr0;                    // ... as a position in the sequence

    v3_load_rows<D, BN>(sK, k + (long)(start + n0) * ks + hk * D, ks, min(BN, len - n0));
    v3_load_rows<D, BN>(sV, v + (long)(start + n0) * ks + hk * D, ks, min(BN, len - n0));
    // Steps: query tiles from last to first (mbeg = first tile that sees these keys), q heads of
    // the group fastest. Step it = (tile mlast − (it / grp)·BM, head hk·grp + it % grp).
    const int mbeg = causal ? n0 : 0;  // n0 is a multiple of BM
    const int nmt = CEIL_DIV(len - mbeg, BM);
    const int mlast = mbeg + (nmt - 1) * BM;
    const int nsteps = nmt * grp;
    auto load_step = [&](int it) {
        const int st = it & 1;
        const int h = hk * grp + it % grp, m = mlast - (it / grp) * BM;
        const int nv = min(BM, len - m);
        bf16* sq_ = sQ + st * 2 * BM * LD;
        v3_load_rows<D, BM>(sq_, q + (long)(start + m) * qs + h * D, qs, nv);
        v3_load_rows<D, BM>(sq_ + BM * LD, dout + (long)(start + m) * qs + h * D, qs, nv);
        if (threadIdx.x < 2 * BM) {  // lse (threads 0..63) and dvec (64..127) of the tile's rows
            const int r = threadIdx.x & (BM - 1);
            const bool ok = r < nv;
            const float* src = (threadIdx.x < BM ? lse : dvec) + (long)h * T_ + start + m + (ok ? r : 0);
            cp_async4(smem_u32(sL + st * 2 * BM + threadIdx.x), src, ok ? 4 : 0);
        }
    };
    load_step(0);
    cp_commit();  // group: K, V, step 0
    if (nsteps > 1) load_step(1);
    cp_commit();  // group: step 1 (possibly empty)

    float acc[2][ND][4];  // dV (role 0) or dK (role 1, unscaled) of the pair's keys kr0 + 16·mb + g (+8)
#pragma unroll
    for (int mb = 0; mb < 2; mb++)
#pragma unroll
        for (int dn = 0; dn < ND; dn++) acc[mb][dn][0] = acc[mb][dn][1] = acc[mb][dn][2] = acc[mb][dn][3] = 0.f;
    const int qg = warp % QG, dg = warp / QG;  // the warp's part of dQ
    const int qr0 = qg * 16 * MB;              // its first query row in the tile

    // dQ of step `it` (its 64 queries × D, this warp's part) += scale · dS · K over the block's
    // keys, by atomics. Runs between barrier X_it (dSᵀ of step it complete in buffer it & 1) and
    // X_{it+1} (after which step it+2's phase A overwrites that buffer). Only the first kq keys
    // can have a nonzero dS (ragged end; causal: keys past the tile's last query); their rows
    // were all written by active pairs.
    auto dq_step = [&](int it) {
        const int h = hk * grp + it % grp, m = mlast - (it / grp) * BM;
        const bf16* sSs = sS + (it & 1) * BN * LDS;
        const int kn = min(BN, len - n0);
        const int kq = causal ? min(kn, m + BM - n0) : kn;
        const int kst = CEIL_DIV(kq, 16);
        float dacc[MB][2 * NPW][4];
#pragma unroll
        for (int mb = 0; mb < MB; mb++)
#pragma unroll
            for (int j = 0; j < 2 * NPW; j++) dacc[mb][j][0] = dacc[mb][j][1] = dacc[mb][j][2] = dacc[mb][j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            if (kk < kst) {
                u32 af[MB][4];
#pragma unroll
                for (int mb = 0; mb < MB; mb++) ldsm4t(at_addr(sSs, LDS, kk * 16, qr0 + 16 * mb, lane), af[mb]);
#pragma unroll
                for (int pp = 0; pp < NPW; pp++) {
                    const int p = dg * NPW + pp;
                    if (p < NPAIR) {
                        u32 b[4];
                        ldsm4t(bt_addr(sK, LD, kk * 16, p * 16, lane), b);
#pragma unroll
                        for (int mb = 0; mb < MB; mb++) {
                            mma_bf16(dacc[mb][2 * pp], af[mb], b[0], b[1]);
                            mma_bf16(dacc[mb][2 * pp + 1], af[mb], b[2], b[3]);
                        }
                    }
                }
            }
        }
#pragma unroll
        for (int mb = 0; mb < MB; mb++)
#pragma unroll
            for (int hh = 0; hh < 2; hh++) {
                const int qpos = m + qr0 + 16 * mb + g + 8 * hh;
                if (qpos < len) {
                    float* row = dq_acc + (long)(start + qpos) * qs + h * D + 2 * tig;
#pragma unroll
                    for (int pp = 0; pp < NPW; pp++) {
                        const int p = dg * NPW + pp;
                        if (p < NPAIR) {
#pragma unroll
                            for (int j = 0; j < 2; j++)
                                red_add2(row + p * 16 + j * 8, dacc[mb][2 * pp + j][2 * hh] * scale,
                                         dacc[mb][2 * pp + j][2 * hh + 1] * scale);
                        }
                    }
                }
            }
    };

    cp_wait_group<1>();
    __syncthreads();  // K, V and step 0 visible
    for (int it = 0; it < nsteps; it++) {
        const int st = it & 1;
        const int h = hk * grp + it % grp, m = mlast - (it / grp) * BM;
        const bf16* sQs = sQ + st * 2 * BM * LD;
        const bf16* sOs = sQs + BM * LD;
        const float* sLs = sL + st * 2 * BM;
        const float* sDs = sLs + BM;
        bf16* sSs = sS + st * BN * LDS;
        const bool active = key0 < len && (!causal || key0 <= m + BM - 1);

        // The previous step's dQ is split between the roles' idle spots: role 1 does its part
        // first (while role 0 computes S and the exponentials), role 0 after its dV product
        // (while role 1 does the dS arithmetic and dK).
        if (role == 1 && it > 0) dq_step(it - 1);

        // ---- The pair's 32 keys against the tile's 64 queries (warp-uniform skip when the
        // pair's keys are past the sequence or, causal, past every query of the tile).
        if (active) {
            // X[32 keys][64 queries] = A Bᵀ: Sᵀ = K Qᵀ (role 0) or dPᵀ = V dOᵀ (role 1).
            const bf16* sA = role ? sV : sK;
            const bf16* sB = role ? sOs : sQs;
            float x[2][NQ][4];
#pragma unroll
            for (int mb = 0; mb < 2; mb++)
#pragma unroll
                for (int nb = 0; nb < NQ; nb++) x[mb][nb][0] = x[mb][nb][1] = x[mb][nb][2] = x[mb][nb][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KS; kk++) {
                u32 a0[4], a1[4];
                ldsm4(a_addr(sA, LD, kr0, kk * 16, lane), a0);
                ldsm4(a_addr(sA, LD, kr0 + 16, kk * 16, lane), a1);
#pragma unroll
                for (int nb = 0; nb < NQ; nb += 2) {
                    u32 b[4];
                    ldsm4(b_addr(sB, LD, nb * 8, kk * 16, lane), b);
                    mma_bf16(x[0][nb], a0, b[0], b[1]);
                    mma_bf16(x[0][nb + 1], a0, b[2], b[3]);
                    mma_bf16(x[1][nb], a1, b[0], b[1]);
                    mma_bf16(x[1][nb + 1], a1, b[2], b[3]);
                }
            }
            // xp: the bf16 A fragments (keys × queries) of Pᵀ (role 0) or dSᵀ (role 1):
            // xp[mb][kk] covers keys kr0 + 16·mb.., queries 16·kk.. (c_to_a of n-blocks 2kk, 2kk+1).
            u32 xp[2][NQ / 2][4];
            u32* pbuf = sP + pair * (2 * 4 * 32 * 4) + lane * 4;  // + (mb * 4 + kk) * 128
            if (role == 0) {
                // P = exp2(S·sl2 − lse·log2e); zero where masked (causal, ragged ends).
                const bool edge = m + BM > len || key0 + 32 > len || (causal && key0 + 31 > m);
#pragma unroll
                for (int nb = 0; nb < NQ; nb++)
#pragma unroll
                    for (int j = 0; j < 2; j++) {
                        const int qc = nb * 8 + 2 * tig + j;
                        const float nl = -sLs[qc] * ATT_LOG2E;
#pragma unroll
                        for (int mb = 0; mb < 2; mb++)
#pragma unroll
                            for (int hh = 0; hh < 2; hh++) {
                                const int kpos = key0 + 16 * mb + g + 8 * hh, qpos = m + qc;
                                const bool ok = !edge || (qpos < len && kpos < len && (!causal || kpos <= qpos));
                                float& e = x[mb][nb][2 * hh + j];
                                e = ok ? exp2f(fmaf(e, sl2, nl)) : 0.f;
                            }
                    }
#pragma unroll
                for (int mb = 0; mb < 2; mb++)
#pragma unroll
                    for (int kk = 0; kk < NQ / 2; kk++) {
                        c_to_a(xp[mb][kk], x[mb][2 * kk], x[mb][2 * kk + 1]);
                        Vec16 w;
                        w.w[0] = xp[mb][kk][0];
                        w.w[1] = xp[mb][kk][1];
                        w.w[2] = xp[mb][kk][2];
                        w.w[3] = xp[mb][kk][3];
                        *reinterpret_cast<Vec16*>(pbuf + (mb * 4 + kk) * 128) = w;
                    }
                bar_arrive(1 + pair, 64);  // P of this step is in sP (the partner waits on it)
            } else {
                bar_sync(1 + pair, 64);
                // dSᵀ = Pᵀ ∘ (dPᵀ − D), with P as rounded to bf16 for dV (as V1).
                float dd[NQ][2];
#pragma unroll
                for (int nb = 0; nb < NQ; nb++) {
                    dd[nb][0] = sDs[nb * 8 + 2 * tig];
                    dd[nb][1] = sDs[nb * 8 + 2 * tig + 1];
                }
#pragma unroll
                for (int mb = 0; mb < 2; mb++)
#pragma unroll
                    for (int kk = 0; kk < NQ / 2; kk++) {
                        const Vec16 w = *reinterpret_cast<const Vec16*>(pbuf + (mb * 4 + kk) * 128);
#pragma unroll
                        for (int j = 0; j < 2; j++)
#pragma unroll
                            for (int e = 0; e < 4; e++) {
                                const u32 pw = w.w[2 * j + (e >> 1)];
                                const float p = (e & 1) ? bf_hi(pw) : bf_lo(pw);
                                float& xe = x[mb][2 * kk + j][e];
                                xe = p * (xe - dd[2 * kk + j][e & 1]);
                            }
                        c_to_a(xp[mb][kk], x[mb][2 * kk], x[mb][2 * kk + 1]);
                        // dSᵀ rows (keys) kr0 + 16·mb + g (+8), columns (queries) 16·kk + 2·tig (+8).
                        bf16* r0 = sSs + (kr0 + 16 * mb + g) * LDS + 16 * kk + 2 * tig;
                        *reinterpret_cast<u32*>(r0) = xp[mb][kk][0];
                        *reinterpret_cast<u32*>(r0 + 8 * LDS) = xp[mb][kk][1];
                        *reinterpret_cast<u32*>(r0 + 8) = xp[mb][kk][2];
                        *reinterpret_cast<u32*>(r0 + 8 * LDS + 8) = xp[mb][kk][3];
                    }
            }
            // acc += Xp · B2 over the tile's queries: dV += Pᵀ dO (role 0), dK += dSᵀ Q (role 1).
            const bf16* sB2 = role ? sQs : sOs;
#pragma unroll
            for (int kk = 0; kk < NQ / 2; kk++)
#pragma unroll
                for (int dn = 0; dn < ND; dn += 2) {
                    u32 b[4];
                    ldsm4t(bt_addr(sB2, LD, kk * 16, dn * 8, lane), b);
                    mma_bf16(acc[0][dn], xp[0][kk], b[0], b[1]);
                    mma_bf16(acc[0][dn + 1], xp[0][kk], b[2], b[3]);
                    mma_bf16(acc[1][dn], xp[1][kk], b[0], b[1]);
                    mma_bf16(acc[1][dn + 1], xp[1][kk], b[2], b[3]);
                }
        }

        if (role == 0 && it > 0) dq_step(it - 1);

        cp_wait_all();    // step it+1's Q, dO, lse, dvec landed (issued one step ago)
        __syncthreads();  // X_it: ... and visible; dSᵀ of step it complete; every warp is done
                          // with stage st and with dSᵀ buffer st ^ 1 (step it-1's dQ)
        if (it + 2 < nsteps) load_step(it + 2);  // into stage st (overlaps steps it and it+1)
        cp_commit();
    }
    dq_step(nsteps - 1);  // after the last X
    cp_wait_all();

    // dV (role 0) and dK·scale (role 1), summed over the group: bf16 straight into [T, hkv, D].
    bf16* dst = role ? dk_out : dv_out;
    const float f = role ? scale : 1.f;
#pragma unroll
    for (int mb = 0; mb < 2; mb++)
#pragma unroll
        for (int hh = 0; hh < 2; hh++) {
            const int kp = key0 + 16 * mb + g + 8 * hh;
            if (kp >= len) continue;
            bf16* row = dst + (long)(start + kp) * ks + hk * D + 2 * tig;
#pragma unroll
            for (int dn = 0; dn < ND; dn++)
                *reinterpret_cast<u32*>(row + dn * 8) = pack_bf2(acc[mb][dn][2 * hh] * f, acc[mb][dn][2 * hh + 1] * f);
        }
}

#define ATT_V3_BWD_ENTRY(D)                                                                                      \
    extern "C" __global__ void __launch_bounds__(V3_THREADS, 1) attention_bwd_v3_bf16_d##D(                      \
        float* dq_acc, bf16* dk, bf16* dv, const bf16* q, const bf16* k, const bf16* v, const bf16* dout,        \
        const float* lse, const float* dvec, const int* cu, int nseq, int T_, int hq, int hkv, float scale,      \
        float sl2, int causal) {                                                                                 \
        bwd_v3_body<D>(dq_acc, dk, dv, q, k, v, dout, lse, dvec, cu, nseq, T_, hq, hkv, scale, sl2, causal);     \
    }
ATT_V3_BWD_ENTRY(64)
ATT_V3_BWD_ENTRY(80)
ATT_V3_BWD_ENTRY(128)

