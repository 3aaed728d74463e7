// Elementwise kernels on flat buffers: bias add and its column-sum backward, residual adds,
// scaling, fill and f32 <-> bf16 casts. Streaming kernels are grid-stride loops over 8-element
// vectors (one 16-byte load for bf16, two for f32) when every pointer is 16-byte aligned, with a
// scalar loop for the tail (and for misaligned sub-buffers). Sizes are 64-bit: a flat parameter
// buffer of a 7B model has more than 2^31 elements.
#include "common.cuh"

#define EW_VEC 8

// 8 consecutive elements as floats; p must be 16-byte aligned.
template <typename T> __device__ __forceinline__ void ew_ld8(const T* p, float* o);
template <> __device__ __forceinline__ void ew_ld8<bf16>(const bf16* p, float* o) { ld16(p, o); }
template <> __device__ __forceinline__ void ew_ld8<float>(const float* p, float* o) { ld16(p, o); ld16(p + 4, o + 4); }
template <typename T> __device__ __forceinline__ void ew_st8(T* p, const float* v);
template <> __device__ __forceinline__ void ew_st8<bf16>(bf16* p, const float* v) { st16(p, v); }
template <> __device__ __forceinline__ void ew_st8<float>(float* p, const float* v) { st16(p, v); st16(p + 4, v + 4); }

__device__ __forceinline__ long ew_tid() { return (long)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ long ew_stride() { return (long)gridDim.x * blockDim.x; }

// out[i] = f(a[i], b[i]). No __restrict__: add_inplace passes out == a (each element is read
// before it is written, by the same thread).
template <typename TO, typename TA, typename TB, typename F>
__device__ __forceinline__ void ew_map2(TO* out, const TA* a, const TB* b, long n, F f) {
    bool vec = aligned16(out) && aligned16(a) && aligned16(b);
    long nv = vec ? n / EW_VEC : 0;
    for (long i = ew_tid(); i < nv; i += ew_stride()) {
        float x[EW_VEC], y[EW_VEC];
        ew_ld8(a + i * EW_VEC, x);
        ew_ld8(b + i * EW_VEC, y);
#pragma unroll
        for (int k = 0; k < EW_VEC; k++) x[k] = f(x[k], y[k]);
        ew_st8(out + i * EW_VEC, x);
    }
    for (long i = nv * EW_VEC + ew_tid(); i < n; i += ew_stride()) st(out, i, f(ld(a, i), ld(b, i)));
}

// out[i] = f(a[i]).
template <typename TO, typename TA, typename F>
__device__ __forceinline__ void ew_map1(TO* out, const TA* a, long n, F f) {
    bool vec = aligned16(out) && aligned16(a);
    long nv = vec ? n / EW_VEC : 0;
    for (long i = ew_tid(); i < nv; i += ew_stride()) {
        float x[EW_VEC];
        ew_ld8(a + i * EW_VEC, x);
#pragma unroll
        for (int k = 0; k < EW_VEC; k++) x[k] = f(x[k]);
        ew_st8(out + i * EW_VEC, x);
    }
    for (long i = nv * EW_VEC + ew_tid(); i < n; i += ew_stride()) st(out, i, f(ld(a, i)));
}

struct EwAdd { __device__ float operator()(float a, float b) const { return a + b; } };
struct EwIdent { __device__ float operator()(float a) const { return a; } };
struct EwScale {
    float s;
    __device__ float operator()(float a) const { return a * s; }
};

// y[r, c] += b[c] over y [rows, cols] flattened to n = rows * cols elements.
template <typename T>
__device__ void bias_add(T* y, const T* b, long n, int cols) {
    bool vec = (cols % EW_VEC == 0) && aligned16(y) && aligned16(b);
    long nv = vec ? n / EW_VEC : 0;
    for (long i = ew_tid(); i < nv; i += ew_stride()) {
        long e = i * EW_VEC;
        int c = (int)(e % cols);   // cols % 8 == 0, so the 8 elements share one row
        float x[EW_VEC], bb[EW_VEC];
        ew_ld8(y + e, x);
        ew_ld8(b + c, bb);
#pragma unroll
        for (int k = 0; k < EW_VEC; k++) x[k] += bb[k];
        ew_st8(y + e, x);
    }
    for (long i = nv * EW_VEC + ew_tid(); i < n; i += ew_stride()) st(y, i, ld(y, i) + ld(b, i % cols));
}

// Pass 1 of the bias gradient: part[chunk][c] = sum of dy[r][c] over the chunk's rows
// [chunk * rpc, min(rows, (chunk + 1) * rpc)). Grid (ceil(cols / 32), nchunks), block (32, 8):
// threadIdx.x picks the column (coalesced across a warp), threadIdx.y strides the rows, and the
// 8 row-lanes are summed in a fixed order, so the result is deterministic.
template <typename T>
__device__ void bias_bwd_part(float* __restrict__ part, const T* __restrict__ dy, int rows, int cols, int rpc) {
    __shared__ float s[8][33];
    int c = blockIdx.x * 32 + threadIdx.x;
    int r0 = blockIdx.y * rpc;
    int r1 = min(rows, r0 + rpc);
    float acc = 0.f;
    if (c < cols)
        for (int r = r0 + threadIdx.y; r < r1; r += 8) acc += ld(dy, (long)r * cols + c);
    s[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        float t = 0.f;
#pragma unroll
        for (int k = 0; k < 8; k++) t += s[k][threadIdx.x];
        part[(long)blockIdx.y * cols + c] = t;
    }
}

// Pass 2: db[c] += sum over chunks of part[chunk][c], in chunk order.
extern "C" __global__ void bias_bwd_reduce(float* __restrict__ db, const float* __restrict__ part, int nparts, int cols) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float t = 0.f;
    for (int p = 0; p < nparts; p++) t += part[(long)p * cols + c];
    db[c] += t;
}

