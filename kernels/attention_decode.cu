// Decode attention on tensor cores, split-K over the KV cache (bf16 in, f32 partials).
// q/out [B, n_new, hq, D]; cache k/v [B, max_len, hkv, D]; sequence b holds lens[b] tokens whose
// last n_new are the new ones (new token i sits at position lens[b] - n_new + i).
//
// One block = one (sequence b, kv head hk, 64-row query tile, key chunk). A tile's rows are the
// (new token i, q head of the group) pairs, row r = i * grp + j, so one pass over the cache
// serves every q head that shares it. Online softmax as in the training forward, with K/V tiles
// of 64 keys double-buffered in shared memory (the next tile loads while this one is used);
// warps whose 16 rows are all padding only help load. Each block writes its unnormalised output
// and (max, sum) per row, and attention_decode_combine merges the chunks.
#include "attention_mma.cuh"

template <int D>
__device__ __forceinline__ void decode_body(float* __restrict__ part_o, float* __restrict__ part_ml,
                                            const bf16* __restrict__ q, const bf16* __restrict__ kc,
                                            const bf16* __restrict__ vc, const int* __restrict__ lens, int n_new,
                                            int hq, int hkv, int max_len, int chunk, float sl2, int causal) {
    constexpr int BM = ATT_TILE, BN = ATT_TILE, LD = D + 8, KS = D / 16, ND = D / 8, NB = BN / 8, CH = D / 8;
    extern __shared__ __align__(16) unsigned char att_smem[];
    bf16* sQ = reinterpret_cast<bf16*>(att_smem);  // [BM][LD]
    bf16* sKV = sQ + BM * LD;                       // two stages of K [BN][LD] then V [BN][LD]

    const int split = blockIdx.x, hk = blockIdx.y % hkv, mt = blockIdx.y / hkv, b = blockIdx.z;
    const int grp = hq / hkv, R = n_new * grp;  // query rows per (sequence, kv head)
    const int r0 = mt * BM;
    const int len = lens[b];
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane >> 2, tig = lane & 3;
    // Keys this block covers: its chunk, cut at the last key any of its rows sees.
    const int last_row = min(R, r0 + BM) - 1;
    const int k_vis = causal ? len - n_new + last_row / grp + 1 : len;
    const int k0 = split * chunk, k1 = min(min(k0 + chunk, len), k_vis);
    const int ntiles = k1 > k0 ? CEIL_DIV(k1 - k0, BN) : 0;
    const long ks = (long)hkv * D;
    const bf16* kg = kc + (long)b * max_len * ks + hk * D;  // key j at kg + j * ks
    const bf16* vg = vc + (long)b * max_len * ks + hk * D;
    // Tile t (keys k0 + 64t..) into stage t & 1.
    auto load_kv = [&](int t) {
        int n0 = k0 + t * BN;
        bf16* st = sKV + (t & 1) * 2 * BN * LD;
        load_rows<D, BN>(st, kg + (long)n0 * ks, ks, min(BN, k1 - n0));
        load_rows<D, BN>(st + BN * LD, vg + (long)n0 * ks, ks, min(BN, k1 - n0));
    };

    // Q rows: gathered (row r -> token i = r / grp, head hk * grp + r % grp), zero past R.
    for (int c = threadIdx.x; c < BM * CH; c += ATT_THREADS) {
        int r = c / CH, e = (c - r * CH) * 8, gr = r0 + r;
        bool ok = gr < R;
        const bf16* src = ok ? q + (((long)b * n_new + gr / grp) * hq + hk * grp + gr % grp) * D + e : q;
        cp_async16(smem_u32(sQ + r * LD + e), src, ok ? 16 : 0);
    }
    if (ntiles > 0) load_kv(0);
    cp_commit();

    // Last key each of this thread's rows sees (-1 for padding rows: all masked).
    const int gr_lo = r0 + warp * 16 + g, gr_hi = gr_lo + 8;
    const int lim_lo = gr_lo < R ? (causal ? len - n_new + gr_lo / grp : len - 1) : -1;
    const int lim_hi = gr_hi < R ? (causal ? len - n_new + gr_hi / grp : len - 1) : -1;
    const bool active = r0 + warp * 16 < R;  // warp-uniform: the warp has a real row

    u32 qf[KS][4];
    float o[ND][4];
#pragma unroll
    for (int dn = 0; dn < ND; dn++) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.f;
    float mrow[2] = {NEG_INF, NEG_INF}, lrow[2] = {0.f, 0.f};

    // Two-stage pipeline: tile j+1 loads while tile j is used (decode is bound by these loads).
    for (int j = 0; j < ntiles; j++) {
        if (j + 1 < ntiles) load_kv(j + 1);
        cp_commit();  // possibly empty: keeps one group per iteration
        cp_wait_group<1>();
        __syncthreads();  // tile j (and Q) visible
        if (active) {
            if (j == 0) {
#pragma unroll
                for (int kk = 0; kk < KS; kk++) ldsm4(a_addr(sQ, LD, warp * 16, kk * 16, lane), qf[kk]);
            }
            const bf16* sK = sKV + (j & 1) * 2 * BN * LD;
            const int n0 = k0 + j * BN;
            float s[NB][4];
            qk_tile<D, NB>(s, qf, sK, lane);
#pragma unroll
            for (int nb = 0; nb < NB; nb++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int col = n0 + nb * 8 + 2 * tig + (e & 1);
                    int lim = (e >> 1) ? lim_hi : lim_lo;
                    if (col >= k1 || col > lim) s[nb][e] = NEG_INF;
                }
            softmax_step<NB, ND>(s, o, mrow, lrow, sl2);
            pv_tile<D, NB>(o, s, sK + BN * LD, lane);
        }
        __syncthreads();  // every warp is done with stage j & 1 before tile j + 2 overwrites it
    }
    cp_wait_all();  // no copy may be in flight when the block exits (ntiles = 0 still loaded Q)

    // Partials, indexed by output row (b, i, head): o unnormalised, (m, l) in log2 units.
    const long nrows = (long)gridDim.z * n_new * hq;
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        float l = quad_sum(lrow[hh]);
        int gr = hh ? gr_hi : gr_lo;
        if (gr >= R) continue;
        long orow = ((long)b * n_new + gr / grp) * hq + hk * grp + gr % grp;
        long pr = (long)split * nrows + orow;
        float* po = part_o + pr * D + 2 * tig;
#pragma unroll
        for (int dn = 0; dn < ND; dn++)
            *reinterpret_cast<float2*>(po + dn * 8) = make_float2(o[dn][2 * hh], o[dn][2 * hh + 1]);
        if (tig == 0) {
            part_ml[pr * 2] = mrow[hh];
            part_ml[pr * 2 + 1] = l;
        }
    }
}

