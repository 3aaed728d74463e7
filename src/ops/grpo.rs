//! Turn-aware GRPO (AM3Safety): the per-turn reward and group advantage, and the clipped
//! surrogate + k3-KL loss with its gradient d loss / d logp, on the CPU (generic over `Real`, so
//! the reference vectors check in f64) and on CUDA (kernels/grpo.cu, f32).
//!
//! Reward, for P dialogues × N rollouts × T assistant turns with judge scores safe, help [P, N, T]:
//!   m_t = mean_n safe, Var_t = population variance over the N rollouts,
//!   U_t = Var_t + λ·max(0, τ − m_t), α = softmax_t(U), r = Σ_t α_t (β_help·help + safe),
//!   A = (r − mean_n r) / (unbiased std_n r + ε_adv) per dialogue (A = 0 when N = 1).
//! Loss per masked token, with ρ = e^(logp − old):
//!   −(min(ρA, clip(ρ, 1 − ε_low, 1 + ε_high)·A) − β_kl·k3),  k3 = e^(ref − logp) − (ref − logp) − 1,
//! averaged over all masked tokens (`TokenMean`) or per sequence then over the sequences that have
//! masked tokens (`SeqMean`). `fused_loss` runs it inside the lm_head log-prob op, so the policy's
//! [tokens × vocab] logits never exist.

use super::logprob::{self, FusedOut, GradChunk, Inputs, Tuning};
use super::{check, check_dtype};
use crate::cuda::api;
use crate::cuda::{cfg_1d, cfg_rows, Gpu};
use crate::tensor::{Buf, DType, Device};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;

/// The method's hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GrpoHyper {
    /// λ: weight of the safety shortfall max(0, τ − m_t) in the turn importance.
    pub lambda: f64,
    /// τ: the safety level below which a turn gains importance.
    pub tau: f64,
    /// β_help: weight of helpfulness in the reward.
    pub beta_help: f64,
    /// Clip range of the ratio: [1 − eps_low, 1 + eps_high].
    pub eps_low: f64,
    pub eps_high: f64,
    /// β_kl: weight of the k3 KL estimate against the reference policy.
    pub beta_kl: f64,
    /// ε added to the advantage's standard deviation.
    pub adv_eps: f64,
}

impl GrpoHyper {
    /// Reads the hyper-parameters from a safetensors metadata header (keys `lam` or `lambda`,
    /// `tau`, `beta_help`, `eps_low`, `eps_high`, `beta_kl`, `adv_eps`).
    pub fn from_metadata(m: &HashMap<String, String>) -> Result<Self> {
        let get = |keys: &[&str]| -> Result<f64> {
            let (k, s) = keys
                .iter()
                .find_map(|k| m.get(*k).map(|s| (*k, s)))
                .ok_or_else(|| anyhow!("GRPO hyper-parameters: metadata has no `{}`", keys[0]))?;
            s.trim().parse::<f64>().with_context(|| format!("GRPO hyper-parameters: `{k}` = {s:?} is not a number"))
        };
        Ok(Self {
            lambda: get(&["lambda", "lam"])?,
            tau: get(&["tau"])?,
            beta_help: get(&["beta_help"])?,
            eps_low: get(&["eps_low"])?,
            eps_high: get(&["eps_high"])?,
            beta_kl: get(&["beta_kl"])?,
            adv_eps: get(&["adv_eps"])?,
        })
    }
}

/// How per-token losses are averaged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aggregation {
    /// Mean over every masked token of the batch.
    TokenMean,
    /// Mean over each sequence's masked tokens, then over the sequences that have any.
    SeqMean,
}

/// The loss and two statistics for logging.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossStats {
    /// The aggregated loss.
    pub loss: f64,
    /// Fraction of masked tokens where the clipped branch won (their surrogate gradient is 0).
    pub clip_frac: f64,
    /// Mean of k3 over the masked tokens.
    pub mean_kl: f64,
}

/// The reward's intermediates and results; [P, T] and [P, N], row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct TurnRewards<R> {
    pub turn_mean: Vec<R>,
    pub turn_var: Vec<R>,
    pub turn_importance: Vec<R>,
    pub turn_weight: Vec<R>,
    pub reward: Vec<R>,
    pub advantage: Vec<R>,
}

