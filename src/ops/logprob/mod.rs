//! Grouped log-prob fused with the lm_head: log p(target) per token (and optionally the entropy)
//! from hidden states [T, H] and the lm_head [V, H], never holding a [T, V] logits tensor
//! (Qwen2.5's vocab is 152,064). One call serves every rollout of a GRPO group, packed, with a
//! mask for the tokens that need no log-prob (user text, image tokens): those are compacted away
//! before the GEMMs, so they cost nothing.
//!
//! Three entry points, for the three ways GRPO and SFT use it:
//! - `fwd`: log-probs only (the frozen reference, the old policy, evaluation). Saves lse [T].
//! - `bwd`: d hidden (=) and d lm_head (+=) from per-token upstream gradients dlogp, recomputing
//!   the logits tile by tile. With `fwd` that is 4 GEMMs.
//! - `fwd_bwd`: forward and backward in one pass (FLCE style, 3 GEMMs): each token chunk's logits
//!   are kept (at the activation dtype, relative to the running max) while a callback turns the
//!   chunk's finished log-probs into dlogp, then the two backward GEMMs run on them. The GRPO loss
//!   (`grpo::fused_loss`) and the SFT NLL (dlogp = −weight) are such callbacks.
//!
//! GPU design (kernels/logprob.cu): cuBLAS computes f32 logits for a tile of tokens × vocab
//! columns; a kernel folds the tile into per-row running max / Σe / Σe·(l−m) (online
//! log-sum-exp) and picks the target logit; a last kernel finishes lse, logp and the entropy.
//! Backward forms d logits = dlogp · (onehot − softmax) in bf16 and runs dhidden = dlogits · W
//! (split over vocabulary slices into f32 partials, summed in the scatter) and
//! dW += dlogitsᵀ · hidden. Extra memory is bounded by `Tuning` (under 1 GiB by default); the
//! large part is cached between calls (arena.rs). The entropy has no backward.

use super::{check, check_dtype, same_float_dtype};
use crate::cuda::api;
use crate::cuda::{cfg_1d, cfg_rows, Gpu};
use crate::tensor::{Buf, DType, Device};
use anyhow::{bail, Result};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Threads per block of the row kernels.
const BLOCK: u32 = 256;
/// cuBLAS-free grid limit on the row dimension of the 2-D kernels (grid.y).
const MAX_CHUNK_ROWS: usize = 65_535;

/// Chunk sizes of the GPU passes. Larger chunks mean bigger (faster) GEMMs and more memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// `fwd`: tokens × vocab columns per f32 logits tile.
    pub fwd_tokens: usize,
    pub fwd_vocab: usize,
    /// `bwd`: tokens per pass (the dW GEMM's k) × vocab columns per tile.
    pub bwd_tokens: usize,
    pub bwd_vocab: usize,
    /// `fwd_bwd`: bytes for the kept [tokens, V] logits of one token chunk (sets the chunk's
    /// token count), and vocab columns per f32 tile.
    pub fused_bytes: usize,
    pub fused_vocab: usize,
    /// How the logits are rounded before the log-sum-exp (a numerics choice; both are tested and
    /// measured in PERF-logprob.md). `fwd` and `bwd` honour it too, so old/ref/policy log-probs
    /// computed with the same `Tuning` agree bit for bit.
    pub precision: LogitPrecision,
    /// Vocabulary slices of the dhidden GEMM (split-K, PERF-logprob.md Round 4): dhidden = U·W is
    /// computed as S f32 partials over slices of V and summed in the scatter, so a chunk of 2,048
    /// tokens gets S× the output tiles. 0 = automatic (a wave-quantisation cost model: 4 at 2,048
    /// tokens, 3 at 2,731, 1 for short vocabularies). Used by `fwd_bwd` at either precision and by `bwd`
    /// (per vocabulary tile there, automatic = 1 at 8,192 tokens). Costs (S − 1) · tc · H · 4
    /// bytes of scratch.
    pub dhidden_splits: usize,
    /// `fwd_bwd` and `bwd`: write dlm_head (=) instead of accumulating (+=). The first token chunk's
    /// dW GEMM then runs with β = 0, which saves one f32 read of [V, H] (2.18 GB at Qwen's size).
    /// Only for a caller whose dlm_head would otherwise start at zero (the first micro-batch of a
    /// step, with no other contribution to the lm_head gradient, e.g. no tied embedding).
    pub dw_overwrite: bool,
    /// Keep the large device scratch (kept logits, tiles, dhidden partials) in a per-process cache
    /// between calls instead of allocating it per call; `release_scratch` frees it.
    pub cache_scratch: bool,
}

