//! The model a stage trains or evaluates, whichever family it is: `VlModel` wraps Qwen2.5-VL or
//! LLaVA-NeXT behind the few calls the stages make (load from a directory by config.json's
//! `model_type`, forward of a packed batch, logits, log-probs and their backward, parameters
//! and gradients, saving), `Processor` is the family's image preprocessor settings, and
//! `Encoder` turns dataset samples into training examples with the family's chat template.
//!
//! A model remembers the tensor names its checkpoint used (e.g. `model.language_model.*` from
//! transformers 5), so saved checkpoints and gradient files use the same names as the source.

use super::examples::{encode, encode_llava, Example, Packed};
use crate::checkpoint::safetensors_io::{save_sharded_with, SaveDtype};
use crate::checkpoint::Checkpoint;
use crate::data::dataset::Sample;
use crate::models::common::head::LogpGrad;
use crate::models::common::lm::LmDims;
use crate::models::common::params::{assemble, GradStore, NamedTensors, ParamRef};
use crate::models::common::train_state::TrainState;
use crate::models::llava_next::chat::{LlavaChatOptions, LlavaChatTemplate};
use crate::models::llava_next::config::{spellings, LlavaNextConfig, LlavaPreprocessorConfig};
use crate::models::llava_next::model::{LlavaFwd, LlavaNext};
use crate::models::qwen2_5_vl::chat::ChatTemplate;
use crate::models::qwen2_5_vl::config::{QwenPreprocessorConfig, QwenVlConfig};
use crate::models::qwen2_5_vl::model::{QwenFwd, QwenVl, Recompute};
use crate::models::qwen2_5_vl::text::aliases as qwen_aliases;
use crate::models::{limits, read_json};
use crate::tensor::{Buf, Device};
use crate::train::optim::slot_key;
use anyhow::{bail, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use tokenizers::Tokenizer;

/// The model families the stages run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `model_type: "qwen2_5_vl"`.
    Qwen,
    /// `model_type: "llava_next"`.
    Llava,
}

impl Family {
    /// The family of the checkpoint in `dir`, from `config.json`'s `model_type` (or, without
    /// one, its `architectures`; Qwen2.5-VL when neither says).
    pub fn of_dir(dir: &Path) -> Result<Family> {
        let path = dir.join("config.json");
        if !path.is_file() {
            bail!("{}: not a model directory (no config.json)", dir.display());
        }
        let v = read_json(&path)?;
        match v.get("model_type").and_then(|m| m.as_str()) {
            Some("qwen2_5_vl") => Ok(Family::Qwen),
            Some("llava_next") => Ok(Family::Llava),
            Some(other) => bail!("{}: model_type {other:?} is not supported (qwen2_5_vl, llava_next)", path.display()),
            None => {
                let archs = v.get("architectures").map(|a| a.to_string()).unwrap_or_default();
                Ok(if archs.contains("LlavaNext") { Family::Llava } else { Family::Qwen })
            }
        }
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Family::Qwen => "qwen2_5_vl",
            Family::Llava => "llava_next",
        }
    }
}

/// The network itself (one per process, so the variants' size difference does not matter).
#[allow(clippy::large_enum_variant)]
pub enum Net {
    Qwen(QwenVl),
    Llava(LlavaNext),
}

/// A model of either family, with the tensor names of the checkpoint it came from.
pub struct VlModel {
    pub net: Net,
    /// Canonical name → the name the source checkpoint stored it under, where they differ.
    stored: BTreeMap<String, String>,
}

/// What a forward keeps for the head and the backward.
pub enum VlFwd {
    Qwen(QwenFwd),
    Llava(LlavaFwd),
}

impl From<QwenVl> for VlModel {
    fn from(m: QwenVl) -> Self {
        VlModel { net: Net::Qwen(m), stored: BTreeMap::new() }
    }
}

impl From<LlavaNext> for VlModel {
    fn from(m: LlavaNext) -> Self {
        VlModel { net: Net::Llava(m), stored: BTreeMap::new() }
    }
}

/// Canonical name → stored name for every entry whose checkpoint spelling differs.
fn stored_names(
    ckpt: &Checkpoint, entries: &[(ParamRef, &Buf)], spell: &dyn Fn(&str) -> Vec<String>,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (r, _) in entries {
        if ckpt.has(&r.name) {
            continue;
        }
        if let Some(s) = spell(&r.name).into_iter().find(|s| ckpt.has(s)) {
            out.insert(r.name.clone(), s);
        }
    }
    out
}

