// The two per-row kernels of the V3 and V4 attention backwards, included by both modules:
// D = rowsum(dO∘O) before the main kernel and dq = bf16(dq_acc) after it.
#ifndef AM3_ATTENTION_BWD_ROWS_CUH
#define AM3_ATTENTION_BWD_ROWS_CUH
#include "common.cuh"

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

#endif