template <typename T>
__device__ void fill(T* y, float v, long n) {
    long nv = aligned16(y) ? n / EW_VEC : 0;
    float x[EW_VEC];
#pragma unroll
    for (int k = 0; k < EW_VEC; k++) x[k] = v;
    for (long i = ew_tid(); i < nv; i += ew_stride()) ew_st8(y + i * EW_VEC, x);
    for (long i = nv * EW_VEC + ew_tid(); i < n; i += ew_stride()) st(y, i, v);
}

#define EW_ENTRY(T, S)                                                                                    \
    extern "C" __global__ void bias_add_##S(T* y, const T* b, long n, int cols) { bias_add<T>(y, b, n, cols); } \
    extern "C" __global__ void bias_bwd_##S(float* part, const T* dy, int rows, int cols, int rpc) {       \
        bias_bwd_part<T>(part, dy, rows, cols, rpc);                                                      \
    }                                                                                                     \
    extern "C" __global__ void add_inplace_##S(T* y, const T* x, long n) { ew_map2(y, y, x, n, EwAdd()); } \
    extern "C" __global__ void add_into_##S(T* out, const T* a, const T* b, long n) {                     \
        ew_map2(out, a, b, n, EwAdd());                                                                   \
    }                                                                                                     \
    extern "C" __global__ void scale_inplace_##S(T* y, float s, long n) { ew_map1(y, y, n, EwScale{s}); } \
    extern "C" __global__ void fill_##S(T* y, float v, long n) { fill<T>(y, v, n); }
AM3_BOTH_DTYPES(EW_ENTRY)

// Casts; f2bf rounds to nearest even (cvt.rn), as PyTorch's .to(torch.bfloat16) does.
extern "C" __global__ void cast_f32_bf16(bf16* dst, const float* src, long n) { ew_map1(dst, src, n, EwIdent()); }