/// One warning line for the checkpoint tensors no parameter was read from.
fn warn_unused(ckpt: &Checkpoint, entries: &[(ParamRef, &Buf)], stored: &BTreeMap<String, String>) {
    let used: BTreeSet<&str> =
        entries.iter().map(|(r, _)| stored.get(&r.name).map_or(r.name.as_str(), String::as_str)).collect();
    let unused: Vec<&str> = ckpt.names().into_iter().filter(|n| !used.contains(n)).collect();
    if let Some(line) = limits::unused_tensors_warning(ckpt.dir(), &unused) {
        eprintln!("{line}");
    }
}

impl VlModel {
    /// Loads the checkpoint in `dir` (config.json + safetensors) as the family its config names.
    pub fn load(dev: &Device, dir: &Path) -> Result<VlModel> {
        match Family::of_dir(dir)? {
            Family::Qwen => {
                let cfg = QwenVlConfig::load(dir)?;
                limits::ensure_weights_fit(dev, cfg.num_params(), &dir.join("config.json"))?;
                let ckpt = Checkpoint::open(dir)?;
                let m = QwenVl::from_checkpoint(dev, cfg, &ckpt)?;
                let stored = stored_names(&ckpt, &m.param_entries(), &qwen_aliases);
                warn_unused(&ckpt, &m.param_entries(), &stored);
                Ok(VlModel { net: Net::Qwen(m), stored })
            }
            Family::Llava => {
                let cfg = LlavaNextConfig::load(dir)?;
                limits::ensure_weights_fit(dev, cfg.num_params(), &dir.join("config.json"))?;
                let ckpt = Checkpoint::open(dir)?;
                let m = LlavaNext::from_checkpoint(dev, cfg, &ckpt)?;
                let stored = stored_names(&ckpt, &m.param_entries(), &spellings);
                warn_unused(&ckpt, &m.param_entries(), &stored);
                Ok(VlModel { net: Net::Llava(m), stored })
            }
        }
    }

    pub fn family(&self) -> Family {
        match self.net {
            Net::Qwen(_) => Family::Qwen,
            Net::Llava(_) => Family::Llava,
        }
    }

    /// The decoder's `max_position_embeddings` (the longest sequence it is made for).
    pub fn max_positions(&self) -> usize {
        match &self.net {
            Net::Qwen(m) => m.cfg.text.max_position_embeddings,
            Net::Llava(m) => m.cfg.text.max_position_embeddings,
        }
    }

    /// Decoder sizes (layers, vocabulary, widths).
    pub fn tdims(&self) -> &LmDims {
        match &self.net {
            Net::Qwen(m) => &m.tdims,
            Net::Llava(m) => &m.tdims,
        }
    }

    /// Is the canonical tensor `name` part of the vision tower (what `--freeze-vision` keeps)?
    pub fn is_vision(&self, name: &str) -> bool {
        match self.net {
            Net::Qwen(_) => name.starts_with("visual."),
            Net::Llava(_) => name.starts_with("vision_tower."),
        }
    }

    /// The name the source checkpoint used for the canonical tensor `name`.
    pub fn stored_name<'a>(&'a self, name: &'a str) -> &'a str {
        self.stored.get(name).map_or(name, String::as_str)
    }

    /// The training forward of a packed batch up to the final hidden states. Qwen reads the
    /// batch's M-RoPE positions and grids; LLaVA its image sizes (positions restart at 0 in
    /// every sequence).
    pub fn forward(&self, dev: &Device, p: &Packed, rc: &Recompute) -> Result<VlFwd> {
        Ok(match &self.net {
            Net::Qwen(m) => VlFwd::Qwen(m.forward(dev, &p.batch(), rc)?),
            Net::Llava(m) => VlFwd::Llava(m.forward(dev, &p.llava_batch(), rc)?),
        })
    }

    /// logits [S, V].
    pub fn logits(&self, dev: &Device, f: &VlFwd) -> Result<Buf> {
        match (&self.net, f) {
            (Net::Qwen(m), VlFwd::Qwen(f)) => m.logits(dev, f),
            (Net::Llava(m), VlFwd::Llava(f)) => m.logits(dev, f),
            _ => bail!("a forward of one model family was given to the other"),
        }
    }

