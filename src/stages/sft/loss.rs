//! The SFT loss: the weighted NLL of a packed micro-batch through the fused log-prob op (and
//! its backward, whole or with the per-layer optimizer step), and the evaluation NLL.

use crate::data::dataset::Kind;
use crate::models::common::head::LogpGrad;
use crate::models::qwen2_5_vl::model::Recompute;
use crate::stages::examples::{micro_batches, pack, Example, Packed};
use crate::stages::model::VlModel;
use crate::tensor::Device;
use anyhow::Result;

/// Σ −w·log p(target) over a packed micro-batch, and its backward when `train`.
/// Returns (summed NLL, target count).
pub fn nll_micro_batch(
    dev: &Device, model: &mut VlModel, p: &Packed, rc: &Recompute, train: bool,
) -> Result<(f64, f64)> {
    let fwd = model.forward(dev, p, rc)?;
    let targets = dev.upload_i32(&p.targets)?;
    let w = dev.upload(&p.weights, crate::tensor::DType::F32)?;
    let (logp, lse) = model.logprobs(dev, &fwd, &targets, Some(&w))?;
    let lp = dev.to_vec(&logp)?;
    let nll: f64 = lp.iter().zip(&p.weights).map(|(&l, &w)| -(l as f64) * w as f64).sum();
    let n: f64 = p.weights.iter().map(|&w| w as f64).sum();
    if train {
        let neg: Vec<f32> = p.weights.iter().map(|&w| -w).collect();
        let dlogp = dev.upload(&neg, crate::tensor::DType::F32)?;
        model.backward_logprobs(dev, &fwd, &targets, &lse, &dlogp)?;
    }
    Ok((nll, n))
}

/// `nll_micro_batch` (train) with the per-layer optimizer step: `step` updates each layer as
/// soon as its gradient is final.
pub fn nll_micro_batch_stepped(
    dev: &Device, model: &mut VlModel, p: &Packed, rc: &Recompute, step: &mut crate::models::common::lm::StepFn,
) -> Result<(f64, f64)> {
    let fwd = model.forward(dev, p, rc)?;
    let targets = dev.upload_i32(&p.targets)?;
    let w = dev.upload(&p.weights, crate::tensor::DType::F32)?;
    let (logp, lse) = model.logprobs(dev, &fwd, &targets, Some(&w))?;
    let lp = dev.to_vec(&logp)?;
    let nll: f64 = lp.iter().zip(&p.weights).map(|(&l, &w)| -(l as f64) * w as f64).sum();
    let n: f64 = p.weights.iter().map(|&w| w as f64).sum();
    let neg: Vec<f32> = p.weights.iter().map(|&w| -w).collect();
    let dlogp = dev.upload(&neg, crate::tensor::DType::F32)?;
    model.backward_logprobs_stepped(
        dev,
        &fwd,
        &LogpGrad { targets: &targets, lse: &lse, dlogp: &dlogp, hidden_scale: 1.0 },
        step,
    )?;
    Ok((nll, n))
}

/// Mean NLL per assistant token over `examples` of `kind` (all kinds when None), no gradients.
pub fn eval_nll(
    dev: &Device, model: &mut VlModel, examples: &[Example], kind: Option<Kind>, batch_tokens: usize,
) -> Result<f64> {
    let idx: Vec<usize> = (0..examples.len()).filter(|&i| kind.is_none_or(|k| examples[i].kind == k)).collect();
    let lens: Vec<usize> = examples.iter().map(|e| e.len()).collect();
    let (mut s, mut n) = (0.0, 0.0);
    for mb in micro_batches(&idx, &lens, batch_tokens) {
        let refs: Vec<&Example> = mb.iter().map(|&i| &examples[i]).collect();
        let (a, b) = nll_micro_batch(dev, model, &pack(&refs), &Recompute::default(), false)?;
        s += a;
        n += b;
    }
    Ok(if n > 0.0 { s / n } else { f64::NAN })
}