/// The rounding of the logits in the log-prob passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitPrecision {
    /// Logits at the activation dtype (bf16 for a bf16 model), as a framework's bf16 lm_head
    /// computes them: one logits GEMM per token chunk writes them straight into the kept buffer,
    /// then one kernel per chunk folds each row and overwrites it with u = onehot − softmax
    /// (independent of dlogp); dlogp is applied after: dhidden = diag(g)·(U·W) in the scatter,
    /// dW += Uᵀ·(diag(g)·hidden). `fwd` computes the logits exactly as the fused pass does (the
    /// same GEMM per chunk of `fused_bytes`, the same fold kernel), so the GRPO ratio
    /// e^(logp − old) is exactly 1 at policy == old; its extra memory is the kept chunk,
    /// `fused_bytes`, instead of one f32 tile. `bwd` recomputes each tile's logits rounded the same
    /// way, so its softmax matches the lse that `fwd` saved.
    Bf16,
    /// f32 logit tiles from cuBLAS, each logit stored relative to its row's running max (error
    /// 2⁻⁹·(max − l) instead of 2⁻⁹·|l|).
    ExactF32,
}

impl Default for Tuning {
    /// Bf16 logits with 900 MiB chunks (measured fastest on the H200, PERF-logprob.md round 4:
    /// 42.8 ms for the GRPO loss with 0.90 GiB extra). `Tuning::exact()`: f32 logit
    /// tiles (47 ms).
    fn default() -> Self {
        Self { precision: LogitPrecision::Bf16, fused_bytes: 900 << 20, ..Self::exact() }
    }
}

impl Tuning {
    /// The exact pass: f32 logit tiles, each logit stored relative to its row's running max
    /// (error 2⁻⁹·(max − l) instead of 2⁻⁹·|l|). T = 8192, V = 152,064, bf16: fwd 128 MiB,
    /// bwd 496 MiB, fused 2048-token chunks, 0.75 GiB.
    pub fn exact() -> Self {
        Self {
            fwd_tokens: 4096,
            fwd_vocab: 8192,
            bwd_tokens: 8192,
            bwd_vocab: 8192,
            fused_bytes: 640 << 20,
            fused_vocab: 8192,
            precision: LogitPrecision::ExactF32,
            dhidden_splits: 0,
            dw_overwrite: false,
            cache_scratch: true,
        }
    }
}

static LAST_SCRATCH: AtomicUsize = AtomicUsize::new(0);

pub use arena::{cached_scratch_bytes, release_scratch};

/// Bytes of device scratch the last GPU call of this module used (all of it is live at once, so
/// this is the call's peak extra memory beyond its inputs and outputs). With
/// `Tuning::cache_scratch` the large part lives in a cache that stays allocated between calls
/// (`cached_scratch_bytes`, at least as large as any single call's need).
pub fn last_scratch_bytes() -> usize {
    LAST_SCRATCH.load(Ordering::Relaxed)
}

/// Adds scratch allocated by a caller that wraps this op (the fused GRPO loss).
pub(crate) fn add_scratch_bytes(b: usize) {
    LAST_SCRATCH.fetch_add(b, Ordering::Relaxed);
}

/// One chunk of finished log-probs handed to the `fwd_bwd` callback, in "packed" order: packed
/// token p is token `idx[p]` (token p when `idx` is None).
pub struct GradChunk<'a> {
    /// The chunk: packed tokens p0 .. p0 + n.
    pub p0: usize,
    pub n: usize,
    /// [packed] i32, packed → token index; None when no token is masked.
    pub idx: Option<&'a Buf>,
    /// [packed] f32: log p of every packed token; rows p0 .. p0 + n are final.
    pub logp: &'a Buf,
    /// [packed] f32: the callback writes d loss / d logp for rows p0 .. p0 + n.
    pub dlogp: &'a mut Buf,
}