    /// (logp, lse), each [S] f32: log p(targets[t]) where mask[t] ≠ 0 (0 elsewhere).
    pub fn logprobs(&self, dev: &Device, f: &VlFwd, targets: &Buf, mask: Option<&Buf>) -> Result<(Buf, Buf)> {
        match (&self.net, f) {
            (Net::Qwen(m), VlFwd::Qwen(f)) => m.logprobs(dev, f, targets, mask),
            (Net::Llava(m), VlFwd::Llava(f)) => m.logprobs(dev, f, targets, mask),
            _ => bail!("a forward of one model family was given to the other"),
        }
    }

    /// Runs `f` with the LoRA adapters switched off (forwards see the base weights only).
    pub fn without_adapters<T>(&self, f: impl FnOnce(&VlModel) -> T) -> T {
        let flag = match &self.net {
            Net::Qwen(m) => &m.adapters_off,
            Net::Llava(m) => &m.adapters_off,
        };
        let was = flag.replace(true);
        let out = f(self);
        flag.set(was);
        out
    }

    /// Scales the forward's final hidden states by `s` (1/T: the head then gives log-probs at
    /// temperature T); pair with `backward_logprobs_scaled(.., s)`.
    pub fn scale_final_hidden(&self, dev: &Device, f: &mut VlFwd, s: f32) -> Result<()> {
        match f {
            VlFwd::Qwen(f) => f.text.scale_final_hidden(dev, s),
            VlFwd::Llava(f) => f.text.scale_final_hidden(dev, s),
        }
    }

    /// `backward_logprobs` after `scale_final_hidden(s)`.
    pub fn backward_logprobs_scaled(
        &mut self, dev: &Device, f: &VlFwd, targets: &Buf, lse: &Buf, dlogp: &Buf, s: f32,
    ) -> Result<()> {
        match (&mut self.net, f) {
            (Net::Qwen(m), VlFwd::Qwen(f)) => m.backward_logprobs_scaled(dev, f, targets, lse, dlogp, s),
            (Net::Llava(m), VlFwd::Llava(f)) => m.backward_logprobs_scaled(dev, f, targets, lse, dlogp, s),
            _ => bail!("a forward of one model family was given to the other"),
        }
    }

    /// `backward_logprobs_scaled` with the per-layer optimizer step (full fine-tune, after
    /// `set_per_layer_grads(true)` and `zero_grads`): `step` receives each text layer's
    /// (piece, weight, gradient) as soon as that gradient is final, then the rest.
    pub fn backward_logprobs_stepped(
        &mut self, dev: &Device, f: &VlFwd, h: &LogpGrad, step: &mut crate::models::common::lm::StepFn,
    ) -> Result<()> {
        match (&mut self.net, f) {
            (Net::Qwen(m), VlFwd::Qwen(f)) => m.backward_logprobs_stepped(dev, f, h, step),
            (Net::Llava(m), VlFwd::Llava(f)) => m.backward_logprobs_stepped(dev, f, h, step),
            _ => bail!("a forward of one model family was given to the other"),
        }
    }

    /// Whether the next `zero_grads` leaves the text layers' gradients out (the per-layer step).
    pub fn set_per_layer_grads(&mut self, on: bool) {
        match &mut self.net {
            Net::Qwen(m) => m.per_layer_grads = on,
            Net::Llava(m) => m.per_layer_grads = on,
        }
    }

    /// `--freeze-vision`: the base backward skips the vision tower (its gradients stay zero; the
    /// optimizer has no state for it). What else trains is bit-identical.
    pub fn set_frozen_vision(&mut self, on: bool) {
        match &mut self.net {
            Net::Qwen(m) => m.frozen_vision = on,
            Net::Llava(m) => m.frozen_vision = on,
        }
    }

    /// Every parameter tensor, mutably (frozen ones included).
    pub fn params_mut(&mut self) -> Vec<(ParamRef, &mut Buf)> {
        match &mut self.net {
            Net::Qwen(m) => m.params_mut(),
            Net::Llava(m) => m.params_mut(),
        }
    }

