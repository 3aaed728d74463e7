//! Split-K for the dhidden GEMM (PERF-logprob.md, Round 4). dhidden [m, h] = U [m, k] · W [k, h]
//! with m = a token chunk (2,048) has only ~224 output tiles of 128 × 256, 1.7 waves on 132 SMs,
//! while k (the vocabulary) is huge. Cutting k into S slices gives S f32 partials [m, h] and S×
//! the tiles; `logprob_scatter_sum` adds them up in the scatter that already follows the GEMM.
//!
//! The slices are `len` columns long, a multiple of 8, so every slice of a 16-byte aligned row
//! starts 16-byte aligned; the last one may be shorter. The equal slices run as one strided-batched
//! GEMM and the short last one as a plain GEMM. U is addressed in place with its own row stride
//! (the chunk buffer's V), which `cuda::blas::Gemm` cannot express, so this file calls cuBLAS
//! directly (column-major, like blas.rs).

use crate::cuda::blas::GemmType;
use crate::cuda::Gpu;
use anyhow::{anyhow, Result};
use cudarc::cublas::{result as cr, sys as cs};
use std::ffi::c_void;

/// How the reduction dimension k is cut: `count` slices of `len` columns (the last may be shorter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Splits {
    pub len: usize,
    pub count: usize,
}

impl Splits {
    /// `s` slices requested over k columns (k ≥ 1); fewer when k is short.
    pub fn new(k: usize, s: usize) -> Self {
        let k = k.max(1);
        let s = s.clamp(1, k);
        if s == 1 {
            return Self { len: k, count: 1 };
        }
        let len = k.div_ceil(s).next_multiple_of(8);
        Self { len, count: k.div_ceil(len) }
    }
}

/// Slices per the cost model of PERF-logprob.md Round 4: the GEMM's time ∝ waves of 128 × 256
/// output tiles on the SMs divided by S (each tile's k loop is S times shorter), plus the f32
/// partial traffic each extra slice costs (`extra_bytes` per slice: written by the GEMM and read
/// by the sum, and in `bwd` also re-read by the next tile's β = 1). S ≤ 4 and k / S ≥ 4,096, so
/// small problems stay unsplit. Ties go to the smaller S.
pub(super) fn auto_splits(m: usize, h: usize, k: usize, sms: usize, extra_bytes: f64) -> usize {
    const RATE: f64 = 717e12; // cuBLAS bf16 in full waves (H200, run 3)
    const HBM: f64 = 3.5e12;
    let tiles = (m.div_ceil(128) * h.div_ceil(256)).max(1) as f64;
    let sms = sms.max(1) as f64;
    let base = 2.0 * (m * h * k) as f64 / RATE;
    let cost = |s: usize| {
        let w = s as f64 * tiles / sms;
        base * w.ceil() / w + (s - 1) as f64 * extra_bytes / HBM
    };
    let max_s = (k / 4096).clamp(1, 4);
    let mut best = 1;
    for s in 2..=max_s {
        if cost(s) < cost(best) * (1.0 - 1e-9) {
            best = s;
        }
    }
    best
}

fn cuda_type(t: GemmType) -> cs::cudaDataType {
    match t {
        GemmType::Bf16 => cs::cudaDataType::CUDA_R_16BF,
        GemmType::F32 => cs::cudaDataType::CUDA_R_32F,
    }
}

/// What one split dhidden GEMM reads and writes. Pointers are raw device addresses.
pub(super) struct SplitGemm {
    /// U: rows [m] at `u`, row stride `ldu` elements of `ab`; columns 0 .. k are reduced.
    pub u: u64,
    pub ldu: usize,
    /// W rows 0 .. k at `w` ([k, h], row-major, `ab`).
    pub w: u64,
    /// Partial p [m, h] f32 at `part + p · m · h · 4` bytes.
    pub part: u64,
    pub m: usize,
    pub h: usize,
    pub k: usize,
    pub ab: GemmType,
    /// 0: overwrite the partials; 1: accumulate into them (the `bwd` tiles after the first).
    pub beta: f32,
}

/// partial[p] (β)= U[:, slice p] · W[slice p, :] for p < splits.count.
pub(super) fn gemm(g: &Gpu, s: &SplitGemm, splits: Splits) -> Result<()> {
    if s.m == 0 || s.h == 0 || s.k == 0 {
        return Ok(());
    }
    let full = s.k / splits.len;
    let rem = s.k % splits.len;
    if full >= 1 {
        call(g, s, 0, splits.len, splits.len, full)?;
    }
    if rem > 0 {
        call(g, s, full, splits.len, rem, 1)?;
    }
    Ok(())
}

