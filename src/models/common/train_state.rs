//! The training-state glue both model families share: which tensors train (every base weight,
//! or only the LoRA adapters once LoRA is on), their gradients by checkpoint name, and the
//! weights with the adapters merged in. A family supplies its parameter and gradient entry
//! lists; the combinations are written here once.

use super::lora::LoraState;
use super::params::{assemble, NamedTensors, ParamRef};
use crate::tensor::{Buf, Device};
use anyhow::Result;
use std::collections::HashMap;

/// Each parameter with its gradient, matched by checkpoint piece (name, first row), in the
/// parameters' order; parameters without a gradient (frozen, or the decoder layers of the
/// per-layer step, whose gradients never outlive their backward) are left out.
pub fn pair_grads<'p, 'g>(
    ps: Vec<(ParamRef, &'p mut Buf)>, gs: Vec<(ParamRef, &'g Buf)>,
) -> Vec<(ParamRef, &'p mut Buf, &'g Buf)> {
    let mut by_key: HashMap<(String, usize), &'g Buf> = gs.into_iter().map(|(r, g)| ((r.name, r.row0), g)).collect();
    ps.into_iter().filter_map(|(r, p)| by_key.remove(&(r.name.clone(), r.row0)).map(|g| (r, p, g))).collect()
}

pub trait TrainState {
    /// Every parameter as (checkpoint piece, buffer), frozen ones included.
    fn all_params(&self) -> Vec<(ParamRef, &Buf)>;
    /// The base weights' gradients in the same form; None before the first backward (and
    /// under LoRA, where the base is frozen).
    fn base_grads(&self) -> Option<Vec<(ParamRef, &Buf)>>;
    /// The LoRA adapters, when enabled.
    fn lora_state(&self) -> Option<&LoraState>;
    /// Zeroes the gradients (allocating them on first use).
    fn zero_grads(&mut self, dev: &Device) -> Result<()>;

    /// The tensors an optimizer should hold: the adapters under LoRA, else every parameter.
    fn trainable_entries(&self) -> Vec<(ParamRef, &Buf)> {
        match self.lora_state() {
            Some(l) => l.entries(),
            None => self.all_params(),
        }
    }

    /// Every weight as a full checkpoint tensor, with the LoRA adapters (if any) merged in:
    /// W + (alpha/r)·B·A.
    fn merged_weights(&self, dev: &Device) -> Result<NamedTensors> {
        let mut full = assemble(dev, self.all_params())?;
        if let Some(l) = self.lora_state() {
            l.merge_into(dev, &mut full)?;
        }
        Ok(full)
    }

    /// The gradients as full checkpoint tensors: name → (shape, values) (under LoRA: the
    /// adapters', by PEFT name). Empty before a backward.
    fn grads_by_name(&self, dev: &Device) -> Result<NamedTensors> {
        if let Some(l) = self.lora_state() {
            return l.grads_by_name(dev);
        }
        match self.base_grads() {
            Some(g) => assemble(dev, g),
            None => Ok(NamedTensors::new()),
        }
    }

    /// Allocates the gradients if a backward has not yet.
    fn ensure_grads(&mut self, dev: &Device) -> Result<()> {
        let have = match self.lora_state() {
            Some(l) => l.grads.is_some(),
            None => self.base_grads().is_some(),
        };
        if !have {
            self.zero_grads(dev)?;
        }
        Ok(())
    }
}
