//! Fused attention (FlashAttention-style: online softmax, no S×S matrix in memory) for training
//! and the vision tower's windows, over variable-length packed sequences; decode over a KV cache
//! lives in `decode`. CPU reference in `cpu`.
//!
//! Layouts: q/out [T, hq, d], k/v [T, hkv, d] (the tokens of all sequences packed, row-major),
//! lse [hq, T] f32 (natural log, saved for backward). Sequence b owns tokens
//! cu[b]..cu[b+1] (`Varlen`). Causal: token i of a sequence attends to tokens 0..=i of the same
//! sequence; non-causal (vision windows): to every token of its sequence. GQA: query head h
//! reads kv head h / (hq/hkv).
//!
//! CUDA kernels, one file per role: kernels/attention_fwd.cu (`fwd`), attention_bwd.cu (`bwd`),
//! attention_decode.cu (`decode`), and attention_simple.cu (one warp per row on CUDA cores, exact
//! f32 math: f32, other head dims, misaligned buffers). Which kernel a call takes is decided by
//! one plan function per op (`plan_fwd`, `plan_bwd`, `plan_decode`) from the dtype, head dim,
//! lengths and alignment alone, by the H200 measurements in PERF-attention.md; the plain calls
//! take the plan, the `*_with` calls (tests, bench) an explicit kernel.
//!
//! Buffers travel grouped by role (`Qkv`, `FwdOut`, `FwdSaved`, `QkvGrads`; `cpu::HostCache` for a
//! cache's host view), the same structs over `Buf` for the ops and over slices for the CPU reference.

mod bwd;
pub mod cpu;
pub mod decode;
mod fwd;

pub use bwd::bwd_with;
pub use decode::{decode, decode_varlen, decode_with, KvCache};
pub use fwd::fwd_with;

use super::{check, check_dtype};
use crate::cuda::{cfg_1d, Gpu};
use crate::tensor::{Buf, DType, Device};
use anyhow::{bail, Result};
use cudarc::driver::LaunchConfig;

/// Head count, head dim, masking and softmax scale (usually 1/√d).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnShape {
    pub hq: usize,
    pub hkv: usize,
    pub d: usize,
    pub causal: bool,
    pub scale: f32,
}

impl AttnShape {
    /// The usual scale 1/√d.
    pub fn new(hq: usize, hkv: usize, d: usize, causal: bool) -> Self {
        Self { hq, hkv, d, causal, scale: 1.0 / (d as f32).sqrt() }
    }

    fn validate(&self, op: &str) -> Result<()> {
        if self.hq == 0 || self.hkv == 0 || self.d == 0 {
            bail!("{op}: hq, hkv and d must be positive (got {self:?})");
        }
        if !self.hq.is_multiple_of(self.hkv) {
            bail!("{op}: hq = {} is not a multiple of hkv = {}", self.hq, self.hkv);
        }
        if !(self.scale.is_finite() && self.scale > 0.0) {
            bail!("{op}: scale must be finite and positive (got {})", self.scale);
        }
        Ok(())
    }
}

/// A forward's inputs: q [T, hq, d], k, v [T, hkv, d]. `B` is `Buf` for the ops and `[R]` for the
/// CPU reference (as in the other structs below).
pub struct Qkv<'a, B: ?Sized = Buf> {
    pub q: &'a B,
    pub k: &'a B,
    pub v: &'a B,
}

/// A forward's outputs: out [T, hq, d], lse [hq, T] (f32).
pub struct FwdOut<'a, B: ?Sized = Buf> {
    pub out: &'a mut B,
    pub lse: &'a mut B,
}

/// What the backward reads of its forward: the inputs and the saved out and lse.
pub struct FwdSaved<'a, B: ?Sized = Buf> {
    pub q: &'a B,
    pub k: &'a B,
    pub v: &'a B,
    pub out: &'a B,
    pub lse: &'a B,
}

/// A backward's outputs: dq [T, hq, d], dk, dv [T, hkv, d].
pub struct QkvGrads<'a, B: ?Sized = Buf> {
    pub dq: &'a mut B,
    pub dk: &'a mut B,
    pub dv: &'a mut B,
}

