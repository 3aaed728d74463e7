// Second-generation attention kernels, selected at run time next to the verified ones in
// attention.cu / attention_decode.cu (src/ops/attention: `Variant::V2` or AM3_ATTN_V2=1):
//
// attention_fwd128_bf16_d{64,80,128}: the training forward with 128-row query tiles (8 warps of
//   16 rows, 256 threads, one block per SM at d128) so each K/V tile brought from L2 serves twice
//   the FLOPs, and a two-stage K/V ring: tile j+1 (K and V together) loads while tile j is used,
//   one barrier per tile. Warps whose 16 rows all lie above a causal tile skip its math.
//   Same arguments, layouts and results as attention_fwd_bf16_d*.
//
// attention_decode16_bf16_d{64,80,128}: decode when a (sequence, kv head) has at most 16 query
//   rows (n_new · group ≤ 16, e.g. one new token with GQA 7). One block = (sequence, kv head,
//   key chunk); the 16 rows are shared by all 4 warps and each warp takes 16 keys of every
//   64-key tile (its own online softmax), so all warps compute instead of one. K/V tiles stream
//   through a three-stage cp.async ring (two tiles in flight while one is used). At the end the
//   warps merge their (max, sum, output) in shared memory and write the same partials as
//   attention_decode_bf16_d*, which attention_decode_combine_bf16 merges across chunks.
//
// attention_win_bf16_d{64,80,128}: the forward when every sequence has at most 64 tokens (vision
//   windows): persistent blocks over (sequence, head) items, the next item loading while the
//   current one computes. Same results as attention_fwd_bf16_d*.
#include "attention_mma.cuh"

// Async load of ROWS rows of D bf16 into a [ROWS][D+8] shared tile by NT threads; rows >= nvalid
// are zero-filled. The caller commits.
template <int D, int ROWS, int NT>
__device__ __forceinline__ void v2_load_rows(bf16* sm, const bf16* g, long gstride, int nvalid) {
    constexpr int CH = D / 8;
    for (int c = threadIdx.x; c < ROWS * CH; c += NT) {
        int r = c / CH, e = (c - r * CH) * 8;
        bool ok = r < nvalid;
        const bf16* src = ok ? g + r * gstride + e : g;
        cp_async16(smem_u32(sm + r * (D + 8) + e), src, ok ? 16 : 0);
    }
}

#define F128_BM 128
#define F128_THREADS 256

