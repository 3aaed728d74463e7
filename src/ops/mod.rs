//! One file per op. Each holds the op's CPU reference (`cpu` submodule, generic over `Real`, so
//! f64 drives the finite-difference checks) and its CUDA launcher, behind one function per
//! direction that dispatches on the `Device`.
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

/// Kernel symbol for a float dtype: `<base>_bf16` or `<base>_f32`.
pub fn kname(base: &str, dtype: DType) -> String {
    format!("{base}_{}", dtype.suffix())
}

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