// Copy by hand: a derive would require `B: Copy`, which `[R]` is not.
impl<B: ?Sized> Clone for Qkv<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: ?Sized> Copy for Qkv<'_, B> {}
impl<B: ?Sized> Clone for FwdSaved<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: ?Sized> Copy for FwdSaved<'_, B> {}

impl<'a, B: ?Sized> FwdSaved<'a, B> {
    /// The forward's inputs.
    pub fn qkv(&self) -> Qkv<'a, B> {
        Qkv { q: self.q, k: self.k, v: self.v }
    }
}

/// Cumulative sequence offsets of a packed batch, on the host (validation, launch sizing) and
/// on the device (the kernels): sequence b owns tokens host[b]..host[b+1].
pub struct Varlen {
    pub host: Vec<i32>, // [nseq + 1]
    pub buf: Buf,       // [nseq + 1] i32
    pub max_len: usize,
}

/// The longest segment of valid cu_seqlens (see `Varlen::new`).
fn longest_segment(cu: &[i32]) -> Result<usize> {
    if cu.len() < 2 {
        bail!("cu_seqlens needs at least 2 entries (one sequence), got {}", cu.len());
    }
    if cu[0] != 0 {
        bail!("cu_seqlens[0] must be 0, got {}", cu[0]);
    }
    let mut max_len = 0usize;
    for (i, w) in cu.windows(2).enumerate() {
        if w[1] < w[0] {
            bail!("cu_seqlens is not monotone: cu[{}] = {} > cu[{}] = {}", i, w[0], i + 1, w[1]);
        }
        max_len = max_len.max((w[1] - w[0]) as usize);
    }
    Ok(max_len)
}

impl Varlen {
    /// Checks cu_seqlens: at least one sequence, cu[0] = 0, non-decreasing (empty sequences are allowed).
    pub fn new(dev: &Device, cu: &[i32]) -> Result<Varlen> {
        let max_len = longest_segment(cu)?;
        Ok(Varlen { host: cu.to_vec(), buf: dev.upload_i32(cu)?, max_len })
    }

    /// Overwrites the offsets in place, with `new`'s checks, within the device copy's capacity:
    /// the rollout step's offsets without a new allocation.
    pub fn refill(&mut self, dev: &Device, cu: &[i32]) -> Result<()> {
        let max_len = longest_segment(cu)?;
        self.buf.write_i32(dev, cu)?;
        self.host.clear();
        self.host.extend_from_slice(cu);
        self.max_len = max_len;
        Ok(())
    }

    /// Equal-length sequences: nseq sequences of len tokens.
    pub fn uniform(dev: &Device, nseq: usize, len: usize) -> Result<Varlen> {
        let cu: Vec<i32> = (0..=nseq).map(|i| (i * len) as i32).collect();
        Varlen::new(dev, &cu)
    }

    pub fn nseq(&self) -> usize {
        self.host.len() - 1
    }

    /// Total tokens T.
    pub fn total(&self) -> usize {
        *self.host.last().unwrap_or(&0) as usize
    }
}

/// Rows per tile of the tensor-core kernels (queries per forward block, keys per backward block).
const TILE: usize = 64;

/// The kernel of a training/vision forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnFwdKernel {
    /// attention_simple_fwd: one warp per query row, any dtype and head dim.
    Simple,
    /// attention_fwd_q64: 64 query rows per block (4 warps × 16 rows).
    Q64,
    /// attention_fwd_q128: 128 query rows per block (4 warps × 32 rows, FA2's layout), two-stage
    /// K/V ring.
    Q128,
}

/// The kernels of a training/vision backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnBwdKernel {
    /// attention_simple_bwd_dq / _dkv: one warp per row, any dtype and head dim.
    Simple,
    /// attention_bwd_qhead: 64 keys of one (sequence, q head) per block; with GQA, f32 dK/dV
    /// partials per q head summed by attention_bwd_finish.
    QHead,
    /// attention_bwd_kvhead: 64 keys of one (sequence, kv head) per block walking the GQA group
    /// (dK/dV summed in registers), FA2's 2 × 2 warp tiles.
    KvHead,
}