#define ATT_DECODE_ENTRY(D)                                                                                         \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_decode_bf16_d##D(                           \
        float* part_o, float* part_ml, const bf16* q, const bf16* kc, const bf16* vc, const int* lens, int n_new,   \
        int hq, int hkv, int max_len, int chunk, int nsplit, float sl2, int causal) {                               \
        (void)nsplit;                                                                                               \
        decode_body<D>(part_o, part_ml, q, kc, vc, lens, n_new, hq, hkv, max_len, chunk, sl2, causal);              \
    }
ATT_DECODE_ENTRY(64)
ATT_DECODE_ENTRY(80)
ATT_DECODE_ENTRY(128)

// out[row, :] = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s over the nsplit chunks (M = max m_s;
// chunks no key of the row fell in have m = -inf and weigh 0). One block per output row.
extern "C" __global__ void attention_decode_combine_bf16(bf16* out, const float* part_o, const float* part_ml, int rows,
                                                        int nsplit, int d) {
    int row = blockIdx.x;
    if (row >= rows) return;
    float M = NEG_INF;
    for (int s = 0; s < nsplit; s++) M = fmaxf(M, part_ml[((long)s * rows + row) * 2]);
    float L = 0.f;
    for (int s = 0; s < nsplit; s++) {
        float ms = part_ml[((long)s * rows + row) * 2];
        if (ms != NEG_INF) L += part_ml[((long)s * rows + row) * 2 + 1] * exp2f(ms - M);
    }
    float inv = L > 0.f ? 1.f / L : 0.f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float acc = 0.f;
        for (int s = 0; s < nsplit; s++) {
            float ms = part_ml[((long)s * rows + row) * 2];
            if (ms != NEG_INF) acc += part_o[((long)s * rows + row) * d + c] * exp2f(ms - M);
        }
        out[(long)row * d + c] = f2bf(acc * inv);
    }
}

// attention_decode16_bf16_d{64,80,128}: decode when a (sequence, kv head) has at most 16 query
//   rows (n_new · group ≤ 16, e.g. one new token with GQA 7). One block = (sequence, kv head,
//   key chunk); the 16 rows are shared by all 4 warps and each warp takes 16 keys of every
//   64-key tile (its own online softmax), so all warps compute instead of one. K/V tiles stream
//   through a three-stage cp.async ring (two tiles in flight while one is used). At the end the
//   warps merge their (max, sum, output) in shared memory and write the same partials as
//   attention_decode_bf16_d*, which attention_decode_combine_bf16 merges across chunks.


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

#define ATT_DECODE16_ENTRY(D)                                                                                       \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_decode16_bf16_d##D(                         \
        float* part_o, float* part_ml, const bf16* q, const bf16* kc, const bf16* vc, const int* lens, int n_new,   \
        int hq, int hkv, int max_len, int chunk, int nsplit, float sl2, int causal) {                               \
        (void)nsplit;                                                                                               \
        decode16_body<D>(part_o, part_ml, q, kc, vc, lens, n_new, hq, hkv, max_len, chunk, sl2, causal);            \
    }
ATT_DECODE16_ENTRY(64)
ATT_DECODE16_ENTRY(80)
ATT_DECODE16_ENTRY(128)