    /// Entropy [S] of the head's distribution too (see `logprobs`).
    pub fn logprobs_entropy(
        &self, dev: &Device, f: &VlFwd, targets: &Buf, mask: Option<&Buf>,
    ) -> Result<(Buf, Buf, Buf)> {
        let (h, s) = match f {
            VlFwd::Qwen(f) => (f.final_hidden(), f.tokens()),
            VlFwd::Llava(f) => (f.final_hidden(), f.tokens()),
        };
        let (d, v) = (self.tdims().layer.d, self.tdims().vocab);
        let head = match &self.net {
            Net::Qwen(m) => m.params.text.head(),
            Net::Llava(m) => m.params.text.head(),
        };
        let (mut logp, mut lse, mut ent) = (dev.zeros_f32(s)?, dev.zeros_f32(s)?, dev.zeros_f32(s)?);
        use crate::ops::logprob::{Dims, FwdOut, Inputs};
        let out = FwdOut { logp: &mut logp, lse: &mut lse, entropy: Some(&mut ent) };
        let head_in = Inputs { hidden: h, lm_head: head, targets, dims: Dims { t: s, h: d, v } };
        crate::ops::logprob::fwd(dev, out, head_in, mask)?;
        Ok((logp, lse, ent))
    }

    /// Backward from d objective / d logp [S] (f32): accumulates every gradient.
    pub fn backward_logprobs(&mut self, dev: &Device, f: &VlFwd, targets: &Buf, lse: &Buf, dlogp: &Buf) -> Result<()> {
        match (&mut self.net, f) {
            (Net::Qwen(m), VlFwd::Qwen(f)) => m.backward_logprobs(dev, f, targets, lse, dlogp),
            (Net::Llava(m), VlFwd::Llava(f)) => m.backward_logprobs(dev, f, targets, lse, dlogp),
            _ => bail!("a forward of one model family was given to the other"),
        }
    }

    /// Every parameter tensor with its canonical name (frozen ones included).
    pub fn param_entries(&self) -> Vec<(ParamRef, &Buf)> {
        match &self.net {
            Net::Qwen(m) => m.param_entries(),
            Net::Llava(m) => m.param_entries(),
        }
    }

    /// Every parameter that gets a gradient, mutably, with it. Empty before the first backward.
    pub fn params_and_grads(&mut self) -> Vec<(ParamRef, &mut Buf, &Buf)> {
        match &mut self.net {
            Net::Qwen(m) => m.params_and_grads(),
            Net::Llava(m) => m.params_and_grads(),
        }
    }

    /// Zeroes the gradients (allocating them on first use).
    pub fn zero_grads(&mut self, dev: &Device) -> Result<()> {
        match &mut self.net {
            Net::Qwen(m) => m.zero_grads(dev),
            Net::Llava(m) => m.zero_grads(dev),
        }
    }

    /// How the next `zero_grads` stores the gradients.
    pub fn set_grad_store(&mut self, store: GradStore) {
        match &mut self.net {
            Net::Qwen(m) => m.grad_store = store,
            Net::Llava(m) => m.grad_store = store,
        }
    }

    pub fn grad_store(&self) -> GradStore {
        match &self.net {
            Net::Qwen(m) => m.grad_store,
            Net::Llava(m) => m.grad_store,
        }
    }

    /// Optimizer keys (`optim::slot_key`) of the tensors that receive a gradient: all of
    /// Qwen's; LLaVA's but the vision layers past the feature layer. Allocates the gradients.
    pub fn grad_keys(&mut self, dev: &Device) -> Result<BTreeSet<String>> {
        self.zero_grads(dev)?;
        Ok(self.params_and_grads().iter().map(|(r, _, _)| slot_key(r)).collect())
    }

    /// The gradients as full tensors keyed by the source checkpoint's names. Empty before a
    /// backward.
    pub fn grads_by_name(&self, dev: &Device) -> Result<NamedTensors> {
        let g = match &self.net {
            Net::Qwen(m) => m.grads_by_name(dev)?,
            Net::Llava(m) => m.grads_by_name(dev)?,
        };
        Ok(g.into_iter().map(|(n, v)| (self.stored_name(&n).to_string(), v)).collect())
    }