template <int D>
__device__ __forceinline__ void fwd128_body(bf16* __restrict__ out, float* __restrict__ lse, const bf16* __restrict__ q,
                                            const bf16* __restrict__ k, const bf16* __restrict__ v,
                                            const int* __restrict__ cu, int T_, int hq, int hkv, float sl2, int causal) {
    constexpr int BM = F128_BM, BN = ATT_TILE, NT = F128_THREADS, LD = D + 8, KS = D / 16, ND = D / 8, NB = BN / 8;
    extern __shared__ __align__(16) unsigned char att_smem[];
    bf16* sQ = reinterpret_cast<bf16*>(att_smem);  // [BM][LD]
    bf16* sKV = sQ + BM * LD;                       // two stages of K [BN][LD] then V [BN][LD]

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
    const int wr0 = m0 + warp * 16;  // the warp's first row (position in the sequence)

    // Tile t (keys 64t..) into stage t & 1: K then V.
    auto load_kv = [&](int t) {
        int n0 = t * BN;
        bf16* st = sKV + (t & 1) * 2 * BN * LD;
        v2_load_rows<D, BN, NT>(st, kg + (long)n0 * ks, ks, min(BN, len - n0));
        v2_load_rows<D, BN, NT>(st + BN * LD, vg + (long)n0 * ks, ks, min(BN, len - n0));
    };
    v2_load_rows<D, BM, NT>(sQ, q + (long)(start + m0) * qs + h * D, qs, min(BM, len - m0));
    load_kv(0);
    cp_commit();

    u32 qf[KS][4];
    float o[ND][4];
#pragma unroll
    for (int dn = 0; dn < ND; dn++) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.f;
    float mrow[2] = {NEG_INF, NEG_INF}, lrow[2] = {0.f, 0.f};
    const int r_lo = wr0 + g;  // this thread's rows: r_lo, r_lo + 8

    for (int j = 0; j < ntiles; j++) {
        const int n0 = j * BN;
        cp_wait_all();
        __syncthreads();  // tile j (and Q) visible; every warp is done with tile j-1, whose stage is reused next
        if (j + 1 < ntiles) {
            load_kv(j + 1);
            cp_commit();
        }
        if (j == 0) {
#pragma unroll
            for (int kk = 0; kk < KS; kk++) ldsm4(a_addr(sQ, LD, warp * 16, kk * 16, lane), qf[kk]);
        }
        // Warp-uniform: a causal tile that starts past the warp's last row adds nothing.
        if (causal && n0 > wr0 + 15) continue;
        const bf16* sK = sKV + (j & 1) * 2 * BN * LD;
        float s[NB][4];
        qk_tile<D, NB>(s, qf, sK, lane);
        if (n0 + BN > len || (causal && n0 + BN - 1 > wr0)) {
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
        pv_tile<D, NB>(o, s, sK + BN * LD, lane);
    }
    cp_wait_all();  // nothing may be in flight at exit (a skipped last tile still loaded)

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

#define DEC16_STAGES 3

template <int D>
__device__ __forceinline__ void decode16_body(float* __restrict__ part_o, float* __restrict__ part_ml,
                                              const bf16* __restrict__ q, const bf16* __restrict__ kc,
                                              const bf16* __restrict__ vc, const int* __restrict__ lens, int n_new,
                                              int hq, int hkv, int max_len, int chunk, float sl2, int causal) {
    constexpr int BN = ATT_TILE, NT = ATT_THREADS, LD = D + 8, KS = D / 16, ND = D / 8, CH = D / 8;
    constexpr int NW = NT / WARP;  // warps; warp w takes keys 16w..16w+15 of each tile
    constexpr int STAGE = 2 * BN * LD;
    extern __shared__ __align__(16) unsigned char att_smem[];
    bf16* sQ = reinterpret_cast<bf16*>(att_smem);  // [16][LD]
    bf16* sKV = sQ + 16 * LD;                       // DEC16_STAGES stages of K [BN][LD] then V [BN][LD]

    const int split = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
    const int grp = hq / hkv, R = n_new * grp;  // query rows of this (sequence, kv head), <= 16
    const int len = lens[b];
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane >> 2, tig = lane & 3;
    const int k_vis = causal ? len - n_new + (R - 1) / grp + 1 : len;  // keys the last row sees
    const int k0 = split * chunk, k1 = min(min(k0 + chunk, len), k_vis);
    const int ntiles = k1 > k0 ? CEIL_DIV(k1 - k0, BN) : 0;
    const long ks = (long)hkv * D;
    const bf16* kg = kc + (long)b * max_len * ks + hk * D;  // key j at kg + j * ks
    const bf16* vg = vc + (long)b * max_len * ks + hk * D;
    auto load_kv = [&](int t) {
        int n0 = k0 + t * BN;
        bf16* st = sKV + (t % DEC16_STAGES) * STAGE;
        load_rows<D, BN>(st, kg + (long)n0 * ks, ks, min(BN, k1 - n0));
        load_rows<D, BN>(st + BN * LD, vg + (long)n0 * ks, ks, min(BN, k1 - n0));
    };

    // Q rows: row r -> token r / grp, head hk * grp + r % grp; zero past R.
    for (int c = threadIdx.x; c < 16 * CH; c += NT) {
        int r = c / CH, e = (c - r * CH) * 8;
        bool ok = r < R;
        const bf16* src = ok ? q + (((long)b * n_new + r / grp) * hq + hk * grp + r % grp) * D + e : q;
        cp_async16(smem_u32(sQ + r * LD + e), src, ok ? 16 : 0);
    }
    if (ntiles > 0) load_kv(0);
    cp_commit();
    if (ntiles > 1) load_kv(1);
    cp_commit();  // possibly empty: one group per tile keeps the wait counts uniform

    // Last key each of this thread's rows sees (-1 for padding rows: all masked).
    const int lim_lo = g < R ? (causal ? len - n_new + g / grp : len - 1) : -1;
    const int lim_hi = g + 8 < R ? (causal ? len - n_new + (g + 8) / grp : len - 1) : -1;

    u32 qf[KS][4];
    float o[ND][4];
#pragma unroll
    for (int dn = 0; dn < ND; dn++) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.f;
    float mrow[2] = {NEG_INF, NEG_INF}, lrow[2] = {0.f, 0.f};

    for (int j = 0; j < ntiles; j++) {
        cp_wait_group<1>();  // tile j landed (tile j+1 may still be in flight)
        __syncthreads();     // tile j visible; every warp is done with tile j-1, whose stage tile j+2 takes
        if (j + 2 < ntiles) load_kv(j + 2);
        cp_commit();
        if (j == 0) {
#pragma unroll
            for (int kk = 0; kk < KS; kk++) ldsm4(a_addr(sQ, LD, 0, kk * 16, lane), qf[kk]);
        }
        const int c0 = k0 + j * BN + warp * 16;  // the warp's first key
        if (c0 >= k1) continue;                   // warp-uniform: its keys are past the chunk
        const bf16* sK = sKV + (j % DEC16_STAGES) * STAGE;
        float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int kk = 0; kk < KS; kk++) {
            u32 bb[4];
            ldsm4(b_addr(sK, LD, warp * 16, kk * 16, lane), bb);
            mma_bf16(s[0], qf[kk], bb[0], bb[1]);
            mma_bf16(s[1], qf[kk], bb[2], bb[3]);
        }
#pragma unroll
        for (int nb = 0; nb < 2; nb++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int col = c0 + nb * 8 + 2 * tig + (e & 1);
                int lim = (e >> 1) ? lim_hi : lim_lo;
                if (col >= k1 || col > lim) s[nb][e] = NEG_INF;
            }
        softmax_step<2, ND>(s, o, mrow, lrow, sl2);
        u32 a[4];
        c_to_a(a, s[0], s[1]);
        const bf16* sV = sK + BN * LD;
#pragma unroll
        for (int dn = 0; dn < ND; dn += 2) {
            u32 bb[4];
            ldsm4t(bt_addr(sV, LD, warp * 16, dn * 8, lane), bb);
            mma_bf16(o[dn], a, bb[0], bb[1]);
            mma_bf16(o[dn + 1], a, bb[2], bb[3]);
        }
    }
    cp_wait_all();
    __syncthreads();  // every warp is done with the ring: it becomes the merge buffer

    // Merge the warps: sM/sL [NW][16] per-warp max (log2 units) and sum, sO [NW][16][D] f32 outputs
    // already rescaled to the block max.
    float* sO = reinterpret_cast<float*>(sKV);
    float* sM = sO + NW * 16 * D;
    float* sL = sM + NW * 16;
    float lsum[2] = {quad_sum(lrow[0]), quad_sum(lrow[1])};
    if (tig == 0) {
        sM[warp * 16 + g] = mrow[0];
        sM[warp * 16 + g + 8] = mrow[1];
        sL[warp * 16 + g] = lsum[0];
        sL[warp * 16 + g + 8] = lsum[1];
    }
    __syncthreads();
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        int r = g + hh * 8;
        float M = NEG_INF;
#pragma unroll
        for (int w = 0; w < NW; w++) M = fmaxf(M, sM[w * 16 + r]);
        float f = mrow[hh] == NEG_INF ? 0.f : exp2f(mrow[hh] - M);  // M is finite when mrow is
#pragma unroll
        for (int dn = 0; dn < ND; dn++)
            *reinterpret_cast<float2*>(sO + (warp * 16 + r) * D + dn * 8 + 2 * tig) =
                make_float2(o[dn][2 * hh] * f, o[dn][2 * hh + 1] * f);
    }
    __syncthreads();
    // Partials, indexed by output row (b, i, head): o unnormalised, (m, l) in log2 units.
    const long nrows = (long)gridDim.z * n_new * hq;
    for (int idx = threadIdx.x; idx < 16 * D; idx += NT) {
        int r = idx / D, c = idx - r * D;
        if (r >= R) continue;
        float acc = 0.f;
#pragma unroll
        for (int w = 0; w < NW; w++) acc += sO[(w * 16 + r) * D + c];
        long orow = ((long)b * n_new + r / grp) * hq + hk * grp + r % grp;
        long pr = (long)split * nrows + orow;
        part_o[pr * D + c] = acc;
        if (c == 0) {
            float M = NEG_INF, L = 0.f;
#pragma unroll
            for (int w = 0; w < NW; w++) M = fmaxf(M, sM[w * 16 + r]);
#pragma unroll
            for (int w = 0; w < NW; w++) {
                float mw = sM[w * 16 + r];
                if (mw != NEG_INF) L += sL[w * 16 + r] * exp2f(mw - M);
            }
            part_ml[pr * 2] = M;
            part_ml[pr * 2 + 1] = L;
        }
    }
}