/// Device buffers for `rewards` (f32): turn_* [P, T], reward and advantage [P, N].
pub struct RewardBufs {
    pub turn_mean: Buf,
    pub turn_var: Buf,
    pub turn_importance: Buf,
    pub turn_weight: Buf,
    pub reward: Buf,
    pub advantage: Buf,
}

impl RewardBufs {
    pub fn new(dev: &Device, p: usize, n: usize, t: usize) -> Result<Self> {
        Ok(Self {
            turn_mean: dev.zeros_f32(p * t)?,
            turn_var: dev.zeros_f32(p * t)?,
            turn_importance: dev.zeros_f32(p * t)?,
            turn_weight: dev.zeros_f32(p * t)?,
            reward: dev.zeros_f32(p * n)?,
            advantage: dev.zeros_f32(p * n)?,
        })
    }
}

/// The sizes of a reward computation: p dialogues × n rollouts × t assistant turns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RewardDims {
    pub p: usize,
    pub n: usize,
    pub t: usize,
}

/// Turn rewards and group advantages from safe, help [p, n, t] (f32) into `out`.
pub fn rewards(
    dev: &Device, out: &mut RewardBufs, safe: &Buf, help: &Buf, dims: RewardDims, hp: &GrpoHyper,
) -> Result<()> {
    let RewardDims { p, n, t } = dims;
    let op = "grpo_rewards";
    if n == 0 || t == 0 {
        bail!("{op}: need at least one rollout and one turn (n={n}, t={t})");
    }
    for (b, len, a) in [
        (safe, p * n * t, "safe"),
        (help, p * n * t, "help"),
        (&out.turn_mean, p * t, "turn_mean"),
        (&out.turn_var, p * t, "turn_var"),
        (&out.turn_importance, p * t, "turn_importance"),
        (&out.turn_weight, p * t, "turn_weight"),
        (&out.reward, p * n, "reward"),
        (&out.advantage, p * n, "advantage"),
    ] {
        check(b, len, op, a)?;
        check_dtype(b, DType::F32, op, a)?;
    }
    match dev {
        Device::Cpu => {
            let r = cpu::turn_rewards::<f32>(safe.host()?, help.host()?, dims, hp)?;
            out.turn_mean.host_mut()?.copy_from_slice(&r.turn_mean);
            out.turn_var.host_mut()?.copy_from_slice(&r.turn_var);
            out.turn_importance.host_mut()?.copy_from_slice(&r.turn_importance);
            out.turn_weight.host_mut()?.copy_from_slice(&r.turn_weight);
            out.reward.host_mut()?.copy_from_slice(&r.reward);
            out.advantage.host_mut()?.copy_from_slice(&r.advantage);
            Ok(())
        }
        Device::Cuda(g) => {
            if p == 0 {
                return Ok(());
            }
            api::grpo::GrpoRewardsF32 {
                turn_mean: out.turn_mean.ptr(g)?,
                turn_var: out.turn_var.ptr(g)?,
                turn_imp: out.turn_importance.ptr(g)?,
                turn_w: out.turn_weight.ptr(g)?,
                reward: out.reward.ptr(g)?,
                adv: out.advantage.ptr(g)?,
                safe: safe.ptr(g)?,
                help: help.ptr(g)?,
                p: p as i32,
                n: n as i32,
                t: t as i32,
                lambda: hp.lambda as f32,
                tau: hp.tau as f32,
                beta_help: hp.beta_help as f32,
                adv_eps: hp.adv_eps as f32,
            }
            .launch(g, cfg_rows(p, 128, 0))
        }
    }
}

