//! "train7b": the training step of a 7B-shaped Qwen2.5-VL (the published config, random
//! weights initialised on the GPU). Measures forward + fused log-prob + backward of the
//! language model at S = 4096 (tokens/s, to compare with PyTorch + transformers eager,
//! 10,455 tokens/s measured on this H200), then the same with one 448×448 image through the
//! vision tower, the AdamW step, and the device memory each stage holds. The full fine-tune
//! step stores the linear weights' gradients in bf16 (`GradStore::Bf16Linear`).

use super::{time_gpu, BenchRow};
use crate::models::common::head::LogpGrad;
use crate::models::common::params::{GradStore, ParamRef};
use crate::models::common::train_state::TrainState;
use crate::models::qwen2_5_vl::config::QwenVlConfig;
use crate::models::qwen2_5_vl::model::{Batch, QwenVl, Recompute};
use crate::ops::{adamw::AdamW, elementwise, init};
use crate::rng::Rng;
use crate::tensor::{DType, Device};
use crate::train::optim::Optimizer;
use anyhow::{Context, Result};
use std::path::Path;

pub const CONFIG_7B: &str = include_str!("../../assets/qwen2_5_vl_7b/config.json");

fn gib(b: usize) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// A 7B-shaped model with random weights, built on the device.
pub fn random_7b(dev: &Device) -> Result<QwenVl> {
    let v: serde_json::Value = serde_json::from_str(CONFIG_7B).context("embedded 7B config")?;
    let cfg = QwenVlConfig::from_json(&v, Path::new("<embedded 7B config>"))?;
    let mut k = 0u64;
    QwenVl::build(cfg, &mut |r: &ParamRef| {
        let n = r.numel();
        let mut b = dev.zeros_act(n)?;
        k += 1;
        let name = r.name.as_str();
        if (name.contains("norm") || name.contains("ln_q")) && name.ends_with(".weight") {
            elementwise::fill(dev, &mut b, 1.0, n)?;
        } else {
            init::normal(dev, &mut b, n, 1000 + k, 0.0, 0.02)?;
        }
        Ok(b)
    })
}