// Short sequences (every len <= 64: the vision tower's windows): a persistent block walks the
// (sequence, head) items blockIdx.x, blockIdx.x + gridDim.x, ... and loads the next item's Q, K, V
// into the second buffer while it computes the current one, so loads stay in flight between
// items (V1 runs one item per block: load, then compute, then store, with nothing overlapped).
template <int D>
__device__ __forceinline__ void win_body(bf16* __restrict__ out, float* __restrict__ lse, const bf16* __restrict__ q,
                                         const bf16* __restrict__ k, const bf16* __restrict__ v,
                                         const int* __restrict__ cu, int nseq, int T_, int hq, int hkv, float sl2,
                                         int causal) {
    constexpr int BM = ATT_TILE, LD = D + 8, KS = D / 16, ND = D / 8, NB = BM / 8;
    constexpr int BUF = 3 * BM * LD;  // Q, K, V of one item
    extern __shared__ __align__(16) unsigned char att_smem[];
    bf16* sbase = reinterpret_cast<bf16*>(att_smem);  // two buffers of Q [BM][LD], K [BM][LD], V [BM][LD]

    const int items = nseq * hq, grp = hq / hkv;
    const long qs = (long)hq * D, ks = (long)hkv * D;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane >> 2, tig = lane & 3;
    auto load_item = [&](int it, int buf) {
        int sq = it / hq, h = it - sq * hq, start = cu[sq], len = cu[sq + 1] - start;
        bf16* sb = sbase + buf * BUF;
        // An empty sequence loads nothing (zero fill); the base pointers keep the source valid.
        const bf16* qg = len > 0 ? q + (long)start * qs + h * D : q;
        const bf16* kg = len > 0 ? k + (long)start * ks + (h / grp) * D : k;
        const bf16* vg = len > 0 ? v + (long)start * ks + (h / grp) * D : v;
        load_rows<D, BM>(sb, qg, qs, len);
        load_rows<D, BM>(sb + BM * LD, kg, ks, len);
        load_rows<D, BM>(sb + 2 * BM * LD, vg, ks, len);
    };

    int buf = 0;
    if ((int)blockIdx.x < items) load_item(blockIdx.x, 0);
    cp_commit();
    for (int it = blockIdx.x; it < items; it += gridDim.x, buf ^= 1) {
        if (it + (int)gridDim.x < items) load_item(it + gridDim.x, buf ^ 1);
        cp_commit();  // possibly empty: one group per item
        cp_wait_group<1>();
        __syncthreads();  // this item's Q, K, V visible
        const int sq = it / hq, h = it - sq * hq, start = cu[sq], len = cu[sq + 1] - start;
        const bf16* sQ = sbase + buf * BUF;
        const bf16* sK = sQ + BM * LD;
        const bf16* sV = sK + BM * LD;
        if (warp * 16 < len) {  // warp-uniform: the warp has a real row
            u32 qf[KS][4];
#pragma unroll
            for (int kk = 0; kk < KS; kk++) ldsm4(a_addr(sQ, LD, warp * 16, kk * 16, lane), qf[kk]);
            float o[ND][4];
#pragma unroll
            for (int dn = 0; dn < ND; dn++) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.f;
            float mrow[2] = {NEG_INF, NEG_INF}, lrow[2] = {0.f, 0.f};
            const int r_lo = warp * 16 + g;
            float s[NB][4];
            qk_tile<D, NB>(s, qf, sK, lane);
            if (len < BM || causal) {
#pragma unroll
                for (int nb = 0; nb < NB; nb++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        int col = nb * 8 + 2 * tig + (e & 1);
                        int row = r_lo + (e >> 1) * 8;
                        if (col >= len || (causal && col > row)) s[nb][e] = NEG_INF;
                    }
            }
            softmax_step<NB, ND>(s, o, mrow, lrow, sl2);
            pv_tile<D, NB>(o, s, sV, lane);
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
        __syncthreads();  // every warp is done with this buffer before the next iteration refills it
    }
    cp_wait_all();
}

// attention_bwdg_bf16_d{64,80,128}: the training backward with the GQA group inside the block.
//   One block = 64 keys of one (sequence, kv head); it walks the group's q heads one after the
//   other (each over the query tiles that see the keys), so dK and dV sum over the group in
//   registers and go out once as bf16: no f32 dK/dV partials [T, hq, D] (their zeroing, writes
//   and the finish kernel's reads), and K/V load once per group instead of once per q head.
//   dQ still by f32 atomics into dq_acc, rounded by attention_bwd_finish_bf16 (partials = 0).
//   Otherwise the math of attention.cu's bwd_body, step for step.
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
__device__ __forceinline__ void bwd_grp_body(float* __restrict__ dq_acc, bf16* __restrict__ dk_out, bf16* __restrict__ dv_out,
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

    // Causal: grid (kv heads, sequences, key tiles). Blocks start in linear order, so with the
    // key tile slowest every tile 0 (each walks all query tiles of 7 heads) starts first and no
    // long block is left for the tail: 7.32 -> 6.25 ms at GQA 28/4 d128 S=4096 (H200, run 2).
    // Non-causal (equal blocks): grid (key tiles, kv heads, sequences), so neighbouring blocks
    // share one head's Q/dO in L2 (key-tile-slowest cost 10 % there for the MHA kernel).
    const int hk = causal ? blockIdx.x : blockIdx.y, sq = causal ? blockIdx.y : blockIdx.z;
    const int n0 = (causal ? blockIdx.z : blockIdx.x) * BN;
    const int start = cu[sq], len = cu[sq + 1] - start;
    if (n0 >= len) return;
    const int grp = hq / hkv;
    const long qs = (long)hq * D, ks = (long)hkv * D;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane >> 2, tig = lane & 3;

    load_rows<D, BN>(sK, k + (long)(start + n0) * ks + hk * D, ks, min(BN, len - n0));
    load_rows<D, BN>(sV, v + (long)(start + n0) * ks + hk * D, ks, min(BN, len - n0));
    const int mbeg = causal ? n0 - n0 % BM : 0;  // first query tile that sees these keys
    const int nmt = CEIL_DIV(len - mbeg, BM);
    // Step `it` of the block's walk = (q head hk * grp + it / nmt, query tile mbeg + (it % nmt) * BM):
    // Q and dO rows by cp.async, lse/dvec by plain stores (visible after the next barrier).
    auto load_q = [&](int it) {
        const int h = hk * grp + it / nmt, m = mbeg + (it % nmt) * BM;
        const bf16* qh = q + (long)start * qs + h * D;
        const bf16* oh = dout + (long)start * qs + h * D;
        const float* lh = lse + (long)h * T_ + start;
        const float* dh = dvec + (long)h * T_ + start;
        load_rows<D, BM>(sQ, qh + m * qs, qs, min(BM, len - m));
        load_rows<D, BM>(sO, oh + m * qs, qs, min(BM, len - m));
        if (threadIdx.x < BM) {
            int r = m + threadIdx.x;
            sL[threadIdx.x] = r < len ? lh[r] * ATT_LOG2E : 0.f;
            sD[threadIdx.x] = r < len ? dh[r] : 0.f;
        }
        cp_commit();
    };
    load_q(0);

    float dk[ND][4], dv[ND][4];
#pragma unroll
    for (int dn = 0; dn < ND; dn++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[dn][e] = dv[dn][e] = 0.f;
    const int kr0 = warp * 16;             // the warp's key rows within the tile
    const int key_lo = n0 + kr0 + g;       // this thread's keys: key_lo, key_lo + 8

    for (int it = 0; it < grp * nmt; it++) {
        const int h = hk * grp + it / nmt, m = mbeg + (it % nmt) * BM;
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
        if (it + 1 < grp * nmt) load_q(it + 1);  // overlaps the dQ work below

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

    // dK (scaled) and dV, summed over the group in registers: bf16 straight into [T, hkv, D].
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        int kp = key_lo + hh * 8;
        if (kp >= len) continue;
        long tok = start + kp;
#pragma unroll
        for (int dn = 0; dn < ND; dn++) {
            long o = tok * ks + hk * D + dn * 8 + 2 * tig;
            *reinterpret_cast<u32*>(dk_out + o) = pack_bf2(dk[dn][2 * hh] * scale, dk[dn][2 * hh + 1] * scale);
            *reinterpret_cast<u32*>(dv_out + o) = pack_bf2(dv[dn][2 * hh], dv[dn][2 * hh + 1]);
        }
    }
}

#define ATT_V2_ENTRY(D)                                                                                             \
    extern "C" __global__ void __launch_bounds__(F128_THREADS, 1) attention_fwd128_bf16_d##D(                       \
        bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, const int* cu, int T_, int hq, int hkv, \
        float sl2, int causal) {                                                                                    \
        fwd128_body<D>(out, lse, q, k, v, cu, T_, hq, hkv, sl2, causal);                                            \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_decode16_bf16_d##D(                         \
        float* part_o, float* part_ml, const bf16* q, const bf16* kc, const bf16* vc, const int* lens, int n_new,   \
        int hq, int hkv, int max_len, int chunk, int nsplit, float sl2, int causal) {                               \
        (void)nsplit;                                                                                               \
        decode16_body<D>(part_o, part_ml, q, kc, vc, lens, n_new, hq, hkv, max_len, chunk, sl2, causal);            \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_win_bf16_d##D(                              \
        bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, const int* cu, int nseq, int T_, int hq, \
        int hkv, float sl2, int causal) {                                                                           \
        win_body<D>(out, lse, q, k, v, cu, nseq, T_, hq, hkv, sl2, causal);                                         \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_bwdg_bf16_d##D(                             \
        float* dq_acc, bf16* dk, bf16* dv, const bf16* q, const bf16* k, const bf16* v, const bf16* dout,           \
        const float* lse, const float* dvec, const int* cu, int T_, int hq, int hkv, float scale, float sl2,         \
        int causal) {                                                                                               \
        bwd_grp_body<D>(dq_acc, dk, dv, q, k, v, dout, lse, dvec, cu, T_, hq, hkv, scale, sl2, causal);             \
    }
ATT_V2_ENTRY(64)
ATT_V2_ENTRY(80)
ATT_V2_ENTRY(128)