/// The `fwd_bwd` callback: writes `chunk.dlogp[p0 .. p0 + n]` from `chunk.logp`.
pub type GradFn<'f> = dyn FnMut(GradChunk<'_>) -> Result<()> + 'f;

/// The shape of a call: `t` tokens, hidden size `h`, vocabulary `v`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub t: usize,
    pub h: usize,
    pub v: usize,
}

/// What every pass reads: hidden [t, h] and lm_head [v, h] (the same float dtype), targets [t]
/// (i32), of the shape `dims`.
#[derive(Clone, Copy)]
pub struct Inputs<'a> {
    pub hidden: &'a Buf,
    pub lm_head: &'a Buf,
    pub targets: &'a Buf,
    pub dims: Dims,
}

/// The outputs of `fwd`, all f32 [t]: logp, lse (saved for `bwd`) and the entropy (optional).
pub struct FwdOut<'a> {
    pub logp: &'a mut Buf,
    pub lse: &'a mut Buf,
    pub entropy: Option<&'a mut Buf>,
}

/// The outputs of `bwd`: dhidden [t, h] (=, hidden's dtype) and dlm_head [v, h] (f32, +=; None: a
/// frozen head).
pub struct BwdOut<'a> {
    pub dhidden: &'a mut Buf,
    pub dlm_head: Option<&'a mut Buf>,
}

/// The outputs of `fwd_bwd`: logp [t] and the entropy [t] (optional, f32), dhidden [t, h] (=) and
/// dlm_head [v, h] (f32, +=).
pub struct FusedOut<'a> {
    pub logp: &'a mut Buf,
    pub entropy: Option<&'a mut Buf>,
    pub dhidden: &'a mut Buf,
    pub dlm_head: &'a mut Buf,
}

/// logp [t], lse [t] (saved for `bwd`), entropy [t] (optional), all f32, from hidden [t, h],
/// lm_head [v, h] and targets [t] (i32). Tokens with mask [t] == 0 are skipped: their logp, lse
/// and entropy are 0. A target outside [0, v) is an error on the CPU and gives NaN on the GPU.
pub fn fwd(dev: &Device, out: FwdOut, x: Inputs, mask: Option<&Buf>) -> Result<()> {
    fwd_with(dev, &Tuning::default(), out, x, mask)
}

/// `fwd` with explicit chunk sizes.
pub fn fwd_with(dev: &Device, tune: &Tuning, out: FwdOut, x: Inputs, mask: Option<&Buf>) -> Result<()> {
    let op = "logprob_fwd";
    check_head(op, &x)?;
    let t = x.dims.t;
    let FwdOut { logp, lse, mut entropy } = out;
    for (b, a) in [(&*logp, "logp"), (&*lse, "lse")] {
        check(b, t, op, a)?;
        check_dtype(b, DType::F32, op, a)?;
    }
    if let Some(e) = entropy.as_deref() {
        check(e, t, op, "entropy")?;
        check_dtype(e, DType::F32, op, "entropy")?;
    }
    if let Some(m) = mask {
        check(m, t, op, "mask")?;
        check_dtype(m, DType::F32, op, "mask")?;
    }
    match dev {
        Device::Cpu => {
            let entropy = match entropy.as_deref_mut() {
                Some(e) => Some(e.host_mut()?),
                None => None,
            };
            let mask = match mask {
                Some(m) => Some(m.host()?),
                None => None,
            };
            cpu::fwd(cpu::FwdOut { logp: logp.host_mut()?, lse: lse.host_mut()?, entropy }, cpu_inputs(&x)?, mask)
        }
        Device::Cuda(g) => {
            let mut cx = gpu::Call { g, dev, tune, meter: 0 };
            let r = gpu::fwd(&mut cx, FwdOut { logp, lse, entropy }, x, mask);
            LAST_SCRATCH.store(cx.meter, Ordering::Relaxed);
            r
        }
    }
}

