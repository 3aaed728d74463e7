//! The clipped-surrogate update over finished rollouts. Each rollout becomes a training example
//! (weight 1 on the tokens the policy generated); rollouts are grouped into mini-batches (one
//! optimizer step each) and packed into micro-batches of at most `batch_tokens` (gradient
//! accumulation). Log-probs are log-softmax(logits / T) over the full vocabulary: the final
//! hidden states are scaled by 1/T before the lm_head op, so no [tokens × vocab] tensor exists.
//! The loss per generated token is the method's (ops::grpo::cpu::token); its divisor is that of
//! the whole mini-batch (all its generated tokens, or all its rollouts for the sequence mean),
//! so the micro-batch split does not change the loss or the gradient.

use crate::models::common::head::LogpGrad;
use crate::models::common::lm::StepFn;
use crate::models::qwen2_5_vl::model::Recompute;
use crate::ops::grpo::{cpu::token, Aggregation, GrpoHyper};
use crate::stages::examples::{micro_batches, pack, Example};
use crate::stages::model::{VlFwd, VlModel};
use crate::tensor::{Buf, DType, Device};
use anyhow::{bail, Result};

/// One rollout ready for the update.
pub struct TrainRow {
    pub example: Example,
    pub advantage: f64,
    /// Per position of `example` (0 where not generated): the sampling policy's, the old
    /// policy's (training forward) and the reference's log-probs.
    pub sampler_logp: Vec<f32>,
    pub old_logp: Vec<f32>,
    pub ref_logp: Vec<f32>,
}

/// What a pass over a mini-batch measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct PassStats {
    pub loss: f64,
    pub tokens: usize,
    pub clip_low: f64,
    pub clip_high: f64,
    pub kl: f64,
    pub entropy: f64,
    /// |ratio − 1| at most (0 on the first pass at the old weights).
    pub max_ratio_dev: f64,
}

/// Micro-batches (indexes into `rows`) of one mini-batch.
pub fn micro(rows: &[TrainRow], mini: &[usize], batch_tokens: usize) -> Vec<Vec<usize>> {
    let lens: Vec<usize> = rows.iter().map(|r| r.example.len()).collect();
    micro_batches(mini, &lens, batch_tokens)
}

/// The forward of micro-batch `mb` packed, with the head at temperature `temp`: (forward,
/// targets, weights) on the device.
fn forward_at(
    dev: &Device, model: &VlModel, rows: &[TrainRow], mb: &[usize], temp: f32, rc: &Recompute,
) -> Result<(VlFwd, Buf, Buf)> {
    let refs: Vec<&Example> = mb.iter().map(|&i| &rows[i].example).collect();
    let p = pack(&refs);
    let mut f = model.forward(dev, &p, rc)?;
    model.scale_final_hidden(dev, &mut f, 1.0 / temp)?;
    Ok((f, dev.upload_i32(&p.targets)?, dev.upload(&p.weights, DType::F32)?))
}

/// Log-probs of every row's generated tokens at temperature `temp`, no gradient (the old
/// policy or the reference), packed as in the update so that equal weights give equal bits.
pub fn logprobs(
    dev: &Device, model: &VlModel, rows: &[TrainRow], mbs: &[Vec<usize>], temp: f32, rc: &Recompute,
) -> Result<Vec<Vec<f32>>> {
    let mut out: Vec<Vec<f32>> = rows.iter().map(|_| Vec::new()).collect();
    for mb in mbs {
        let (f, targets, w) = forward_at(dev, model, rows, mb, temp, rc)?;
        let (logp, _) = model.logprobs(dev, &f, &targets, Some(&w))?;
        let lp = dev.to_vec(&logp)?;
        let mut off = 0;
        for &i in mb {
            let n = rows[i].example.len();
            out[i] = lp[off..off + n].to_vec();
            off += n;
        }
    }
    Ok(out)
}

/// One row's tokens, per position: the policy's, the old policy's and the reference's log-probs
/// and the loss mask (all of one length).
#[derive(Clone, Copy, Debug)]
pub struct RowTokens<'a> {
    pub logp: &'a [f64],
    pub old: &'a [f64],
    pub rf: &'a [f64],
    pub mask: &'a [f64],
}

