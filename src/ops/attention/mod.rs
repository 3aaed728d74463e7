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
//! CUDA paths:
//! - bf16 with d ∈ {64, 80, 128}: tensor-core kernels (kernels/attention.cu; mma.sync m16n8k16,
//!   f32 accumulate). Backward FA2-style: dK/dV per KV tile in registers, dQ by f32 atomics.
//! - anything else (f32, other head dims, or `AM3_ATTN_SIMPLE=1`): one-warp-per-row kernels
//!   on CUDA cores (kernels/attention_simple.cu), exact f32 math, used by the f32 tests.
//! - `Variant::V2` (explicit `*_with` argument, or `AM3_ATTN_V2=1` for the plain calls): the
//!   kernels of kernels/attention_v2.cu where they apply — the forward with 128-row query tiles
//!   and a two-stage K/V ring (sequences longer than 64 tokens), the forward of windows (all
//!   sequences ≤ 64 tokens) by persistent blocks that prefetch the next (sequence, head), and
//!   decode with 16-row query tiles split over the warps by keys (n_new · group ≤ 16), and the
//!   GQA backward with the group inside the block (dK/dV summed in registers, no f32 partials).
//!   Same results; the default is chosen by measurement.
//! - `Variant::V3` (`AM3_ATTN_V2=3`): the forward of kernels/attention_v3.cu for sequences longer
//!   than 64 tokens (`v3_fwd`: 128-row tiles of 4 warps × 32 rows); windows as V2.
//!   The backward of kernels/attention_v3_bwd.cu for sequences longer than 64 tokens (`v3_bwd`:
//!   128-key blocks of 8 warps walking the GQA group, dK/dV summed in registers, dQ by atomics);
//!   windows (every sequence ≤ 64 tokens) as V1.
//! - `Variant::V4` (`AM3_ATTN_V2=4`): the forward of V3; the backward of kernels/attention_v4_bwd.cu
//!   (`v4_bwd`: V2's 64-key blocks walking the GQA group, with FA2's 2 × 2 warp tiles and P/dS
//!   through shared memory) for every bf16 tensor-core shape, windows included.

mod bwd_rows;
pub mod cpu;
pub mod decode;
mod v3_bwd;
mod v3_fwd;
mod v4_bwd;

pub use decode::{decode, decode_varlen, decode_with, KvCache};

use super::{check, check_dtype, kname, same_float_dtype};
use crate::cuda::{cfg_1d, Arg, Gpu};
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

/// Which generation of the tensor-core kernels a call takes (the bench times both).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// The verified kernels of attention.cu / attention_decode.cu.
    V1,
    /// kernels/attention_v2.cu where it applies (else V1): 128-row forward tiles with a K/V
    /// ring; a persistent, prefetching forward for windows (≤ 64 tokens); the GQA backward
    /// with the group inside the block; decode with the keys split over the warps for ≤ 16
    /// query rows per kv head.
    V2,
    /// Forward: kernels/attention_v3.cu for sequences > 64 tokens (128-row tiles of 4 warps ×
    /// 32 rows, see `v3_fwd`), V2's window kernel otherwise. Backward: see `bwd_with`. Decode:
    /// as V1 (`decode_with` takes V2's kernel only for `Variant::V2`).
    V3,
    /// Forward: as V3. Backward: kernels/attention_v4_bwd.cu (see `bwd_with`). Decode: as V1.
    V4,
}

impl Variant {
    /// `AM3_ATTN_V2=1` forces V2 everywhere, `AM3_ATTN_V2=3` V3, `AM3_ATTN_V2=4` V4 (V3's forward,
    /// V4's backward), `AM3_ATTN_V2=0` V1; unset: None
    /// (the per-op defaults below, chosen by the H200 measurements in PERF.md, run 4).
    pub fn from_env() -> Option<Variant> {
        match std::env::var("AM3_ATTN_V2").as_deref() {
            Ok("1") => Some(Variant::V2),
            Ok("3") => Some(Variant::V3),
            Ok("4") => Some(Variant::V4),
            Ok("0") => Some(Variant::V1),
            _ => None,
        }
    }
    /// Forward: V3 (FA2 layout, 4 warps × 32 rows) for sequences longer than 64 tokens: 348
    /// TFLOP/s vs V2's 217 at causal GQA d128 S=4096, 214 vs 122 at d64, 212 vs 144 at d80
    /// (H200, PERF-attention.md round 4); V1 for windows (52 vs 53 for V3's window path: equal).
    pub fn default_fwd(max_len: usize) -> Variant {
        Self::from_env().unwrap_or(if max_len > 64 { Variant::V3 } else { Variant::V1 })
    }
    /// Backward: V4 (FA2's 2×2 warp tiling on V2's 64-key GQA blocks) for sequences longer than
    /// 64 tokens: 5.66 ms vs V2's 6.15, V1's 6.70 and V3's 7.64 at causal GQA 28/4 d128 S=4096;
    /// 0.72 vs 0.98 ms at d64 and 0.44 vs 0.52 at d80 (H200, PERF-attention.md round 5). V1 for
    /// windows (0.113 vs 0.117 ms: equal).
    pub fn default_bwd(max_len: usize) -> Variant {
        Self::from_env().unwrap_or(if max_len > 64 { Variant::V4 } else { Variant::V1 })
    }
    /// Decode: V2 (78 % vs 44 % of 4.2 TB/s).
    pub fn default_decode() -> Variant {
        Self::from_env().unwrap_or(Variant::V2)
    }
}