/// dhidden [t, h] (=) and dlm_head [v, h] (f32, +=) from dlogp [t] (f32) and the lse saved by
/// `fwd`. Tokens with dlogp == 0 are skipped (their dhidden rows are 0), so masked tokens cost
/// nothing. Recomputes the logits tile by tile. `dlm_head` None: the head is frozen (LoRA), the
/// dW GEMM is skipped and dhidden is bit-identical to the Some case.
pub fn bwd(dev: &Device, out: BwdOut, x: Inputs, dlogp: &Buf, lse: &Buf) -> Result<()> {
    bwd_with(dev, &Tuning::default(), out, x, dlogp, lse)
}

/// `bwd` with explicit chunk sizes.
pub fn bwd_with(dev: &Device, tune: &Tuning, out: BwdOut, x: Inputs, dlogp: &Buf, lse: &Buf) -> Result<()> {
    let op = "logprob_bwd";
    check_head(op, &x)?;
    let Dims { t, h, v } = x.dims;
    let BwdOut { dhidden, mut dlm_head } = out;
    check(dhidden, t * h, op, "dhidden")?;
    check_dtype(dhidden, x.hidden.dtype(), op, "dhidden")?;
    if let Some(dw) = dlm_head.as_deref() {
        check(dw, v * h, op, "dlm_head")?;
        check_dtype(dw, DType::F32, op, "dlm_head")?;
    }
    for (b, a) in [(dlogp, "dlogp"), (lse, "lse")] {
        check(b, t, op, a)?;
        check_dtype(b, DType::F32, op, a)?;
    }
    match dev {
        Device::Cpu => {
            let dw = match dlm_head.as_deref_mut() {
                Some(b) => Some(b.host_mut()?),
                None => None,
            };
            let dw = match dw {
                Some(w) if tune.dw_overwrite => {
                    w.iter_mut().for_each(|x| *x = 0.0);
                    Some(w)
                }
                w => w,
            };
            cpu::bwd_head(dhidden.host_mut()?, dw, cpu_inputs(&x)?, dlogp.host()?, lse.host()?)
        }
        Device::Cuda(g) => {
            let mut cx = gpu::Call { g, dev, tune, meter: 0 };
            let r = gpu::bwd(&mut cx, BwdOut { dhidden, dlm_head }, x, dlogp, lse);
            LAST_SCRATCH.store(cx.meter, Ordering::Relaxed);
            r
        }
    }
}

/// Forward and backward in one pass: logp [t] (masked tokens 0), entropy [t] (optional),
/// dhidden [t, h] (=) and dlm_head [v, h] (f32, +=), where `grad` supplies d loss / d logp for
/// each chunk of finished log-probs (see `GradChunk`). Masked tokens get dlogp = 0 and dhidden 0.
pub fn fwd_bwd(dev: &Device, out: FusedOut, x: Inputs, mask: Option<&Buf>, grad: &mut GradFn) -> Result<()> {
    fwd_bwd_with(dev, &Tuning::default(), out, x, mask, grad)
}

/// `fwd_bwd` with explicit chunk sizes.
pub fn fwd_bwd_with(
    dev: &Device, tune: &Tuning, out: FusedOut, x: Inputs, mask: Option<&Buf>, grad: &mut GradFn,
) -> Result<()> {
    let op = "logprob_fwd_bwd";
    check_head(op, &x)?;
    let Dims { t, h, v } = x.dims;
    let FusedOut { logp, entropy, dhidden, dlm_head } = out;
    check(logp, t, op, "logp")?;
    check_dtype(logp, DType::F32, op, "logp")?;
    if let Some(e) = entropy.as_deref() {
        check(e, t, op, "entropy")?;
        check_dtype(e, DType::F32, op, "entropy")?;
    }
    if let Some(m) = mask {
        check(m, t, op, "mask")?;
        check_dtype(m, DType::F32, op, "mask")?;
    }
    check(dhidden, t * h, op, "dhidden")?;
    check_dtype(dhidden, x.hidden.dtype(), op, "dhidden")?;
    check(dlm_head, v * h, op, "dlm_head")?;
    check_dtype(dlm_head, DType::F32, op, "dlm_head")?;
    let out = FusedOut { logp, entropy, dhidden, dlm_head };
    match dev {
        Device::Cpu => {
            if tune.dw_overwrite {
                out.dlm_head.host_mut()?.iter_mut().for_each(|x| *x = 0.0);
            }
            cpu_fwd_bwd(out, x, mask, grad)
        }
        Device::Cuda(g) => {
            let mut cx = gpu::Call { g, dev, tune, meter: 0 };
            let r = match tune.precision {
                LogitPrecision::Bf16 => gpu::fwd_bwd_bf16(&mut cx, out, x, mask, grad),
                LogitPrecision::ExactF32 => gpu::fwd_bwd_exact(&mut cx, out, x, mask, grad),
            };
            LAST_SCRATCH.store(cx.meter, Ordering::Relaxed);
            r
        }
    }
}