    /// Writes the weights (HF layout, the source checkpoint's names, `dtype`, shards of at most
    /// 5 GB) and config.json into `dir`.
    pub fn save(&self, dev: &Device, dir: &Path, dtype: SaveDtype) -> Result<()> {
        save_weights(dev, self.param_entries(), &|n| self.stored_name(n).to_string(), dir, dtype)?;
        match &self.net {
            Net::Qwen(m) => m.cfg.save_as(dir, super::lora::hf_dtype(dtype)),
            Net::Llava(m) => m.cfg.save_as(dir, super::lora::hf_dtype(dtype)),
        }
    }
}

/// Full tensors assembled from `entries`, saved under `name_of(canonical)` in `dtype`, shards
/// of at most 5 GB.
pub fn save_weights(
    dev: &Device, entries: Vec<(ParamRef, &Buf)>, name_of: &dyn Fn(&str) -> String, dir: &Path, dtype: SaveDtype,
) -> Result<()> {
    let full = assemble(dev, entries)?;
    let specs: Vec<(String, Vec<usize>)> = full.iter().map(|(n, (s, _))| (name_of(n), s.clone())).collect();
    let vals: Vec<&Vec<f32>> = full.values().map(|(_, v)| v).collect();
    save_sharded_with(dir, &specs, dtype, 5 << 30, |i| Ok(vals[i].clone()))
}

/// The image preprocessor settings of a model directory.
#[derive(Clone, Debug)]
pub enum Processor {
    Qwen(QwenPreprocessorConfig),
    Llava(LlavaPreprocessorConfig),
}

impl Processor {
    /// `dir/preprocessor_config.json` for `model`'s family (LLaVA: checked against the model's
    /// tile size and pinpoints; defaults that fit the model when the file is absent).
    pub fn load(dir: &Path, model: &VlModel) -> Result<Processor> {
        Ok(match &model.net {
            Net::Qwen(_) => Processor::Qwen(QwenPreprocessorConfig::load(dir)?),
            Net::Llava(m) => Processor::Llava(LlavaPreprocessorConfig::load(dir, &m.cfg)?),
        })
    }
}

/// Turns dataset samples into examples for one model: its chat template over its tokenizer,
/// its config and image preprocessor.
pub enum Encoder<'a> {
    Qwen {
        tmpl: ChatTemplate<'a>,
        cfg: &'a QwenVlConfig,
        pp: &'a QwenPreprocessorConfig,
    },
    Llava {
        tmpl: LlavaChatTemplate<'a>,
        cfg: &'a LlavaNextConfig,
        pp: &'a LlavaPreprocessorConfig,
        opts: LlavaChatOptions,
    },
}

impl<'a> Encoder<'a> {
    /// Checks that the tokenizer fits the model (special tokens and their ids).
    pub fn new(model: &'a VlModel, tok: &'a Tokenizer, pp: &'a Processor) -> Result<Encoder<'a>> {
        match (&model.net, pp) {
            (Net::Qwen(m), Processor::Qwen(pp)) => {
                Ok(Encoder::Qwen { tmpl: ChatTemplate::new(tok, &m.cfg)?, cfg: &m.cfg, pp })
            }
            (Net::Llava(m), Processor::Llava(pp)) => {
                // Vicuna's template has no EOS after a reply: add it, so the model learns to stop.
                let opts = LlavaChatOptions { vicuna_eos: true, ..Default::default() };
                Ok(Encoder::Llava { tmpl: LlavaChatTemplate::new(tok, &m.cfg)?, cfg: &m.cfg, pp, opts })
            }
            _ => bail!("the image processor settings are not for a {} model", model.family().model_type()),
        }
    }

    /// The model's `max_position_embeddings`: no example may be longer.
    pub fn max_positions(&self) -> usize {
        match self {
            Encoder::Qwen { cfg, .. } => cfg.text.max_position_embeddings,
            Encoder::Llava { cfg, .. } => cfg.text.max_position_embeddings,
        }
    }

    /// Renders, tokenises and preprocesses one sample (errors name its file:line).
    pub fn encode(&self, s: &Sample) -> Result<Example> {
        match self {
            Encoder::Qwen { tmpl, cfg, pp } => encode(s, tmpl, cfg, pp),
            Encoder::Llava { tmpl, cfg, pp, opts } => encode_llava(s, tmpl, cfg, pp, opts),
        }
    }
}