/// Query rows per block of the V2 forward.
const TILE_V2: usize = 128;

/// The head dims with tensor-core kernels.
fn tc_head_dim(d: usize) -> bool {
    matches!(d, 64 | 80 | 128)
}

/// Whether the bf16 tensor-core path is allowed (`AM3_ATTN_SIMPLE=1` forces the simple kernels).
fn tc_enabled() -> bool {
    !std::env::var("AM3_ATTN_SIMPLE").is_ok_and(|v| v == "1")
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

/// Shared memory of the tensor-core forward: Q, K, V tiles of 64 rows, rows padded by 8 elements.
fn fwd_smem(d: usize) -> u32 {
    (3 * TILE * (d + 8) * 2) as u32
}

/// Shared memory of the V2 forward: a 128-row Q tile and two stages of 64-row K and V tiles.
fn fwd_v2_smem(d: usize) -> u32 {
    ((TILE_V2 + 4 * TILE) * (d + 8) * 2) as u32
}

/// Shared memory of the V2 window forward: two buffers of 64-row Q, K and V tiles.
fn win_smem(d: usize) -> u32 {
    (6 * TILE * (d + 8) * 2) as u32
}

/// Shared memory of the tensor-core backward: K, V, Q, dO tiles, the dSᵀ tile and lse/D rows.
fn bwd_smem(d: usize) -> u32 {
    (4 * TILE * (d + 8) * 2 + TILE * (TILE + 8) * 2 + 2 * TILE * 4) as u32
}

/// Warp-per-row launch: `rows` warps in blocks of 4 warps.
fn cfg_warps(rows: usize) -> LaunchConfig {
    cfg_1d(rows * 32, 128)
}

/// Checks the packed-batch buffers shared by fwd and bwd; returns T.
fn check_packed(op: &str, q: &Buf, k: &Buf, v: &Buf, seqs: &Varlen, s: &AttnShape) -> Result<usize> {
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
#[allow(clippy::too_many_arguments)]
pub fn fwd(
    dev: &Device, out: &mut Buf, lse: &mut Buf, q: &Buf, k: &Buf, v: &Buf, seqs: &Varlen, s: &AttnShape,
) -> Result<()> {
    fwd_with(dev, out, lse, q, k, v, seqs, s, Variant::default_fwd(seqs.max_len))
}

/// `fwd` with an explicit kernel variant (the bench and tests run both).
#[allow(clippy::too_many_arguments)]
pub fn fwd_with(
    dev: &Device, out: &mut Buf, lse: &mut Buf, q: &Buf, k: &Buf, v: &Buf, seqs: &Varlen, s: &AttnShape,
    variant: Variant,
) -> Result<()> {
    let op = "attention_fwd";
    let t = check_packed(op, q, k, v, seqs, s)?;
    check(out, t * s.hq * s.d, op, "out")?;
    check(lse, s.hq * t, op, "lse")?;
    check_dtype(lse, DType::F32, op, "lse")?;
    match dev {
        Device::Cpu => {
            cpu::fwd(out.host_mut()?, lse.host_mut()?, q.host()?, k.host()?, v.host()?, &seqs.host, s);
            Ok(())
        }
        Device::Cuda(g) => {
            let dt = same_float_dtype(op, &[out, q, k, v])?;
            if t == 0 {
                return Ok(());
            }
            let nseq = seqs.nseq();
            let base = [
                Arg::Ptr(out.ptr(g)?),
                Arg::Ptr(lse.ptr(g)?),
                Arg::Ptr(q.ptr(g)?),
                Arg::Ptr(k.ptr(g)?),
                Arg::Ptr(v.ptr(g)?),
                Arg::Ptr(seqs.buf.ptr(g)?),
            ];
            if use_tc(g, dt, s.d, &[out, q, k, v])? {
                check_grid(op, seqs, s)?;
                let mut args = base.to_vec();
                args.extend([
                    Arg::I32(t as i32),
                    Arg::I32(s.hq as i32),
                    Arg::I32(s.hkv as i32),
                    Arg::F32(s.scale * std::f32::consts::LOG2_E),
                    Arg::I32(s.causal as i32),
                ]);
                // V3: sequences longer than one tile (windows take V2's kernel below).
                if matches!(variant, Variant::V3 | Variant::V4) && seqs.max_len > TILE {
                    return v3_fwd::launch(g, &args, seqs, s);
                }
                // Windows (every sequence ≤ 64 tokens): persistent blocks that prefetch the next
                // (sequence, head) item; longer sequences: 128-row tiles with a K/V ring.
                if matches!(variant, Variant::V2 | Variant::V3 | Variant::V4)
                    && seqs.max_len <= TILE
                    && nseq * s.hq < i32::MAX as usize
                {
                    let items = nseq * s.hq;
                    let smem = win_smem(s.d);
                    // Resident blocks per SM: 228 KiB of shared memory (1 KiB reserved per
                    // block), and at most 3 by registers (≤ 144 per thread at 128 threads).
                    let per_sm = (233_472 / (smem as usize + 1024)).clamp(1, 3);
                    let blocks = items.min(per_sm * g.sm_count as usize).max(1);
                    let cfg = LaunchConfig {
                        grid_dim: (blocks as u32, 1, 1),
                        block_dim: (128, 1, 1),
                        shared_mem_bytes: smem,
                    };
                    let mut args = base.to_vec();
                    args.extend([
                        Arg::I32(nseq as i32),
                        Arg::I32(t as i32),
                        Arg::I32(s.hq as i32),
                        Arg::I32(s.hkv as i32),
                        Arg::F32(s.scale * std::f32::consts::LOG2_E),
                        Arg::I32(s.causal as i32),
                    ]);
                    return g.launch("attention_v2", &format!("attention_win_bf16_d{}", s.d), cfg, &args);
                }
                if variant == Variant::V2 {
                    let cfg = LaunchConfig {
                        grid_dim: (seqs.max_len.div_ceil(TILE_V2) as u32, s.hq as u32, nseq as u32),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: fwd_v2_smem(s.d),
                    };
                    return g.launch("attention_v2", &format!("attention_fwd128_bf16_d{}", s.d), cfg, &args);
                }
                let cfg = LaunchConfig {
                    grid_dim: (seqs.max_len.div_ceil(TILE) as u32, s.hq as u32, nseq as u32),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: fwd_smem(s.d),
                };
                g.launch("attention", &format!("attention_fwd_bf16_d{}", s.d), cfg, &args)
            } else {
                let mut args = base.to_vec();
                args.extend(simple_dims(nseq, t, s));
                g.launch("attention_simple", &kname("attention_simple_fwd", dt), cfg_warps(t * s.hq), &args)
            }
        }
    }
}

/// dq [T, hq, d], dk, dv [T, hkv, d] (all activation dtype, =) from dout and the forward's out and lse.
#[allow(clippy::too_many_arguments)]
pub fn bwd(
    dev: &Device, dq: &mut Buf, dk: &mut Buf, dv: &mut Buf, dout: &Buf, q: &Buf, k: &Buf, v: &Buf, out: &Buf,
    lse: &Buf, seqs: &Varlen, s: &AttnShape,
) -> Result<()> {
    bwd_with(dev, dq, dk, dv, dout, q, k, v, out, lse, seqs, s, Variant::default_bwd(seqs.max_len))
}

/// `bwd` with an explicit kernel variant (the bench and tests run both).
#[allow(clippy::too_many_arguments)]
pub fn bwd_with(
    dev: &Device, dq: &mut Buf, dk: &mut Buf, dv: &mut Buf, dout: &Buf, q: &Buf, k: &Buf, v: &Buf, out: &Buf,
    lse: &Buf, seqs: &Varlen, s: &AttnShape, variant: Variant,
) -> Result<()> {
    let op = "attention_bwd";
    let t = check_packed(op, q, k, v, seqs, s)?;
    for (b, n, a) in [
        (&*dq, t * s.hq * s.d, "dq"),
        (&*dk, t * s.hkv * s.d, "dk"),
        (&*dv, t * s.hkv * s.d, "dv"),
        (dout, t * s.hq * s.d, "dout"),
        (out, t * s.hq * s.d, "out"),
        (lse, s.hq * t, "lse"),
    ] {
        check(b, n, op, a)?;
    }
    check_dtype(lse, DType::F32, op, "lse")?;
    match dev {
        Device::Cpu => {
            let (q, k, v, o, l, d_o) = (q.host()?, k.host()?, v.host()?, out.host()?, lse.host()?, dout.host()?);
            cpu::bwd(dq.host_mut()?, dk.host_mut()?, dv.host_mut()?, d_o, q, k, v, o, l, &seqs.host, s);
            Ok(())
        }
        Device::Cuda(g) => {
            let dt = same_float_dtype(op, &[dq, dk, dv, dout, q, k, v, out])?;
            if t == 0 {
                return Ok(());
            }
            // V3: sequences longer than one tile (the 128-key blocks would idle half their warps
            // on windows, which keep V1's kernel below). It computes its own D.
            if variant == Variant::V3 && seqs.max_len > TILE && use_tc(g, dt, s.d, &[dq, dk, dv, dout, q, k, v, out])? {
                check_grid(op, seqs, s)?;
                return v3_bwd::bwd(dev, g, dq, dk, dv, dout, q, k, v, out, lse, seqs, s, t);
            }
            // V4: every bf16 tensor-core shape (one block per 64 keys, as V1/V2). It computes its own D.
            if variant == Variant::V4 && use_tc(g, dt, s.d, &[dq, dk, dv, dout, q, k, v, out])? {
                check_grid(op, seqs, s)?;
                return v4_bwd::bwd(dev, g, dq, dk, dv, dout, q, k, v, out, lse, seqs, s, t);
            }
            let nseq = seqs.nseq();
            // D[h, t] = dout·out per row, the softmax-backward correction term.
            let dvec = dev.zeros_f32(s.hq * t)?;
            let args = [
                Arg::Ptr(dvec.ptr(g)?),
                Arg::Ptr(dout.ptr(g)?),
                Arg::Ptr(out.ptr(g)?),
                Arg::I32(t as i32),
                Arg::I32(s.hq as i32),
                Arg::I32(s.d as i32),
            ];
            g.launch("attention_simple", &kname("attention_bwd_dot", dt), cfg_warps(t * s.hq), &args)?;
            let inputs = [
                Arg::Ptr(q.ptr(g)?),
                Arg::Ptr(k.ptr(g)?),
                Arg::Ptr(v.ptr(g)?),
                Arg::Ptr(dout.ptr(g)?),
                Arg::Ptr(lse.ptr(g)?),
                Arg::Ptr(dvec.ptr(g)?),
                Arg::Ptr(seqs.buf.ptr(g)?),
            ];
            if use_tc(g, dt, s.d, &[dq, dk, dv, dout, q, k, v])? {
                check_grid(op, seqs, s)?;
                let grp = s.hq / s.hkv;
                if variant == Variant::V2 && grp > 1 {
                    // One block per (key tile, kv head) walking the group's q heads: dK/dV are
                    // summed in registers and written as bf16, no partials; dQ as in V1.
                    let dq_acc = dev.zeros_f32(t * s.hq * s.d)?;
                    let mut args = vec![Arg::Ptr(dq_acc.ptr(g)?), Arg::Ptr(dk.ptr(g)?), Arg::Ptr(dv.ptr(g)?)];
                    args.extend(inputs);
                    args.extend([
                        Arg::I32(t as i32),
                        Arg::I32(s.hq as i32),
                        Arg::I32(s.hkv as i32),
                        Arg::F32(s.scale),
                        Arg::F32(s.scale * std::f32::consts::LOG2_E),
                        Arg::I32(s.causal as i32),
                    ]);
                    let cfg = LaunchConfig {
                        // Causal: (kv heads, sequences, key tiles), longest first; else (key
                        // tiles, kv heads, sequences) (see the kernel).
                        grid_dim: if s.causal {
                            (s.hkv as u32, nseq as u32, seqs.max_len.div_ceil(TILE) as u32)
                        } else {
                            (seqs.max_len.div_ceil(TILE) as u32, s.hkv as u32, nseq as u32)
                        },
                        block_dim: (128, 1, 1),
                        shared_mem_bytes: bwd_smem(s.d),
                    };
                    g.launch("attention_v2", &format!("attention_bwdg_bf16_d{}", s.d), cfg, &args)?;
                    let args = [
                        Arg::Ptr(dq.ptr(g)?),
                        Arg::Ptr(dk.ptr(g)?),
                        Arg::Ptr(dv.ptr(g)?),
                        Arg::Ptr(dq_acc.ptr(g)?),
                        Arg::Ptr(0),
                        Arg::Ptr(0),
                        Arg::I32(t as i32),
                        Arg::I32(s.hq as i32),
                        Arg::I32(s.hkv as i32),
                        Arg::I32(s.d as i32),
                        Arg::I32(0),
                    ];
                    return g.launch("attention", "attention_bwd_finish_bf16", cfg_1d(t * s.hq * s.d, 256), &args);
                }
                // dQ accumulates in f32 across KV blocks; with GQA each q head writes its own
                // dK/dV partial [T, hq, d] (f32) and the finish kernel sums the group.
                let dq_acc = dev.zeros_f32(t * s.hq * s.d)?;
                let parts =
                    if grp > 1 { Some((dev.zeros_f32(t * s.hq * s.d)?, dev.zeros_f32(t * s.hq * s.d)?)) } else { None };
                let (dk_dst, dv_dst) = match &parts {
                    Some((a, b)) => (a.ptr(g)?, b.ptr(g)?),
                    None => (dk.ptr(g)?, dv.ptr(g)?),
                };
                let mut args = vec![Arg::Ptr(dq_acc.ptr(g)?), Arg::Ptr(dk_dst), Arg::Ptr(dv_dst)];
                args.extend(inputs);
                args.extend([
                    Arg::I32(t as i32),
                    Arg::I32(s.hq as i32),
                    Arg::I32(s.hkv as i32),
                    Arg::F32(s.scale),
                    Arg::F32(s.scale * std::f32::consts::LOG2_E),
                    Arg::I32(s.causal as i32),
                ]);
                let cfg = LaunchConfig {
                    grid_dim: (seqs.max_len.div_ceil(TILE) as u32, s.hq as u32, nseq as u32),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: bwd_smem(s.d),
                };
                g.launch("attention", &format!("attention_bwd_bf16_d{}", s.d), cfg, &args)?;
                let (pk, pv) = match &parts {
                    Some((a, b)) => (a.ptr(g)?, b.ptr(g)?),
                    None => (0, 0),
                };
                let args = [
                    Arg::Ptr(dq.ptr(g)?),
                    Arg::Ptr(dk.ptr(g)?),
                    Arg::Ptr(dv.ptr(g)?),
                    Arg::Ptr(dq_acc.ptr(g)?),
                    Arg::Ptr(pk),
                    Arg::Ptr(pv),
                    Arg::I32(t as i32),
                    Arg::I32(s.hq as i32),
                    Arg::I32(s.hkv as i32),
                    Arg::I32(s.d as i32),
                    Arg::I32(parts.is_some() as i32),
                ];
                g.launch("attention", "attention_bwd_finish_bf16", cfg_1d(t * s.hq * s.d, 256), &args)
            } else {
                let mut args = vec![Arg::Ptr(dq.ptr(g)?)];
                args.extend(inputs);
                args.extend(simple_dims(nseq, t, s));
                g.launch("attention_simple", &kname("attention_simple_bwd_dq", dt), cfg_warps(t * s.hq), &args)?;
                let mut args = vec![Arg::Ptr(dk.ptr(g)?), Arg::Ptr(dv.ptr(g)?)];
                args.extend(inputs);
                args.extend(simple_dims(nseq, t, s));
                g.launch("attention_simple", &kname("attention_simple_bwd_dkv", dt), cfg_warps(t * s.hkv), &args)
            }
        }
    }
}

/// The trailing scalar arguments of the simple kernels: nseq, T, hq, hkv, d, scale, causal.
fn simple_dims(nseq: usize, t: usize, s: &AttnShape) -> [Arg; 7] {
    [
        Arg::I32(nseq as i32),
        Arg::I32(t as i32),
        Arg::I32(s.hq as i32),
        Arg::I32(s.hkv as i32),
        Arg::I32(s.d as i32),
        Arg::F32(s.scale),
        Arg::I32(s.causal as i32),
    ]
}

/// Whether this call takes the bf16 tensor-core kernels.
fn use_tc(g: &Gpu, dt: DType, d: usize, bufs: &[&Buf]) -> Result<bool> {
    Ok(dt == DType::BF16 && tc_head_dim(d) && tc_enabled() && aligned16(g, bufs)?)
}

/// Grid limits of the tensor-core launches (y = heads, z = sequences).
fn check_grid(op: &str, seqs: &Varlen, s: &AttnShape) -> Result<()> {
    if seqs.nseq() > 65535 || s.hq > 65535 || seqs.max_len.div_ceil(TILE) > 65535 {
        bail!("{op}: {} sequences × {} heads × {} tokens exceed the grid limits (65535 sequences, heads and 64-token tiles)", seqs.nseq(), s.hq, seqs.max_len);
    }
    Ok(())
}