/// (token rows per chunk, dhidden vocabulary slices) that `fwd_bwd_with` uses on `dev` for
/// `ta` active tokens of dtype `dt`; None on the CPU (which runs unchunked). For the bench's notes
/// and the tests.
pub fn fused_plan(dev: &Device, tune: &Tuning, ta: usize, h: usize, v: usize, dt: DType) -> Option<(usize, usize)> {
    match dev {
        Device::Cpu => None,
        Device::Cuda(g) => {
            let (tc, s) = gpu::fused_splits(g, tune, ta.max(1), h.max(1), v.max(1), dt);
            Some((tc, s.count))
        }
    }
}

/// One chunk's split-K dhidden GEMM as `fwd_bwd` runs it, for the bench's stage rows: f32
/// partials [S, n, h] at `part` from U [n, v] at `u` (row stride v, lm_head's dtype) · lm_head,
/// with n = `d.t` rows, cut into `splits` vocabulary slices (0 = automatic). Raw device pointers
/// to buffers of those sizes. Returns S, the number of partials written (fewer than asked when v
/// is short); `logprob_scatter_sum_<dtype>` adds them up.
pub fn dhidden_split_gemm(g: &Gpu, lm_head: &Buf, d: Dims, u: u64, part: u64, splits: usize) -> Result<usize> {
    let Dims { t: n, h, v } = d;
    check(lm_head, v * h, "logprob_dhidden_split_gemm", "lm_head")?;
    let tune = Tuning { dhidden_splits: splits, ..Tuning::default() };
    gpu::dhidden_stage(&stages::Pass::new(g, lm_head, h, v)?, &tune, u, part, n)
}

/// dst[p] = scale · src[idx[p]] (src[p] when idx is None) for p in p0 .. p0 + n: the building
/// block of simple `fwd_bwd` callbacks, e.g. the SFT NLL is `gather_scaled(dlogp, weight, idx,
/// p0, n, -1.0)` with weight [t] = 1 / (assistant tokens) on assistant tokens.
pub fn gather_scaled(
    dev: &Device, dst: &mut Buf, src: &Buf, idx: Option<&Buf>, p0: usize, n: usize, scale: f32,
) -> Result<()> {
    let op = "logprob_gather_scaled";
    check_dtype(dst, DType::F32, op, "dst")?;
    check_dtype(src, DType::F32, op, "src")?;
    if p0 + n > dst.len() {
        bail!("{op}: rows {p0}..{} past the end of dst ({})", p0 + n, dst.len());
    }
    if let Some(ix) = idx {
        check_dtype(ix, DType::I32, op, "idx")?;
        if p0 + n > ix.len() {
            bail!("{op}: rows {p0}..{} past the end of idx ({})", p0 + n, ix.len());
        }
    } else if p0 + n > src.len() {
        bail!("{op}: rows {p0}..{} past the end of src ({})", p0 + n, src.len());
    }
    match dev {
        Device::Cpu => {
            let s = src.host()?;
            let ix = match idx {
                Some(b) => Some(b.host_i32()?),
                None => None,
            };
            let d = dst.host_mut()?;
            for p in p0..p0 + n {
                let q = match ix {
                    Some(ix) => usize::try_from(ix[p]).ok().filter(|&q| q < s.len()),
                    None => Some(p),
                };
                let Some(q) = q else { bail!("{op}: idx[{p}] is outside src") };
                d[p] = scale * s[q];
            }
            Ok(())
        }
        Device::Cuda(g) => {
            if n == 0 {
                return Ok(());
            }
            let ip = match idx {
                Some(b) => b.ptr(g)?,
                None => 0,
            };
            api::logprob::LogprobGatherVecF32 {
                dst: dst.ptr(g)?,
                src: src.ptr(g)?,
                idx: ip,
                p0: p0 as i32,
                n: n as i32,
                scale,
            }
            .launch(g, cfg_1d(n, 256))
        }
    }
}

