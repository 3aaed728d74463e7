//! GEMM through cuBLAS: bf16 (or f32) operands, f32 accumulation, row-major call convention.
//!
//! `C[m,n] = alpha * op(A)[m,k] · op(B)[k,n] + beta * C`, all row-major. cuBLAS is column-major,
//! so we compute Cᵀ = op(B)ᵀ·op(A)ᵀ by swapping the operands; no data moves.

use anyhow::{anyhow, Result};
use cudarc::cublas::{result as cr, sys as cs, CudaBlas};
use cudarc::driver::CudaStream;
use std::ffi::c_void;
use std::sync::Arc;

pub struct Blas {
    pub handle: CudaBlas,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmType {
    Bf16,
    F32,
}

impl GemmType {
    fn cuda(self) -> cs::cudaDataType {
        match self {
            GemmType::Bf16 => cs::cudaDataType::CUDA_R_16BF,
            GemmType::F32 => cs::cudaDataType::CUDA_R_32F,
        }
    }
}

/// One row-major GEMM (or a strided batch of them). Pointers are raw device addresses.
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub alpha: f32,
    pub beta: f32,
    pub a: u64,
    pub b: u64,
    pub c: u64,
    pub ab_type: GemmType,
    pub c_type: GemmType,
    /// (count, stride_a, stride_b, stride_c) in elements; count 1 = a plain GEMM.
    pub batch: (usize, usize, usize, usize),
}

impl Blas {
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        let handle = CudaBlas::new(stream).map_err(|e| anyhow!("creating the cuBLAS handle: {e:?}"))?;
        Ok(Self { handle })
    }

    pub fn gemm(&self, g: &Gemm) -> Result<()> {
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        let op = |t: bool| if t { cs::cublasOperation_t::CUBLAS_OP_T } else { cs::cublasOperation_t::CUBLAS_OP_N };
        // Column-major view: C_cm (n x m) = op(B)_cm (n x k) · op(A)_cm (k x m).
        let lda_b = if g.trans_b { g.k } else { g.n };
        let lda_a = if g.trans_a { g.m } else { g.k };
        let compute = match g.ab_type {
            GemmType::Bf16 => cs::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            // Plain f32 on the CUDA cores: the f32 path is for checks, not speed.
            GemmType::F32 => cs::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        };
        let (alpha, beta) = (g.alpha, g.beta);
        let (count, sa, sb, sc) = g.batch;
        // SAFETY: the caller guarantees the pointers address buffers of the stated shapes.
        let r = unsafe {
            if count <= 1 {
                cr::gemm_ex(
                    *self.handle.handle(),
                    op(g.trans_b),
                    op(g.trans_a),
                    g.n as i32,
                    g.m as i32,
                    g.k as i32,
                    &alpha as *const f32 as *const c_void,
                    g.b as *const c_void,
                    g.ab_type.cuda(),
                    lda_b as i32,
                    g.a as *const c_void,
                    g.ab_type.cuda(),
                    lda_a as i32,
                    &beta as *const f32 as *const c_void,
                    g.c as *mut c_void,
                    g.c_type.cuda(),
                    g.n as i32,
                    compute,
                    cs::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            } else {
                cr::gemm_strided_batched_ex(
                    *self.handle.handle(),
                    op(g.trans_b),
                    op(g.trans_a),
                    g.n as i32,
                    g.m as i32,
                    g.k as i32,
                    &alpha as *const f32 as *const c_void,
                    g.b as *const c_void,
                    g.ab_type.cuda(),
                    lda_b as i32,
                    sb as i64,
                    g.a as *const c_void,
                    g.ab_type.cuda(),
                    lda_a as i32,
                    sa as i64,
                    &beta as *const f32 as *const c_void,
                    g.c as *mut c_void,
                    g.c_type.cuda(),
                    g.n as i32,
                    sc as i64,
                    count as i32,
                    compute,
                    cs::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
        };
        r.map_err(|e| {
            anyhow!(
                "cuBLAS GEMM m={} n={} k={} (ta={}, tb={}, batch={}) failed: {e:?}",
                g.m,
                g.n,
                g.k,
                g.trans_a,
                g.trans_b,
                count
            )
        })
    }
}
