//! The ops the models are built from, one module each: a file, or a folder for the two large ones
//! (`attention`: flash attention over packed varlen sequences, its backward and KV-cache decode;
//! `logprob`: the lm_head fused with the log-softmax, never a [tokens × vocab] tensor). Each holds
//! the op's plain-Rust CPU reference (a `cpu` submodule, generic over `Real`, so f64 drives the
//! finite-difference checks; the CPU backend runs it in f32) and its CUDA launcher (kernels in
//! `kernels/`; `matmul` calls cuBLAS), behind one function per direction that dispatches on the
//! `Device`.
//!
//! `act` (SwiGLU, GELUs), `adamw` (fused step, clipping's sum of squares), `elementwise` (bias,
//! residual, scale, casts, copies), `embedding`, `grpo` (turn-aware rewards and the clipped
//! surrogate + KL loss), `init` (counter-based random init), `layernorm`, `lora` (the adapter
//! branch), `matmul`, `patch_embed` (Qwen2.5-VL's Conv3d as a GEMM), `rmsnorm`, `rope`, `sample`
//! (top-k/top-p sampling on the device). Below: the dtype and length checks the launchers share.
//!
//! Gradient convention (llm.c): activation gradients are written (`=`); parameter gradients are
//! f32 and accumulated (`+=`), so gradient accumulation across micro-batches is free.

pub mod act;
pub mod adamw;
pub mod attention;
pub mod elementwise;
pub mod embedding;
pub mod grpo;
pub mod init;
pub mod layernorm;
pub mod logprob;
pub mod lora;
pub mod matmul;
pub mod patch_embed;
pub mod rmsnorm;
pub mod rope;
pub mod sample;

use crate::tensor::{Buf, DType};
use anyhow::{bail, Result};

/// All buffers given must share one float dtype; returns it.
pub fn same_float_dtype(what: &str, bufs: &[&Buf]) -> Result<DType> {
    let d = bufs[0].dtype();
    if d == DType::I32 {
        bail!("{what}: expected a float buffer, got i32");
    }
    for b in bufs {
        if b.dtype() != d {
            bail!("{what}: mixed dtypes {} and {}", d.suffix(), b.dtype().suffix());
        }
    }
    Ok(d)
}

/// Checks a buffer's length, naming the op and the argument.
pub fn check(buf: &Buf, n: usize, op: &str, arg: &str) -> Result<()> {
    if buf.len() != n {
        bail!("{op}: {arg} has {} elements, expected {n}", buf.len());
    }
    Ok(())
}

/// Checks a buffer's dtype.
pub fn check_dtype(buf: &Buf, d: DType, op: &str, arg: &str) -> Result<()> {
    if buf.dtype() != d {
        bail!("{op}: {arg} is {}, expected {}", buf.dtype().suffix(), d.suffix());
    }
    Ok(())
}