fn check_head(op: &str, x: &Inputs) -> Result<()> {
    let Dims { t, h, v } = x.dims;
    if h == 0 || v == 0 {
        bail!("{op}: hidden size ({h}) and vocabulary ({v}) must be positive");
    }
    if t.max(h).max(v) > i32::MAX as usize {
        bail!("{op}: shape t={t} h={h} v={v} too large for 32-bit kernel indices");
    }
    check(x.hidden, t * h, op, "hidden")?;
    check(x.lm_head, v * h, op, "lm_head")?;
    check(x.targets, t, op, "targets")?;
    check_dtype(x.targets, DType::I32, op, "targets")?;
    same_float_dtype(op, &[x.hidden, x.lm_head])?;
    Ok(())
}

/// The host slices of `x` (CPU buffers).
fn cpu_inputs<'a>(x: &Inputs<'a>) -> Result<cpu::Inputs<'a, f32>> {
    Ok(cpu::Inputs {
        hidden: x.hidden.host()?,
        lm_head: x.lm_head.host()?,
        targets: x.targets.host_i32()?,
        dims: x.dims,
    })
}

/// CPU `fwd_bwd`: the forward, one callback over every active token, the backward.
fn cpu_fwd_bwd(out: FusedOut, x: Inputs, mask: Option<&Buf>, grad: &mut GradFn) -> Result<()> {
    let FusedOut { logp, entropy, dhidden, dlm_head } = out;
    let t = x.dims.t;
    let mask = match mask {
        Some(m) => Some(m.host()?),
        None => None,
    };
    let mut lse = vec![0f32; t];
    let ent = match entropy {
        Some(e) => Some(e.host_mut()?),
        None => None,
    };
    cpu::fwd(cpu::FwdOut { logp: logp.host_mut()?, lse: &mut lse, entropy: ent }, cpu_inputs(&x)?, mask)?;
    let active: Vec<usize> = (0..t).filter(|&i| mask.is_none_or(|m| m[i] != 0.0)).collect();
    let ta = active.len();
    let mut dlogp_p = Buf::HostF32(vec![0.0; ta]);
    if ta == t {
        grad(GradChunk { p0: 0, n: ta, idx: None, logp: &*logp, dlogp: &mut dlogp_p })?;
    } else {
        let lp = logp.host()?;
        let logp_p = Buf::HostF32(active.iter().map(|&i| lp[i]).collect());
        let idx = Buf::HostI32(active.iter().map(|&i| i as i32).collect());
        grad(GradChunk { p0: 0, n: ta, idx: Some(&idx), logp: &logp_p, dlogp: &mut dlogp_p })?;
    }
    let mut dlogp = vec![0f32; t];
    for (p, &i) in active.iter().enumerate() {
        dlogp[i] = dlogp_p.host()?[p];
    }
    cpu::bwd(dhidden.host_mut()?, dlm_head.host_mut()?, cpu_inputs(&x)?, &dlogp, &lse)
}

/// The per-process cache of the large device scratch.
mod arena;
/// The CUDA launchers (gpu.rs). Pointers are raw device addresses; `Call::meter` sums the scratch allocated.
mod gpu;
/// The split-K dhidden GEMM.
mod splitk;
/// The stage launchers of one token chunk, shared by gpu.rs and the bench.
pub(crate) mod stages;

pub mod cpu;