/// The loss over logp [rows, l] and the batch's old_logp, ref_logp, mask [rows, l] and adv [rows]
/// (all f32); writes dlogp [rows, l] = d loss / d logp (0 on masked tokens).
pub fn loss_fwd_bwd(
    dev: &Device, dlogp: &mut Buf, logp: &Buf, batch: &GrpoBatch, hp: &GrpoHyper, agg: Aggregation,
) -> Result<LossStats> {
    let op = "grpo_loss";
    let GrpoBatch { old_logp, ref_logp, mask, adv, rows, l } = *batch;
    check_loss_inputs(op, old_logp, ref_logp, mask, adv, rows, l)?;
    for (b, a) in [(&*dlogp, "dlogp"), (logp, "logp")] {
        check(b, rows * l, op, a)?;
        check_dtype(b, DType::F32, op, a)?;
    }
    match dev {
        Device::Cpu => {
            let (old_logp, ref_logp, mask, adv) = (old_logp.host()?, ref_logp.host()?, mask.host()?, adv.host()?);
            let slices = GrpoBatch { old_logp, ref_logp, mask, adv, rows, l };
            Ok(cpu::loss_fwd_bwd::<f32>(dlogp.host_mut()?, logp.host()?, &slices, hp, agg))
        }
        Device::Cuda(g) => {
            let plan = GpuLoss::new(g, dev, mask, rows, l, agg)?;
            plan.tokens(g, dlogp, logp, Packed { idx: None, p0: 0, n: rows * l }, batch, hp)?;
            plan.finish(g, dev)
        }
    }
}

/// What the GRPO loss reads besides the policy's log-probs (and, fused, the lm_head op's own
/// inputs). `B` is `Buf` for the ops and a slice for the CPU reference.
pub struct GrpoBatch<'a, B: ?Sized = Buf> {
    /// [rows, l] f32: the sampling policy's and the frozen reference's log-probs.
    pub old_logp: &'a B,
    pub ref_logp: &'a B,
    /// [rows, l] f32: 1 on the completion tokens that enter the loss.
    pub mask: &'a B,
    /// [rows] f32: the advantage of each rollout.
    pub adv: &'a B,
    pub rows: usize,
    pub l: usize,
}

impl<B: ?Sized> Clone for GrpoBatch<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: ?Sized> Copy for GrpoBatch<'_, B> {}

/// Packed tokens p0 .. p0 + n of a log-prob chunk: packed row p is token idx[p] of the
/// [rows, l] batch (token p without idx). `I` is `Buf` (i32) on CUDA, `[i32]` on the CPU.
pub struct Packed<'a, I: ?Sized = Buf> {
    pub idx: Option<&'a I>,
    pub p0: usize,
    pub n: usize,
}

impl<I: ?Sized> Clone for Packed<'_, I> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<I: ?Sized> Copy for Packed<'_, I> {}

/// The GRPO step on the policy, fused with the lm_head: from `x` (hidden [rows·l, h], lm_head
/// [v, h] and targets [rows·l] (i32); `x.dims.t` must be rows·l), writes `out`: logp [rows·l]
/// (f32, 0 on masked tokens), the entropy (optional, as in `logprob::fwd_bwd`), dhidden
/// [rows·l, h] (=) and dlm_head [v, h] (f32, +=; = with `Tuning::dw_overwrite`), and returns the
/// loss statistics. Masked tokens cost no GEMM work. Three GEMMs of 2·T·H·V in all. With
/// `LogitPrecision::Bf16` (the default), compute old_logp and ref_logp with `logprob::fwd_with` and the
/// same `Tuning` and mask: they then match the policy's log-probs bit for bit at equal weights.
pub fn fused_loss(
    dev: &Device, out: FusedOut, x: Inputs, batch: &GrpoBatch, hp: &GrpoHyper, agg: Aggregation,
) -> Result<LossStats> {
    fused_loss_with(dev, &Tuning::default(), out, x, batch, hp, agg)
}

