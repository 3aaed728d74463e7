//! AdamW over a model's parameters with f32 master weights, global-norm gradient clipping,
//! and its state on disk (for `--resume`).
//!
//! State per parameter tensor (keyed by checkpoint name and first row, since a model may keep
//! one checkpoint tensor as several pieces): master [n] f32, exp_avg [n], exp_avg_sq [n].
//! The model's own parameter buffer (bf16 on the GPU) receives the rounded master after a step.

use crate::checkpoint::safetensors_io::{save_sharded_with, SaveDtype};
use crate::checkpoint::Checkpoint;
use crate::models::common::params::ParamRef;
use crate::ops::{adamw, elementwise};
use crate::tensor::{Buf, Device};
use anyhow::{bail, Context, Result};
use std::path::Path;

struct Slot {
    key: String,
    master: Buf,
    m: Buf,
    v: Buf,
    n: usize,
}

pub struct Optimizer {
    pub hp: adamw::AdamW,
    /// Completed optimizer steps (AdamW's bias correction uses step + 1 next).
    pub step: u64,
    slots: Vec<Slot>,
}

/// The default `optim_step` of the stages' resolved plans.
pub fn whole_step() -> String {
    "whole".into()
}

/// Serde's skip test for `optim_step`: "whole" is not written, so the runs saved before the flag
/// existed resume unchanged.
pub fn is_whole_step(s: &str) -> bool {
    s == "whole"
}

/// Does a resolved `optim_step` ask for the per-layer step?
pub fn is_per_layer_step(s: &str) -> bool {
    s == "per-layer"
}

/// Validates `--optim-step` (whole | per-layer); true for per-layer. The per-layer step updates
/// each layer before the next one's gradient exists, so it cannot know the global gradient norm
/// (clipping) nor wait for more micro-batches (accumulation); under LoRA there are no base
/// layers to step.
pub fn check_optim_step(mode: &str, clip: f64, grad_accum: usize, lora_rank: usize) -> Result<bool> {
    match mode {
        "whole" => Ok(false),
        "per-layer" => {
            if clip > 0.0 {
                bail!("--optim-step per-layer needs --clip 0 (got {clip}): the global gradient norm is only known after every layer was already updated");
            }
            if grad_accum > 1 {
                bail!("--optim-step per-layer needs --grad-accum 1 (got {grad_accum}): each layer is updated during the backward of the step's only micro-batch");
            }
            if lora_rank > 0 {
                bail!("--optim-step per-layer is for a full fine-tune: with --lora-rank {lora_rank} only the adapters train and their gradients are small");
            }
            Ok(true)
        }
        other => bail!("--optim-step: expected whole or per-layer, got {other:?}"),
    }
}

/// The key of a parameter piece in the optimizer state.
pub fn slot_key(r: &ParamRef) -> String {
    if r.is_whole() {
        r.name.clone()
    } else {
        format!("{}@{}", r.name, r.row0)
    }
}

/// What one optimizer step did.
#[derive(Clone, Copy, Debug)]
pub struct StepReport {
    /// Global L2 norm of the (already averaged) gradient, before clipping.
    pub grad_norm: f64,
    /// The factor the gradient was scaled by (1 unless clipped).
    pub clip_scale: f64,
}

impl Optimizer {
    /// Fresh state for `params` (their current values become the masters). `trainable` picks the
    /// tensors to update (e.g. everything but a frozen vision tower).
    pub fn new(
        dev: &Device, hp: adamw::AdamW, params: &[(ParamRef, &Buf)], trainable: &dyn Fn(&ParamRef) -> bool,
    ) -> Result<Self> {
        let mut slots = Vec::new();
        for (r, p) in params.iter().filter(|(r, _)| trainable(r)) {
            let n = r.numel();
            let mut master = dev.zeros_f32(n)?;
            elementwise::cast(dev, &mut master, p, n)?;
            slots.push(Slot { key: slot_key(r), master, m: dev.zeros_f32(n)?, v: dev.zeros_f32(n)?, n });
        }
        Ok(Optimizer { hp, step: 0, slots })
    }

    pub fn num_params(&self) -> usize {
        self.slots.iter().map(|s| s.n).sum()
    }

    /// Bytes of the allocated state (masters and both moments), for memory accounting.
    pub fn state_bytes(&self) -> usize {
        self.slots
            .iter()
            .map(|s| [&s.master, &s.m, &s.v].iter().map(|b| b.len() * b.dtype().size()).sum::<usize>())
            .sum()
    }

    /// Global gradient norm over the trainable tensors, with `grad_scale` applied first.
    pub fn grad_norm(&self, dev: &Device, pg: &[(ParamRef, &mut Buf, &Buf)], grad_scale: f64) -> Result<f64> {
        let mut ss = 0f64;
        for (r, _, g) in pg {
            if self.find(&slot_key(r)).is_some() {
                ss += adamw::sum_squares(dev, g, r.numel())?;
            }
        }
        Ok(ss.sqrt() * grad_scale)
    }

    /// One AdamW step at learning rate `lr`. `grad_scale` averages accumulated gradients
    /// (1/tokens, say); `clip` > 0 clips the global norm of the scaled gradient to it.
    pub fn step(
        &mut self, dev: &Device, pg: Vec<(ParamRef, &mut Buf, &Buf)>, lr: f64, grad_scale: f64, clip: f64,
    ) -> Result<StepReport> {
        let grad_norm = self.grad_norm(dev, &pg, grad_scale)?;
        if !grad_norm.is_finite() {
            bail!(
                "the gradient norm is {grad_norm} at step {}: the loss diverged (lower the learning rate)",
                self.step + 1
            );
        }
        let clip_scale = if clip > 0.0 && grad_norm > clip { clip / grad_norm } else { 1.0 };
        self.step += 1;
        let mut seen = 0;
        for (r, p, g) in pg {
            seen += self.adamw_one(dev, &r, p, g, lr, grad_scale * clip_scale)? as usize;
        }
        if seen != self.slots.len() {
            bail!("optimizer: {} of {} parameter tensors had gradients", seen, self.slots.len());
        }
        Ok(StepReport { grad_norm, clip_scale })
    }

