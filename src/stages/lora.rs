//! LoRA for the stages: `VlModel` calls that enable adapters on either family, list what the
//! optimizer trains, and save the result, either merged into full HF weights (config.json +
//! safetensors, loadable as the base family) or as a PEFT adapter directory
//! (`adapter_model.safetensors` + `adapter_config.json`). The adapter math and storage live in
//! `models::common::lora`; this file only routes to the model inside `VlModel`.

use super::model::{Net, VlModel};
use crate::models::common::train_state::TrainState;
use crate::checkpoint::safetensors_io::{save_sharded_with, SaveDtype};
use crate::models::common::lora::{LoraConfig, LoraState};
use crate::models::common::params::ParamRef;
use crate::tensor::{Buf, Device};
use anyhow::{bail, Result};
use std::path::Path;

/// How a LoRA run saves its checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraSave {
    /// Full weights with W += (alpha/r)·B·A (a plain checkpoint of the base family).
    Merged,
    /// The PEFT adapter files only (the base stays where it was).
    Adapter,
}

impl std::str::FromStr for LoraSave {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "merged" => Ok(LoraSave::Merged),
            "adapter" => Ok(LoraSave::Adapter),
            other => bail!("--lora-save: expected `merged` or `adapter`, got `{other}`"),
        }
    }
}

impl VlModel {
    /// Adapters on the projections `cfg` names (the base is frozen from then on).
    pub fn enable_lora(&mut self, dev: &Device, cfg: &LoraConfig) -> Result<()> {
        match &mut self.net {
            Net::Qwen(m) => m.enable_lora(dev, cfg),
            Net::Llava(m) => m.enable_lora(dev, cfg),
        }
    }

    /// The adapters, when enabled.
    pub fn lora(&self) -> Option<&LoraState> {
        match &self.net {
            Net::Qwen(m) => m.lora(),
            Net::Llava(m) => m.lora(),
        }
    }

    /// What the optimizer holds: the adapters under LoRA, else every parameter.
    pub fn trainable_entries(&self) -> Vec<(ParamRef, &Buf)> {
        match &self.net {
            Net::Qwen(m) => m.trainable_entries(),
            Net::Llava(m) => m.trainable_entries(),
        }
    }

    /// Writes the weights with the adapters merged in (the source checkpoint's names, `dtype`,
    /// shards of at most 5 GB) and config.json into `dir`.
    pub fn save_merged(&self, dev: &Device, dir: &Path, dtype: SaveDtype) -> Result<()> {
        let full = match &self.net {
            Net::Qwen(m) => m.merged_weights(dev)?,
            Net::Llava(m) => m.merged_weights(dev)?,
        };
        let specs: Vec<(String, Vec<usize>)> = full.iter().map(|(n, (s, _))| (self.stored_name(n).to_string(), s.clone())).collect();
        let vals: Vec<&Vec<f32>> = full.values().map(|(_, v)| v).collect();
        save_sharded_with(dir, &specs, dtype, 5 << 30, |i| Ok(vals[i].clone()))?;
        match &self.net {
            Net::Qwen(m) => m.cfg.save(dir),
            Net::Llava(m) => m.cfg.save(dir),
        }
    }

    /// Writes the PEFT adapter files into `dir` (module paths as the source checkpoint names
    /// them; `base_model` goes into adapter_config.json).
    pub fn save_lora_adapter(&self, dev: &Device, dir: &Path, base_model: &str, dtype: SaveDtype) -> Result<()> {
        match self.lora() {
            Some(l) => l.save_adapter(dev, dir, base_model, dtype, &|n| self.stored_name(n).to_string()),
            None => bail!("no LoRA adapters to save (LoRA is not enabled)"),
        }
    }

    /// Saves what a training run produced: plain weights without LoRA, else per `how`.
    pub fn save_trained(&self, dev: &Device, dir: &Path, dtype: SaveDtype, how: LoraSave, base_model: &str) -> Result<()> {
        match (self.lora().is_some(), how) {
            (false, _) => self.save(dev, dir, dtype),
            (true, LoraSave::Merged) => self.save_merged(dev, dir, dtype),
            (true, LoraSave::Adapter) => self.save_lora_adapter(dev, dir, base_model, dtype),
        }
    }
}