/// One row's share of the loss: each masked token's clipped surrogate + k3 term (advantage
/// `adv`) times `weight` (its aggregation weight in the whole mini-batch) is added to `st.loss`;
/// returns d loss / d logp per position (0 off the mask).
pub fn row_loss(x: RowTokens, adv: f64, weight: f64, hp: &GrpoHyper, st: &mut PassStats) -> Vec<f64> {
    let RowTokens { logp, old, rf, mask } = x;
    let mut d = vec![0.0; logp.len()];
    for t in 0..logp.len() {
        if mask[t] == 0.0 {
            continue;
        }
        let (loss, dl, _, k3) = token(logp[t], old[t], rf[t], adv, hp);
        let ratio = (logp[t] - old[t]).exp();
        st.loss += weight * mask[t] * loss;
        d[t] = weight * mask[t] * dl;
        st.tokens += 1;
        st.kl += k3;
        st.clip_low += (ratio < 1.0 - hp.eps_low && adv < 0.0) as u8 as f64;
        st.clip_high += (ratio > 1.0 + hp.eps_high && adv > 0.0) as u8 as f64;
        st.max_ratio_dev = st.max_ratio_dev.max((ratio - 1.0).abs());
    }
    d
}

/// How `pass` computes the loss: the head's temperature, the method's hyper-parameters, the
/// aggregation over tokens and the activation recompute of the forward.
#[derive(Clone, Copy, Debug)]
pub struct PassCfg<'a> {
    pub temp: f32,
    pub hp: &'a GrpoHyper,
    pub agg: Aggregation,
    pub rc: &'a Recompute,
}

/// Forward, loss and backward over one mini-batch (gradients accumulate into the model). With
/// `step` (`--optim-step per-layer`) the backward runs the optimizer step layer by layer; the
/// mini-batch must then be one micro-batch, and it runs even without a generated token (zero
/// gradients), as the whole-model step would.
pub fn pass(
    dev: &Device, model: &mut VlModel, rows: &[TrainRow], mbs: &[Vec<usize>], cfg: &PassCfg,
    mut step: Option<&mut StepFn>,
) -> Result<PassStats> {
    let PassCfg { temp, hp, agg, rc } = *cfg;
    if step.is_some() && mbs.len() != 1 {
        bail!(
            "--optim-step per-layer needs each mini-batch in one micro-batch, but this one takes {}: raise --batch-tokens or lower --mini-batch",
            mbs.len()
        );
    }
    let all: Vec<usize> = mbs.iter().flatten().copied().collect();
    let count = |i: usize| rows[i].example.weights.iter().filter(|&&w| w != 0.0).count();
    let total_tokens: usize = all.iter().map(|&i| count(i)).sum();
    let total_rows = all.iter().filter(|&&i| count(i) > 0).count();
    let mut st = PassStats::default();
    if total_tokens == 0 && step.is_none() {
        return Ok(st);
    }
    for mb in mbs {
        let (f, targets, w) = forward_at(dev, model, rows, mb, temp, rc)?;
        let (logp, lse, ent) = model.logprobs_entropy(dev, &f, &targets, Some(&w))?;
        let (lp, en) = (dev.to_vec(&logp)?, dev.to_vec(&ent)?);
        let mut dlogp = vec![0f32; lp.len()];
        let mut off = 0;
        for &i in mb {
            let r = &rows[i];
            let n = r.example.len();
            let weight = match agg {
                Aggregation::TokenMean => 1.0 / total_tokens as f64,
                Aggregation::SeqMean => 1.0 / (count(i).max(1) * total_rows.max(1)) as f64,
            };
            let lo: Vec<f64> = lp[off..off + n].iter().map(|&x| x as f64).collect();
            let old: Vec<f64> = r.old_logp.iter().map(|&x| x as f64).collect();
            let rf: Vec<f64> = r.ref_logp.iter().map(|&x| x as f64).collect();
            let mask: Vec<f64> = r.example.weights.iter().map(|&w| w as f64).collect();
            let dl =
                row_loss(RowTokens { logp: &lo, old: &old, rf: &rf, mask: &mask }, r.advantage, weight, hp, &mut st);
            for t in 0..n {
                dlogp[off + t] = dl[t] as f32;
                if mask[t] != 0.0 {
                    st.entropy += en[off + t] as f64;
                }
            }
            off += n;
        }
        let d = dev.upload(&dlogp, DType::F32)?;
        match step.as_deref_mut() {
            Some(s) => model.backward_logprobs_stepped(dev, &f, &LogpGrad::new(&targets, &lse, &d, 1.0 / temp), s)?,
            None => model.backward_logprobs_scaled(dev, &f, &targets, &lse, &d, 1.0 / temp)?,
        }
    }
    let n = st.tokens.max(1) as f64;
    st.kl /= n;
    st.entropy /= n;
    st.clip_low /= n;
    st.clip_high /= n;
    Ok(st)
}