pub fn run(dev: &Device, quick: bool) -> Result<Vec<BenchRow>> {
    let Device::Cuda(g) = dev else { return Ok(Vec::new()) };
    let used = || {
        let (free, total) = g.mem_info();
        total - free
    };
    let base = used();
    let mut model = random_7b(dev)?;
    g.sync()?;
    let w_bytes = used() - base;
    let s = if quick { 1024 } else { 4096 };
    let vocab = model.tdims.vocab;
    let mut rng = Rng::new(7);
    let ids: Vec<i32> = (0..s).map(|_| rng.below(151_000) as i32).collect();
    let pos: Vec<i32> = (0..3).flat_map(|_| 0..s as i32).collect();
    let cu = [0, s as i32];
    let targets: Vec<i32> = (0..s).map(|t| if t + 1 < s { ids[t + 1] } else { 0 }).collect();
    let w: Vec<f32> = (0..s).map(|t| if t + 1 < s { 1.0 / (s - 1) as f32 } else { 0.0 }).collect();
    let (tb, wb) = (dev.upload_i32(&targets)?, dev.upload(&w, DType::F32)?);
    let neg: Vec<f32> = w.iter().map(|x| -x).collect();
    let dl = dev.upload(&neg, DType::F32)?;
    let mut rows = Vec::new();
    for (label, rc) in
        [("keep activations", Recompute::default()), ("recompute all layers", Recompute::all(model.tdims.n_layers))]
    {
        let batch = Batch { ids: &ids, cu_seqlens: &cu, pos3: &pos, pixels: &[], grids: &[] };
        let mut peak = 0usize;
        let mut step = || -> Result<()> {
            model.zero_grads(dev)?;
            let f = model.forward(dev, &batch, &rc)?;
            let (_, lse) = model.logprobs(dev, &f, &tb, Some(&wb))?;
            peak = peak.max(used());
            model.backward_logprobs(dev, &f, &tb, &lse, &dl)?;
            peak = peak.max(used());
            Ok(())
        };
        let ms = time_gpu(g, 1, if quick { 2 } else { 3 }, &mut step)?;
        // 6·N_lm·S for the dense weights plus attention (causal): 3 × (2·2·S²·D·L / 2).
        let n_lm: usize = model
            .param_entries()
            .iter()
            .filter(|(r, _)| !r.name.starts_with("visual.") && !r.name.contains("embed_tokens"))
            .map(|(r, _)| r.numel())
            .sum();
        let d = model.tdims.layer.d;
        let flops =
            6.0 * n_lm as f64 * s as f64 + 3.0 * 2.0 * (s as f64).powi(2) * d as f64 * model.tdims.n_layers as f64;
        rows.push(BenchRow {
            op: "qwen7b lm fwd+bwd".into(),
            shape: format!("S={s} V={vocab} {label}"),
            ms,
            flops,
            note: format!(
                "{:.0} tok/s (eager torch 10455); weights {:.1} GiB, peak {:.1} GiB",
                s as f64 / (ms * 1e-3),
                gib(w_bytes),
                gib(peak - base)
            ),
            ..Default::default()
        });
    }
    // One SFT step as `am3 sft` runs it: optimizer state resident (f32 master, m, v), every
    // layer recomputed in backward, then AdamW. Full fine-tune first, then with the vision
    // tower frozen (its 0.67 B parameters get no optimizer state).
    let rc = Recompute::all(model.tdims.n_layers);
    let batch = Batch { ids: &ids, cu_seqlens: &cu, pos3: &pos, pixels: &[], grids: &[] };
    let freeze_vision = |r: &ParamRef| !r.name.starts_with("visual.");
    let all = |_: &ParamRef| true;
    // A full fine-tune fits only with bf16 linear-weight gradients (f32 ones: bf16 weights 15.4 +
    // grads 30.9 + AdamW 92.7 GiB = 139 GiB before activations, run 4 went out of memory).
    // The third case is `--optim-step per-layer`: one decoder layer's gradient live, no clipping.
    type Case<'a> = (&'a str, &'a dyn Fn(&ParamRef) -> bool, GradStore, bool);
    let cases: [Case; 3] = [
        ("full fine-tune, bf16 linear grads", &all, GradStore::Bf16Linear, false),
        ("vision frozen, f32 grads", &freeze_vision, GradStore::F32, false),
        ("full fine-tune, bf16 linear grads, per-layer step", &all, GradStore::Bf16Linear, true),
    ];
    for (label, trainable, store, per_layer) in cases {
        model.grad_store = store;
        model.per_layer_grads = per_layer;
        // Drop the previous case's gradients before the optimizer state is allocated.
        model.zero_grads(dev)?;
        let hp = AdamW { lr: 1e-5, ..Default::default() };
        let n_train: usize = model.param_entries().iter().filter(|(r, _)| trainable(r)).map(|(r, _)| r.numel()).sum();
        let opt_bytes = n_train * 12;
        let (free, _) = g.mem_info();
        let mut opt = match Optimizer::new(dev, hp, &model.param_entries(), trainable) {
            Ok(o) => o,
            Err(e) => {
                rows.push(BenchRow {
                    op: "qwen7b sft step".into(),
                    shape: format!("S={s}, {label}"),
                    note: format!(
                        "does not fit: the optimizer state needs {:.1} GiB, {:.1} GiB were free ({e:#})",
                        gib(opt_bytes),
                        gib(free)
                    ),
                    ..Default::default()
                });
                continue;
            }
        };
        let mut peak = used();
        let mut step = || -> Result<()> {
            model.zero_grads(dev)?;
            let f = model.forward(dev, &batch, &rc)?;
            let (_, lse) = model.logprobs(dev, &f, &tb, Some(&wb))?;
            peak = peak.max(used());
            if per_layer {
                let mut ls = opt.begin_layered(1e-5, 1.0);
                model.backward_logprobs_stepped(
                    dev,
                    &f,
                    &LogpGrad { targets: &tb, lse: &lse, dlogp: &dl, hidden_scale: 1.0 },
                    &mut |pg| ls.apply(dev, pg),
                )?;
                ls.finish()?;
                peak = peak.max(used());
                return Ok(());
            }
            model.backward_logprobs(dev, &f, &tb, &lse, &dl)?;
            peak = peak.max(used());
            drop(f);
            opt.step(dev, model.params_and_grads(), 1e-5, 1.0, 1.0)?;
            peak = peak.max(used());
            Ok(())
        };
        let r = time_gpu(g, 1, 2, &mut step);
        let row = match r {
            Ok(ms) => BenchRow {
                op: "qwen7b sft step".into(),
                shape: format!("S={s}, {label}, recompute"),
                ms,
                // `peak - base` misses memory that earlier suites left cached in the allocator's pool
                // and this suite reused; `peak` itself (the card's whole use, context included)
                // is the conservative "does it fit" figure.
                note: format!(
                    "{:.0} tok/s incl. AdamW over {:.2} B params; peak {:.1} GiB over the suite's start, {:.1} GiB in use on the card, of {:.1}",
                    s as f64 / (ms * 1e-3),
                    n_train as f64 / 1e9,
                    gib(peak - base),
                    gib(peak),
                    gib(g.mem_info().1)
                ),
                ..Default::default()
            },
            Err(e) => BenchRow {
                op: "qwen7b sft step".into(),
                shape: format!("S={s}, {label}, recompute"),
                note: format!("out of memory with {:.1} GiB of optimizer state resident: {e:#}", gib(opt_bytes)),
                ..Default::default()
            },
        };
        rows.push(row);
        drop(opt);
        model.per_layer_grads = false;
        g.sync()?;
    }
    Ok(rows)
}