/// `fused_loss` with explicit chunk sizes for the lm_head op.
pub fn fused_loss_with(
    dev: &Device, tune: &Tuning, out: FusedOut, x: Inputs, batch: &GrpoBatch, hp: &GrpoHyper, agg: Aggregation,
) -> Result<LossStats> {
    let op = "grpo_fused_loss";
    let GrpoBatch { old_logp, ref_logp, mask, adv, rows, l } = *batch;
    check_loss_inputs(op, old_logp, ref_logp, mask, adv, rows, l)?;
    if x.dims.t != rows * l {
        bail!("{op}: {} tokens in the inputs, {rows} × {l} in the batch", x.dims.t);
    }
    match dev {
        Device::Cpu => {
            let (old, rf, mk, ad) = (old_logp.host()?, ref_logp.host()?, mask.host()?, adv.host()?);
            let slices = GrpoBatch { old_logp: old, ref_logp: rf, mask: mk, adv: ad, rows, l };
            let wrow = cpu::row_weights::<f32>(mk, rows, l, agg);
            let mut acc = [0f32; 3];
            let mut grad = |c: GradChunk<'_>| -> Result<()> {
                let idx = match c.idx {
                    Some(b) => Some(b.host_i32()?),
                    None => None,
                };
                let packed = Packed { idx, p0: c.p0, n: c.n };
                cpu::loss_tokens(c.dlogp.host_mut()?, &mut acc, c.logp.host()?, packed, &slices, &wrow.0, hp);
                Ok(())
            };
            logprob::fwd_bwd_with(dev, tune, out, x, Some(mask), &mut grad)?;
            Ok(cpu::stats(&acc, wrow.1))
        }
        Device::Cuda(g) => {
            let plan = GpuLoss::new(g, dev, mask, rows, l, agg)?;
            let mut grad = |c: GradChunk<'_>| -> Result<()> {
                plan.tokens(g, c.dlogp, c.logp, Packed { idx: c.idx, p0: c.p0, n: c.n }, batch, hp)
            };
            logprob::fwd_bwd_with(dev, tune, out, x, Some(mask), &mut grad)?;
            logprob::add_scratch_bytes(plan.bytes);
            plan.finish(g, dev)
        }
    }
}

fn check_loss_inputs(
    op: &str, old_logp: &Buf, ref_logp: &Buf, mask: &Buf, adv: &Buf, rows: usize, l: usize,
) -> Result<()> {
    if l == 0 {
        bail!("{op}: sequence length must be positive");
    }
    if rows * l > i32::MAX as usize {
        bail!("{op}: {rows} × {l} tokens is too many for 32-bit kernel indices");
    }
    for (b, n, a) in [
        (old_logp, rows * l, "old_logp"),
        (ref_logp, rows * l, "ref_logp"),
        (mask, rows * l, "mask"),
        (adv, rows, "adv"),
    ] {
        check(b, n, op, a)?;
        check_dtype(b, DType::F32, op, a)?;
    }
    Ok(())
}

/// The GPU loss: row weights from the mask, per-token loss terms [rows·l] (token order), and the
/// final reduction to `LossStats`.
struct GpuLoss {
    wrow: Buf,
    total: Buf,
    tok_loss: Buf,
    tok_clip: Buf,
    tok_kl: Buf,
    /// Bytes allocated here.
    bytes: usize,
}

impl GpuLoss {
    fn new(g: &Gpu, dev: &Device, mask: &Buf, rows: usize, l: usize, agg: Aggregation) -> Result<Self> {
        let t = rows * l;
        let s = Self {
            wrow: dev.zeros_f32(rows)?,
            total: dev.zeros_f32(1)?,
            tok_loss: dev.zeros_f32(t)?,
            tok_clip: dev.zeros_f32(t)?,
            tok_kl: dev.zeros_f32(t)?,
            bytes: 4 * (rows.max(1) + 1 + 3 * t.max(1)),
        };
        api::grpo::GrpoWeightsF32 {
            wrow: s.wrow.ptr(g)?,
            total: s.total.ptr(g)?,
            mask: mask.ptr(g)?,
            rows: rows as i32,
            l: l as i32,
            seq_mean: (agg == Aggregation::SeqMean) as i32,
        }
        .launch(g, cfg_rows(1, 1024, 0))?;
        Ok(s)
    }

    /// Packed tokens p0 .. p0 + n: dlogp[p] and the per-token terms of token idx[p] (or p).
    fn tokens(
        &self, g: &Gpu, dlogp: &Buf, logp: &Buf, packed: Packed, batch: &GrpoBatch, hp: &GrpoHyper,
    ) -> Result<()> {
        let (Packed { idx, p0, n }, GrpoBatch { old_logp, ref_logp, mask, adv, l, .. }) = (packed, *batch);
        if n == 0 {
            return Ok(());
        }
        if p0 + n > dlogp.len() || p0 + n > logp.len() {
            bail!(
                "grpo_loss: packed rows {p0}..{} past the end of logp ({}) or dlogp ({})",
                p0 + n,
                logp.len(),
                dlogp.len()
            );
        }
        api::grpo::GrpoLossF32 {
            dlogp: dlogp.ptr(g)?,
            tok_loss: self.tok_loss.ptr(g)?,
            tok_clip: self.tok_clip.ptr(g)?,
            tok_kl: self.tok_kl.ptr(g)?,
            logp: logp.ptr(g)?,
            old_logp: old_logp.ptr(g)?,
            ref_logp: ref_logp.ptr(g)?,
            mask: mask.ptr(g)?,
            adv: adv.ptr(g)?,
            wrow: self.wrow.ptr(g)?,
            idx: match idx {
                Some(b) => b.ptr(g)?,
                None => 0,
            },
            p0: p0 as i32,
            n: n as i32,
            l: l as i32,
            eps_low: hp.eps_low as f32,
            eps_high: hp.eps_high as f32,
            beta_kl: hp.beta_kl as f32,
        }
        .launch(g, cfg_1d(n, 256))
    }

