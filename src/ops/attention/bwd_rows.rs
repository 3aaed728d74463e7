//! The per-row launches the V3 and V4 backwards share (kernels/attention_bwd_rows.cuh, compiled
//! into each of their modules): D = rowsum(dO∘O) before the main kernel, and the f32 dQ
//! accumulator rounded to bf16 after it.

use super::AttnShape;
use crate::cuda::{cfg_1d, Arg, Gpu};
use crate::tensor::{Buf, Device};
use anyhow::Result;

/// dvec [hq, T] (f32): D[h, t] = dout·out of row (t, h), the softmax-backward correction term.
pub(super) fn rowdot(
    dev: &Device, g: &Gpu, module: &'static str, dout: &Buf, out: &Buf, t: usize, s: &AttnShape,
) -> Result<Buf> {
    let dvec = dev.zeros_f32(s.hq * t)?;
    let args = [
        Arg::Ptr(dvec.ptr(g)?),
        Arg::Ptr(dout.ptr(g)?),
        Arg::Ptr(out.ptr(g)?),
        Arg::I32(t as i32),
        Arg::I32(s.hq as i32),
        Arg::I32(s.d as i32),
    ];
    g.launch(module, "attention_bwd_rowdot_bf16", cfg_1d(t * s.hq, 256), &args)?;
    Ok(dvec)
}

/// dq [T, hq, d] (bf16, =) = dq_acc rounded; d is a multiple of 8.
pub(super) fn round_dq(
    g: &Gpu, module: &'static str, dq: &mut Buf, dq_acc: &Buf, t: usize, s: &AttnShape,
) -> Result<()> {
    let n8 = t * s.hq * s.d / 8;
    let args = [Arg::Ptr(dq.ptr(g)?), Arg::Ptr(dq_acc.ptr(g)?), Arg::I64(n8 as i64)];
    g.launch(module, "attention_bwd_dq_round_bf16", cfg_1d(n8, 256), &args)
}