/// The kernel of a decode step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnDecodeKernel {
    /// attention_simple_decode: one warp per query row, any dtype and head dim.
    Simple,
    /// attention_decode: split-K, 64 query rows (n_new × group) per block, any row count.
    Rows64,
    /// attention_decode16: split-K, at most 16 query rows per (sequence, kv head), the keys of each
    /// tile split over the 4 warps; partial buffers kept in the cache.
    Rows16,
}

/// Whether the bf16 tensor-core kernels can take a call: bf16, d ∈ {64, 80, 128}, every buffer
/// 16-byte aligned (cp.async and 16-byte vector loads).
fn tc_ok(dtype: DType, d: usize, aligned: bool) -> bool {
    dtype == DType::BF16 && tc_head_dim(d) && aligned
}

/// The forward kernel for a batch whose longest sequence has `max_len` tokens. Q128 for
/// sequences over 64 tokens (348 TFLOP/s against 198 for Q64 at causal GQA d128 S=4096);
/// Q64 for windows (52 vs 53 TFLOP/s for the alternatives measured: equal). PERF-attention.md,
/// round 4.
pub fn plan_fwd(dtype: DType, d: usize, max_len: usize, aligned: bool) -> AttnFwdKernel {
    match (tc_ok(dtype, d, aligned), max_len > TILE) {
        (false, _) => AttnFwdKernel::Simple,
        (true, true) => AttnFwdKernel::Q128,
        (true, false) => AttnFwdKernel::Q64,
    }
}

/// The backward kernels. KvHead for sequences over 64 tokens (5.66 ms against 6.70 for QHead at
/// causal GQA 28/4 d128 S=4096; 0.72 vs 0.98 ms at d64, 0.44 vs 0.53 at d80); QHead for windows
/// (0.113 vs 0.117 ms). PERF-attention.md, round 5. `aligned`: q, k, v, dout, dq, dk, dv and out
/// all 16-byte aligned (`bwd` falls back to QHead when only `out` is not: QHead does not read
/// it with vector loads).
pub fn plan_bwd(dtype: DType, d: usize, max_len: usize, aligned: bool) -> AttnBwdKernel {
    match (tc_ok(dtype, d, aligned), max_len > TILE) {
        (false, _) => AttnBwdKernel::Simple,
        (true, true) => AttnBwdKernel::KvHead,
        (true, false) => AttnBwdKernel::QHead,
    }
}

/// The decode kernel for `n_new` new tokens per sequence and a GQA group of `group` q heads per
/// kv head. Rows16 when the (sequence, kv head) has at most 16 query rows (78 % / 75 % of 4.2 TB/s
/// against 44 % / 41 % for Rows64 at one new token, PERF-attention.md round 3); Rows64 otherwise.
pub fn plan_decode(dtype: DType, d: usize, n_new: usize, group: usize, aligned: bool) -> AttnDecodeKernel {
    match (tc_ok(dtype, d, aligned), n_new * group <= 16) {
        (false, _) => AttnDecodeKernel::Simple,
        (true, true) => AttnDecodeKernel::Rows16,
        (true, false) => AttnDecodeKernel::Rows64,
    }
}

/// The plans for one model's attention shapes, for `am3 info`: (what, kernel) lines for the
/// training forward and backward at `train_len` tokens, the vision tower's forward and backward
/// (windows of `vis_len` tokens), and decode of one new token (bf16, aligned buffers).
pub fn plan_lines(
    lm: (usize, usize, usize), train_len: usize, vision: (usize, usize), vis_len: usize,
) -> Vec<(String, String)> {
    let (hq, hkv, d) = lm;
    let (vh, vd) = vision;
    let bf = DType::BF16;
    vec![
        (
            format!("LM fwd, {hq}/{hkv} heads d{d}, {train_len} tokens"),
            format!("{:?}", plan_fwd(bf, d, train_len, true)),
        ),
        ("LM bwd, same".to_string(), format!("{:?}", plan_bwd(bf, d, train_len, true))),
        ("LM decode, 1 new token".to_string(), format!("{:?}", plan_decode(bf, d, 1, hq / hkv, true))),
        (
            format!("vision fwd, {vh} heads d{vd}, {vis_len}-token sequences"),
            format!("{:?}", plan_fwd(bf, vd, vis_len, true)),
        ),
        ("vision bwd, same".to_string(), format!("{:?}", plan_bwd(bf, vd, vis_len, true))),
    ]
}