    /// AdamW on one tensor at the current `self.step`; false when `r` is not trainable. The
    /// whole-model and the per-layer step both go through here, so their updates are identical.
    fn adamw_one(&mut self, dev: &Device, r: &ParamRef, p: &mut Buf, g: &Buf, lr: f64, scale: f64) -> Result<bool> {
        let Some(i) = self.find(&slot_key(r)) else { return Ok(false) };
        let hp = adamw::AdamW { lr: lr as f32, ..self.hp };
        let s = &mut self.slots[i];
        adamw::step(
            dev,
            adamw::Bufs { param: p, master: &mut s.master, grad: g, m: &mut s.m, v: &mut s.v },
            s.n,
            &hp,
            self.step,
            scale as f32,
        )
        .with_context(|| format!("AdamW step on `{}`", r.name))?;
        Ok(true)
    }

    /// Starts a per-layer step (`--optim-step per-layer`): the backward hands each layer's
    /// gradients to `LayerStep::apply` as soon as they are final, then `finish` ends the step.
    /// No clipping: the global norm is only known after every tensor was updated.
    pub fn begin_layered(&mut self, lr: f64, grad_scale: f64) -> LayerStep<'_> {
        self.step += 1;
        LayerStep { opt: self, lr, grad_scale, sum_squares: 0.0, seen: 0 }
    }
}

/// One optimizer step applied piecewise, during the backward (see `Optimizer::begin_layered`).
pub struct LayerStep<'o> {
    opt: &'o mut Optimizer,
    lr: f64,
    grad_scale: f64,
    sum_squares: f64,
    seen: usize,
}

impl LayerStep<'_> {
    /// AdamW on these tensors now (their gradients are final). A non-finite gradient stops the
    /// step before the tensor is touched (layers above it are already updated: the run fails).
    pub fn apply(&mut self, dev: &Device, pg: Vec<(ParamRef, &mut Buf, &Buf)>) -> Result<()> {
        for (r, p, g) in pg {
            if self.opt.find(&slot_key(&r)).is_none() {
                continue;
            }
            let ss = adamw::sum_squares(dev, g, r.numel())?;
            if !ss.is_finite() {
                bail!(
                    "the gradient of `{}` is not finite at step {}: the loss diverged (lower the learning rate)",
                    r.name,
                    self.opt.step
                );
            }
            self.sum_squares += ss;
            self.seen += self.opt.adamw_one(dev, &r, p, g, self.lr, self.grad_scale)? as usize;
        }
        Ok(())
    }

    /// Ends the step: every trainable tensor must have been updated exactly once.
    pub fn finish(self) -> Result<StepReport> {
        if self.seen != self.opt.slots.len() {
            bail!("optimizer: {} of {} parameter tensors had gradients", self.seen, self.opt.slots.len());
        }
        Ok(StepReport { grad_norm: self.sum_squares.sqrt() * self.grad_scale, clip_scale: 1.0 })
    }
}

impl Optimizer {
    fn find(&self, key: &str) -> Option<usize> {
        self.slots.iter().position(|s| s.key == key)
    }

    /// The f32 master copy of each trainable tensor, by slot key (exact weights for saving).
    pub fn masters(&self) -> impl Iterator<Item = (&str, &Buf)> {
        self.slots.iter().map(|s| (s.key.as_str(), &s.master))
    }

    /// Writes master, exp_avg and exp_avg_sq of every tensor (f32) into `dir/state.safetensors`.
    pub fn save(&self, dev: &Device, dir: &Path) -> Result<()> {
        let mut specs = Vec::new();
        for s in &self.slots {
            for part in ["master", "exp_avg", "exp_avg_sq"] {
                specs.push((format!("{}.{part}", s.key), vec![s.n]));
            }
        }
        save_sharded_with(dir, &specs, SaveDtype::F32, usize::MAX, |i| {
            let s = &self.slots[i / 3];
            dev.to_vec(match i % 3 {
                0 => &s.master,
                1 => &s.m,
                _ => &s.v,
            })
        })
    }

    /// Restores the state written by `save` and copies the masters into the model's parameters.
    pub fn load(&mut self, dev: &Device, dir: &Path, params: Vec<(ParamRef, &mut Buf)>, step: u64) -> Result<()> {
        let ck = Checkpoint::open(dir).with_context(|| format!("reading the optimizer state in {}", dir.display()))?;
        for s in &mut self.slots {
            for (part, buf) in [("master", &mut s.master), ("exp_avg", &mut s.m), ("exp_avg_sq", &mut s.v)] {
                let name = format!("{}.{part}", s.key);
                let v = ck.get_f32(&name, &[s.n])?;
                if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                    bail!("{}: optimizer tensor `{name}` holds {} at index {i}", dir.display(), v[i]);
                }
                *buf = dev.upload(&v, crate::tensor::DType::F32)?;
            }
        }
        for (r, p) in params {
            if let Some(i) = self.find(&slot_key(&r)) {
                elementwise::cast(dev, p, &self.slots[i].master, r.numel())?;
            }
        }
        self.step = step;
        Ok(())
    }
}