/// `count` slices of `len` columns, the first being slice `first` (columns from first · stride,
/// into partial `first` onward).
fn call(g: &Gpu, s: &SplitGemm, first: usize, stride: usize, len: usize, count: usize) -> Result<()> {
    let esz = match s.ab {
        GemmType::Bf16 => 2usize,
        GemmType::F32 => 4,
    };
    let col0 = first * stride;
    let a = s.w + (col0 * s.h * esz) as u64; // W rows col0 ..
    let b = s.u + (col0 * esz) as u64; // U columns col0 ..
    let c = s.part + (first * s.m * s.h * 4) as u64;
    let (alpha, beta) = (1.0f32, s.beta);
    let n_ = cs::cublasOperation_t::CUBLAS_OP_N;
    let (ab, ct) = (cuda_type(s.ab), cuda_type(GemmType::F32));
    let compute = cs::cublasComputeType_t::CUBLAS_COMPUTE_32F;
    let algo = cs::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
    // Column-major: C_cm [h × m] (ld h) = W_cm [h × len] (ld h) · U_cm [len × m] (ld ldu).
    // Batch strides: W by len rows, U by len columns, C by one [m, h] partial.
    // SAFETY: the caller's buffers hold U [m, ldu] with k ≤ ldu, W [k, h] and splits × [m, h] f32.
    let r = unsafe {
        if count == 1 {
            cr::gemm_ex(
                *g.blas.handle.handle(),
                n_,
                n_,
                s.h as i32,
                s.m as i32,
                len as i32,
                &alpha as *const f32 as *const c_void,
                a as *const c_void,
                ab,
                s.h as i32,
                b as *const c_void,
                ab,
                s.ldu as i32,
                &beta as *const f32 as *const c_void,
                c as *mut c_void,
                ct,
                s.h as i32,
                compute,
                algo,
            )
        } else {
            cr::gemm_strided_batched_ex(
                *g.blas.handle.handle(),
                n_,
                n_,
                s.h as i32,
                s.m as i32,
                len as i32,
                &alpha as *const f32 as *const c_void,
                a as *const c_void,
                ab,
                s.h as i32,
                (len * s.h) as i64,
                b as *const c_void,
                ab,
                s.ldu as i32,
                len as i64,
                &beta as *const f32 as *const c_void,
                c as *mut c_void,
                ct,
                s.h as i32,
                (s.m * s.h) as i64,
                count as i32,
                compute,
                algo,
            )
        }
    };
    r.map_err(|e| {
        anyhow!(
            "cuBLAS split dhidden GEMM m={} h={} k={} (slices {first}..{} of {len} columns) failed: {e:?}",
            s.m,
            s.h,
            s.k,
            first + count
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_k_once_with_aligned_starts() {
        for k in 1..400 {
            for s in 1..9 {
                let sp = Splits::new(k, s);
                assert!(sp.count >= 1 && sp.count <= s, "k={k} s={s}: {sp:?}");
                // Slices p < count: [p·len, min((p+1)·len, k)), each non-empty, 8-aligned starts.
                let mut covered = 0;
                for p in 0..sp.count {
                    let (a, b) = (p * sp.len, ((p + 1) * sp.len).min(k));
                    assert!(a < b, "k={k} s={s}: empty slice {p} of {sp:?}");
                    assert!(sp.count == 1 || a % 8 == 0, "k={k} s={s}: slice {p} starts at {a}");
                    assert_eq!(a, covered);
                    covered = b;
                }
                assert_eq!(covered, k, "k={k} s={s}: {sp:?}");
            }
        }
        assert_eq!(Splits::new(152_064, 4), Splits { len: 38_016, count: 4 });
        assert_eq!(Splits::new(152_064, 5), Splits { len: 30_416, count: 5 });
        assert_eq!(Splits::new(4099, 3), Splits { len: 1368, count: 3 });
    }

    #[test]
    fn auto_splits_fill_the_waves() {
        let extra = |m: usize| 8.0 * (m * 3584) as f64;
        assert_eq!(auto_splits(2048, 3584, 152_064, 132, extra(2048)), 4);
        assert_eq!(auto_splits(2731, 3584, 152_064, 132, extra(2731)), 3);
        assert_eq!(auto_splits(1024, 3584, 152_064, 132, extra(1024)), 1);
        // bwd tiles: k = 8,192 at 8,192 tokens stays whole.
        assert_eq!(auto_splits(8192, 3584, 8192, 132, extra(8192)), 1);
        // Short vocabularies are never split.
        assert_eq!(auto_splits(5, 64, 1000, 132, extra(5)), 1);
    }
}