/// The head dims with tensor-core kernels.
fn tc_head_dim(d: usize) -> bool {
    matches!(d, 64 | 80 | 128)
}

/// Every pointer 16-byte aligned (cp.async and 16-byte vector loads need it).
fn aligned16(g: &Gpu, bufs: &[&Buf]) -> Result<bool> {
    for b in bufs {
        if b.ptr(g)? % 16 != 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// An error for an explicit tensor-core kernel that cannot take the call.
fn check_tc(op: &str, kernel: impl std::fmt::Debug, dtype: DType, d: usize, aligned: bool) -> Result<()> {
    if !tc_ok(dtype, d, aligned) {
        bail!("{op}: kernel {kernel:?} needs bf16, d ∈ {{64, 80, 128}} and 16-byte aligned buffers (got {}, d = {d}, aligned = {aligned})", dtype.suffix());
    }
    Ok(())
}

/// Warp-per-row launch: `rows` warps in blocks of 4 warps.
fn cfg_warps(rows: usize) -> LaunchConfig {
    cfg_1d(rows * 32, 128)
}

/// Checks the packed-batch buffers shared by fwd and bwd; returns T.
fn check_packed(op: &str, x: Qkv, seqs: &Varlen, s: &AttnShape) -> Result<usize> {
    let Qkv { q, k, v } = x;
    s.validate(op)?;
    let t = seqs.total();
    check(q, t * s.hq * s.d, op, "q")?;
    check(k, t * s.hkv * s.d, op, "k")?;
    check(v, t * s.hkv * s.d, op, "v")?;
    check(&seqs.buf, seqs.host.len(), op, "cu_seqlens buf")?;
    check_dtype(&seqs.buf, DType::I32, op, "cu_seqlens buf")?;
    if s.d > 256 {
        bail!("{op}: head dim {} > 256 is not supported", s.d);
    }
    if t * s.hq * s.d >= i32::MAX as usize {
        bail!("{op}: {t} tokens × {} heads × {} exceed the 2^31 elements the kernels index", s.hq, s.d);
    }
    Ok(t)
}

/// out [T, hq, d] (=), lse [hq, T] (f32, =) = softmax(q·kᵀ·scale)·v over each sequence of `seqs`.
pub fn fwd(dev: &Device, o: FwdOut, x: Qkv, seqs: &Varlen, s: &AttnShape) -> Result<()> {
    let kernel = match dev {
        Device::Cpu => AttnFwdKernel::Simple,
        Device::Cuda(g) => plan_fwd(x.q.dtype(), s.d, seqs.max_len, aligned16(g, &[&*o.out, x.q, x.k, x.v])?),
    };
    fwd_with(dev, o, x, seqs, s, kernel)
}

/// dq [T, hq, d], dk, dv [T, hkv, d] (all activation dtype, =) from dout and the forward's out and lse.
pub fn bwd(dev: &Device, grads: QkvGrads, dout: &Buf, x: FwdSaved, seqs: &Varlen, s: &AttnShape) -> Result<()> {
    let kernel = match dev {
        Device::Cpu => AttnBwdKernel::Simple,
        Device::Cuda(g) => {
            let (dq, dk, dv) = (&*grads.dq, &*grads.dk, &*grads.dv);
            let aligned = aligned16(g, &[dq, dk, dv, dout, x.q, x.k, x.v])?;
            match plan_bwd(x.q.dtype(), s.d, seqs.max_len, aligned && aligned16(g, &[x.out])?) {
                AttnBwdKernel::Simple if tc_ok(x.q.dtype(), s.d, aligned) => AttnBwdKernel::QHead,
                k => k,
            }
        }
    };
    bwd_with(dev, grads, dout, x, seqs, s, kernel)
}

/// Grid limits of the tensor-core launches (y = heads, z = sequences).
fn check_grid(op: &str, seqs: &Varlen, s: &AttnShape) -> Result<()> {
    if seqs.nseq() > 65535 || s.hq > 65535 || seqs.max_len.div_ceil(TILE) > 65535 {
        bail!("{op}: {} sequences × {} heads × {} tokens exceed the grid limits (65535 sequences, heads and 64-token tiles)", seqs.nseq(), s.hq, seqs.max_len);
    }
    Ok(())
}