// ---- Bias gradient (perf round 3) -------------------------------------------------------------
// Bias gradient pass 1, V2: 16-byte loads. Grid (ceil(cols / N / 32), nchunks), block (32, 8):
// thread (x, y) owns the column vector cv = blockIdx.x * 32 + x (N columns) and the rows
// r0 + y, r0 + y + 8, ... of its chunk, four rows per trip with their loads issued together; the
// 8 row lanes are then added in a fixed order (deterministic). Needs cols % N == 0 and an
// aligned dy (the launcher checks). part [nchunks, cols].
template <typename T>
__device__ void bias_bwd_part_vec16(float* __restrict__ part, const T* __restrict__ dy, int rows, int cols, int rpc) {
    constexpr int N = V16<T>::N;
    __shared__ __align__(16) float s[8][32 * N];
    int cv = blockIdx.x * 32 + threadIdx.x;
    int nvec = cols / N;
    int r0 = blockIdx.y * rpc;
    int r1 = min(rows, r0 + rpc);
    float acc[N];
#pragma unroll
    for (int i = 0; i < N; i++) acc[i] = 0.f;
    if (cv < nvec) {
        const T* p = dy + (long)cv * N;
        int r = r0 + threadIdx.y;
        for (; r + 24 < r1; r += 32) {
            float a[4][N];
#pragma unroll
            for (int u = 0; u < 4; u++) ld16(p + (long)(r + 8 * u) * cols, a[u]);
#pragma unroll
            for (int u = 0; u < 4; u++)
#pragma unroll
                for (int i = 0; i < N; i++) acc[i] += a[u][i];
        }
        for (; r < r1; r += 8) {
            float a[N];
            ld16(p + (long)r * cols, a);
#pragma unroll
            for (int i = 0; i < N; i++) acc[i] += a[i];
        }
    }
#pragma unroll
    for (int i = 0; i < N; i += 4) st16<float>(&s[threadIdx.y][threadIdx.x * N + i], &acc[i]);
    __syncthreads();
    if (threadIdx.y == 0 && cv < nvec) {
        float t[N];
#pragma unroll
        for (int i = 0; i < N; i++) t[i] = 0.f;
#pragma unroll
        for (int k = 0; k < 8; k++) {
            float v[N];
#pragma unroll
            for (int i = 0; i < N; i += 4) ld16<float>(&s[k][threadIdx.x * N + i], &v[i]);
#pragma unroll
            for (int i = 0; i < N; i++) t[i] += v[i];
        }
#pragma unroll
        for (int i = 0; i < N; i += 4) st16<float>(part + (long)blockIdx.y * cols + (long)cv * N + i, &t[i]);
    }
}

#define EW_VEC16_ENTRY(T, S)                                                                                    \
    extern "C" __global__ void bias_bwd_vec16_##S(float* part, const T* dy, int rows, int cols, int rpc) {     \
        bias_bwd_part_vec16<T>(part, dy, rows, cols, rpc);                                                      \
    }
AM3_BOTH_DTYPES(EW_VEC16_ENTRY)

// ---- Cast bf16 -> f32 and the write-only reference (perf round 4) ----------------------------
// bf16 -> f32 is 1/3 reads, 2/3 writes. One vector per thread and no loop (a one-shot grid of
// n/8 threads keeps every load in flight at once), with streaming stores (st.global.cs: evict
// first, the output is not re-read by this kernel) so the 2:1 write stream does not push the
// read stream's lines out of L2.
__device__ __forceinline__ void st_cs4(float* p, float a, float b, float c, float d) {
    asm volatile("st.global.cs.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(a), "f"(b), "f"(c), "f"(d) : "memory");
}

extern "C" __global__ void __launch_bounds__(256) cast_bf16_f32(float* dst, const bf16* src, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (aligned16(dst) && aligned16(src)) {
        long nv = n / EW_VEC;
        if (i < nv) {
            float x[EW_VEC];
            ld16(src + i * EW_VEC, x);
            st_cs4(dst + i * EW_VEC, x[0], x[1], x[2], x[3]);
            st_cs4(dst + i * EW_VEC + 4, x[4], x[5], x[6], x[7]);
        }
        long t = nv * EW_VEC + i;  // the < 8 tail elements
        if (i < n - nv * EW_VEC) dst[t] = ld(src, t);
    } else {
        // Unaligned views: the grid has n / 8 threads, so each takes up to 8 strided elements.
        long stride = (long)gridDim.x * blockDim.x;
        for (long e = i; e < n; e += stride) dst[e] = ld(src, e);
    }
}

// The write-only ceiling for the cast: dst[i] = v with the same stores and grid shape.
extern "C" __global__ void __launch_bounds__(256) fill_f32_cs(float* dst, float v, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    long nv = aligned16(dst) ? n / 4 : 0;
    if (i < nv) st_cs4(dst + i * 4, v, v, v, v);
    long stride = (long)gridDim.x * blockDim.x;
    for (long e = nv * 4 + i; e < n; e += stride) dst[e] = v;
}