    fn finish(&self, g: &Gpu, dev: &Device) -> Result<LossStats> {
        let stats = dev.zeros_f32(3)?;
        api::grpo::GrpoStatsF32 {
            stats: stats.ptr(g)?,
            tok_loss: self.tok_loss.ptr(g)?,
            tok_clip: self.tok_clip.ptr(g)?,
            tok_kl: self.tok_kl.ptr(g)?,
            total: self.total.ptr(g)?,
            n: self.tok_loss.len() as i32,
        }
        .launch(g, cfg_rows(1, 1024, 0))?;
        let s = dev.to_vec(&stats)?;
        Ok(LossStats { loss: s[0] as f64, clip_frac: s[1] as f64, mean_kl: s[2] as f64 })
    }
}

pub mod cpu {
    //! The references, in `R` (f64 for the reference vectors).
    use super::{Aggregation, GrpoBatch, GrpoHyper, LossStats, Packed, RewardDims, TurnRewards};
    use crate::real::Real;
    use anyhow::{bail, Result};

    /// Turn statistics, weights, rewards and advantages from safe, help [p, n, t].
    pub fn turn_rewards<R: Real>(safe: &[R], help: &[R], dims: RewardDims, hp: &GrpoHyper) -> Result<TurnRewards<R>> {
        let RewardDims { p, n, t } = dims;
        if safe.len() != p * n * t || help.len() != p * n * t {
            bail!("grpo turn_rewards: safe/help have {}/{} elements, expected {p}×{n}×{t}", safe.len(), help.len());
        }
        if n == 0 || t == 0 {
            bail!("grpo turn_rewards: need at least one rollout and one turn (n={n}, t={t})");
        }
        let f = R::from_f64;
        let (nn, zero) = (f(n as f64), R::ZERO);
        let mut out = TurnRewards {
            turn_mean: vec![zero; p * t],
            turn_var: vec![zero; p * t],
            turn_importance: vec![zero; p * t],
            turn_weight: vec![zero; p * t],
            reward: vec![zero; p * n],
            advantage: vec![zero; p * n],
        };
        for d in 0..p {
            let s = |k: usize, j: usize| safe[(d * n + k) * t + j];
            for j in 0..t {
                let m = (0..n).fold(zero, |a, k| a + s(k, j)) / nn;
                let var = (0..n).fold(zero, |a, k| a + (s(k, j) - m) * (s(k, j) - m)) / nn;
                out.turn_mean[d * t + j] = m;
                out.turn_var[d * t + j] = var;
                out.turn_importance[d * t + j] = var + f(hp.lambda) * (f(hp.tau) - m).max(zero);
            }
            let u = &out.turn_importance[d * t..(d + 1) * t];
            let mx = u.iter().fold(u[0], |a, &b| a.max(b));
            let z = u.iter().fold(zero, |a, &x| a + (x - mx).exp());
            for j in 0..t {
                out.turn_weight[d * t + j] = (out.turn_importance[d * t + j] - mx).exp() / z;
            }
            for k in 0..n {
                out.reward[d * n + k] = (0..t).fold(zero, |a, j| {
                    a + out.turn_weight[d * t + j] * (f(hp.beta_help) * help[(d * n + k) * t + j] + s(k, j))
                });
            }
            let r = &out.reward[d * n..(d + 1) * n];
            let mean = r.iter().fold(zero, |a, &x| a + x) / nn;
            let std = if n > 1 {
                (r.iter().fold(zero, |a, &x| a + (x - mean) * (x - mean)) / f((n - 1) as f64)).sqrt()
            } else {
                zero
            };
            for k in 0..n {
                out.advantage[d * n + k] =
                    if n > 1 { (out.reward[d * n + k] - mean) / (std + f(hp.adv_eps)) } else { zero };
            }
        }
        Ok(out)
    }

    /// The weight of each masked token of a row in the aggregated loss, and Σ mask.
    pub fn row_weights<R: Real>(mask: &[R], rows: usize, l: usize, agg: Aggregation) -> (Vec<R>, R) {
        let counts: Vec<R> = (0..rows).map(|r| mask[r * l..(r + 1) * l].iter().fold(R::ZERO, |a, &m| a + m)).collect();
        let total = counts.iter().fold(R::ZERO, |a, &c| a + c);
        let nonempty = R::from_f64(counts.iter().filter(|&&c| c != R::ZERO).count() as f64);
        let w = counts
            .iter()
            .map(|&c| match agg {
                Aggregation::TokenMean if total != R::ZERO => R::ONE / total,
                Aggregation::SeqMean if c != R::ZERO => R::ONE / (c * nonempty),
                _ => R::ZERO,
            })
            .collect();
        (w, total)
    }

    /// One token's (loss, d loss / d logp, clipped, k3), before the mask and aggregation weight.
    pub fn token<R: Real>(logp: R, old: R, rf: R, a: R, hp: &GrpoHyper) -> (R, R, bool, R) {
        let f = R::from_f64;
        let rho = (logp - old).exp();
        let c = rho.max(R::ONE - f(hp.eps_low)).min(R::ONE + f(hp.eps_high));
        let (s1, s2) = (rho * a, c * a);
        let clipped = s2 < s1;
        let (sur, dsur) = if clipped { (s2, R::ZERO) } else { (s1, s1) };
        let d = rf - logp;
        let ed = d.exp();
        let k3 = ed - d - R::ONE;
        let dk3 = R::ONE - ed;
        (-(sur - f(hp.beta_kl) * k3), -(dsur - f(hp.beta_kl) * dk3), clipped, k3)
    }

    /// Packed tokens p0 .. p0 + n (token idx[p], or p): writes dlogp[p] and adds
    /// [weighted loss, clipped mask, mask · k3] into `acc`. wrow: [rows].
    pub fn loss_tokens<R: Real>(
        dlogp: &mut [R], acc: &mut [R; 3], logp: &[R], packed: Packed<[i32]>, batch: &GrpoBatch<[R]>, wrow: &[R],
        hp: &GrpoHyper,
    ) {
        let Packed { idx, p0, n } = packed;
        let GrpoBatch { old_logp: old, ref_logp: rf, mask, adv, l, .. } = *batch;
        for p in p0..p0 + n {
            let tok = idx.map_or(p, |ix| ix[p] as usize);
            let m = mask[tok];
            if m == R::ZERO {
                dlogp[p] = R::ZERO;
                continue;
            }
            let row = tok / l;
            let (loss, dl, clipped, k3) = token(logp[p], old[tok], rf[tok], adv[row], hp);
            let w = m * wrow[row];
            dlogp[p] = w * dl;
            acc[0] += w * loss;
            if clipped {
                acc[1] += m;
            }
            acc[2] += m * k3;
        }
    }

    pub fn stats<R: Real>(acc: &[R; 3], total: R) -> LossStats {
        let t = total.to_f64();
        let per = |x: R| if t != 0.0 { x.to_f64() / t } else { 0.0 };
        LossStats { loss: acc[0].to_f64(), clip_frac: per(acc[1]), mean_kl: per(acc[2]) }
    }

    /// The whole loss over [rows, l]: dlogp (=) and the statistics.
    pub fn loss_fwd_bwd<R: Real>(
        dlogp: &mut [R], logp: &[R], batch: &GrpoBatch<[R]>, hp: &GrpoHyper, agg: Aggregation,
    ) -> LossStats {
        let GrpoBatch { mask, rows, l, .. } = *batch;
        let (wrow, total) = row_weights(mask, rows, l, agg);
        let mut acc = [R::ZERO; 3];
        loss_tokens(dlogp, &mut acc, logp, Packed { idx: None, p0: 0, n: rows * l }, batch, &wrow, hp);
        stats(&acc, total)
    }
}
