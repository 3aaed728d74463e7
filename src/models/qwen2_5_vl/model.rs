//! `QwenVl`: Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) as one object: parameters keyed by
//! checkpoint name (model-spec A8) with lazily allocated f32 gradients, the training forward
//! (vision tower → rows scattered into the `<|image_pad|>` positions → text decoder → final
//! hidden states), the head (logits, or fused log-probs of target ids), the explicit backward,
//! and KV-cached incremental decoding for rollouts (`Session`: prefill, appended turns with
//! images, decode).
//!
//! Batches are packed: several sequences back to back, delimited by `cu_seqlens`, with M-RoPE
//! positions [3, S] from `positions::mrope_positions` (one sequence at a time, concatenated).
//!
//! LoRA (`enable_lora`): adapters on chosen projections of the text layers (and optionally the
//! vision blocks); from then on the base is frozen, `params_and_grads` / `grads_by_name` list
//! only the adapters (PEFT names), and `merged_weights` gives the weights with them merged.

use super::config::QwenVlConfig;
use super::text::{aliases, image_positions, lm_dims, lm_names};
use super::vision::{self, Tower, VisionDims, VisionFwd, VisionGrads, VisionParams};
use crate::checkpoint::Checkpoint;
use crate::models::common::decoder::Slot;
use crate::models::common::head::{self, LogpGrad};
use crate::models::common::lm::{
    self, Inject, Lm, LmCache, LmDims, LmFwd, LmGrads, LmNames, LmParams, Stepped, Tokens,
};
use crate::models::common::lora::{LayerLora, LoraConfig, LoraState, StackSpec};
use crate::models::common::params::{read_piece, GradStore, ParamRef};
use crate::models::common::step::{StepInput, StepScratch};
use crate::models::common::train_state::{pair_grads, TrainState};
use crate::tensor::{Buf, DType, Device};
use anyhow::{bail, Result};
use std::path::Path;

/// All parameters (or all f32 gradients) of the model.
pub struct QwenParams {
    pub vision: VisionParams,
    pub text: LmParams,
}

/// Activation checkpointing: recompute a layer's forward during backward instead of keeping it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recompute {
    /// Per text layer (missing entries: keep).
    pub text: Vec<bool>,
    /// Every vision block.
    pub vision: bool,
}

impl Recompute {
    /// Recompute every layer (least memory, one extra forward).
    pub fn all(n_text_layers: usize) -> Self {
        Recompute { text: vec![true; n_text_layers], vision: true }
    }
}

/// One packed training batch.
pub struct Batch<'a> {
    pub ids: &'a [i32],        // [S]
    pub cu_seqlens: &'a [i32], // [nseq + 1]
    pub pos3: &'a [i32],       // [3, S] M-RoPE rows t, h, w
    pub pixels: &'a [f32],     // [N, patch_dim], every image of the batch in order
    pub grids: &'a [[usize; 3]],
}

/// New tokens for `QwenVl::extend`: `n_new` of each session sequence (ids [batch·n_new],
/// sequence-major; M-RoPE positions `pos3` [3, batch·n_new], e.g. from
/// `positions::MropeState::append`, which continues after earlier turns and images), and the
/// images among them as pixels and grids.
pub struct Extend<'a> {
    pub ids: &'a [i32],
    pub pos3: &'a [i32],
    pub n_new: usize,
    pub pixels: &'a [f32],
    pub grids: &'a [[usize; 3]],
}

/// What the forward keeps for the head and the backward.
pub struct QwenFwd {
    vision: Option<VisionFwd>,
    pub text: LmFwd,
}

impl QwenFwd {
    pub fn final_hidden(&self) -> &Buf {
        self.text.final_hidden()
    }
    pub fn tokens(&self) -> usize {
        self.text.tokens()
    }
}

/// KV caches of `batch` sequences being generated.
pub struct Session {
    pub lm: LmCache,
}

pub struct QwenVl {
    pub cfg: QwenVlConfig,
    pub vdims: VisionDims,
    pub tdims: LmDims,
    pub names: LmNames,
    /// The checkpoint's Conv3d shape [D, C, T, P, P].
    pub patch_shape: Vec<usize>,
    pub params: QwenParams,
    grads: Option<QwenParams>,
    lora: Option<LoraState>,
    /// Forwards run without the adapters (the LoRA GRPO reference: the base weights, no copy).
    pub adapters_off: std::cell::Cell<bool>,
    /// How `zero_grads` stores the gradients (f32 unless set).
    pub grad_store: GradStore,
    /// `zero_grads` leaves the text layers out (the per-layer optimizer step keeps one layer's
    /// gradient, in `backward_logprobs_stepped`).
    pub per_layer_grads: bool,
    /// `--freeze-vision`: the base backward stops at the image embeddings (the tower's
    /// gradients stay zero and are not computed).
    pub frozen_vision: bool,
}

impl TrainState for QwenVl {
    fn all_params(&self) -> Vec<(ParamRef, &Buf)> {
        self.param_entries()
    }

    fn base_grads(&self) -> Option<Vec<(ParamRef, &Buf)>> {
        self.grads.as_ref().map(|g| entries(g, &self.vdims, &self.patch_shape, &self.tdims, &self.names))
    }

    fn lora_state(&self) -> Option<&LoraState> {
        self.lora.as_ref()
    }

    fn zero_grads(&mut self, dev: &Device) -> Result<()> {
        match self.lora.as_mut() {
            Some(l) => l.zero_grads(dev),
            None => {
                // Free the old gradients first: at 7B they are 31 GiB, and two sets do not fit.
                self.grads = None;
                self.grads = Some(self.zeros_like(dev)?);
                Ok(())
            }
        }
    }
}

impl QwenVl {
    /// Loads `dir/config.json` and the checkpoint in `dir`.
    pub fn load(dev: &Device, dir: impl AsRef<Path>) -> Result<Self> {
        let cfg = QwenVlConfig::load(&dir)?;
        let ckpt = Checkpoint::open(&dir)?;
        Self::from_checkpoint(dev, cfg, &ckpt)
    }

    /// Weights from `ckpt`, in the device's activation dtype (bf16 on CUDA, f32 on the CPU).
    pub fn from_checkpoint(dev: &Device, cfg: QwenVlConfig, ckpt: &Checkpoint) -> Result<Self> {
        Self::from_checkpoint_as(dev, cfg, ckpt, dev.act_dtype())
    }

    /// Weights from `ckpt` in `dtype`; activations follow the weights' dtype, so f32 on CUDA runs
    /// the whole model in f32 (a check of the kernels without bf16 rounding).
    pub fn from_checkpoint_as(dev: &Device, cfg: QwenVlConfig, ckpt: &Checkpoint, dtype: DType) -> Result<Self> {
        Self::build(cfg, &mut |r| dev.upload(&read_piece(ckpt, r, &aliases)?, dtype))
    }

    /// The dtype of weights and activations.
    pub fn dtype(&self) -> DType {
        self.params.text.embed.dtype()
    }

    /// Builds every tensor with `make` (e.g. random init for tests).
    pub fn build(cfg: QwenVlConfig, make: &mut dyn FnMut(&ParamRef) -> Result<Buf>) -> Result<Self> {
        let v = &cfg.vision;
        let vdims = VisionDims::new(v)?;
        let tdims = lm_dims(&cfg.text)?;
        let names = lm_names();
        let patch_shape = vec![v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size];
        let params = QwenParams {
            vision: VisionParams::build(&vdims, &patch_shape, make)?,
            text: LmParams::build(&tdims, &names, make)?,
        };
        Ok(QwenVl {
            cfg,
            vdims,
            tdims,
            names,
            patch_shape,
            params,
            grads: None,
            lora: None,
            adapters_off: std::cell::Cell::new(false),
            grad_store: GradStore::F32,
            per_layer_grads: false,
            frozen_vision: false,
        })
    }

    /// Every parameter tensor with its checkpoint name (and row range).
    pub fn param_entries(&self) -> Vec<(ParamRef, &Buf)> {
        entries(&self.params, &self.vdims, &self.patch_shape, &self.tdims, &self.names)
    }

    /// Puts LoRA adapters (B = 0, so the outputs do not change) on the projections `cfg`
    /// names and freezes every base weight.
    pub fn enable_lora(&mut self, dev: &Device, cfg: &LoraConfig) -> Result<()> {
        if self.lora.is_some() {
            bail!("LoRA is already enabled on this model");
        }
        let (td, names, vd) = (&self.tdims, &self.names, &self.vdims);
        let text_ref = |i: usize, s: Slot| names.layer(td, i, s);
        let vision_ref = |i: usize, s: Slot| vision::block_ref(vd, i, s);
        let text = StackSpec { blocks: td.n_layers, slots: cfg.text_slots(), base_ref: &text_ref, fused_qkv: false };
        let vis = StackSpec { blocks: vd.depth, slots: cfg.vision_slots(), base_ref: &vision_ref, fused_qkv: true };
        self.lora = Some(LoraState::new(dev, cfg, self.dtype(), &text, &vis)?);
        self.grads = None;
        Ok(())
    }

    /// The LoRA adapters, when enabled.
    pub fn lora(&self) -> Option<&LoraState> {
        self.lora.as_ref()
    }

    fn lora_text(&self) -> &[LayerLora] {
        if self.adapters_off.get() {
            return &[];
        }
        self.lora.as_ref().map_or(&[], |l| &l.text)
    }

    fn lora_vision(&self) -> &[LayerLora] {
        if self.adapters_off.get() {
            return &[];
        }
        self.lora.as_ref().map_or(&[], |l| &l.vision)
    }

    /// Every trainable tensor, mutably, with the matching f32 gradient (for the optimizer):
    /// every parameter, or under LoRA the adapters only. Empty before the first backward.
    pub fn params_and_grads(&mut self) -> Vec<(ParamRef, &mut Buf, &Buf)> {
        if let Some(l) = self.lora.as_mut() {
            return l.params_and_grads();
        }
        let Some(g) = &self.grads else { return Vec::new() };
        let gs = entries(g, &self.vdims, &self.patch_shape, &self.tdims, &self.names);
        let QwenParams { vision, text } = &mut self.params;
        let mut ps = vision.entries_mut(&self.vdims, &self.patch_shape);
        ps.extend(text.entries_mut(&self.tdims, &self.names));
        pair_grads(ps, gs)
    }

    /// Every parameter tensor, mutably (frozen ones included), and the LoRA adapters when
    /// enabled: what the optimizer's masters are restored into.
    pub fn params_mut(&mut self) -> Vec<(ParamRef, &mut Buf)> {
        let QwenParams { vision, text } = &mut self.params;
        let mut ps = vision.entries_mut(&self.vdims, &self.patch_shape);
        ps.extend(text.entries_mut(&self.tdims, &self.names));
        if let Some(l) = self.lora.as_mut() {
            ps.extend(l.entries_mut());
        }
        ps
    }

    fn zeros_like(&self, dev: &Device) -> Result<QwenParams> {
        let store = self.grad_store;
        let mut z = |r: &ParamRef| dev.zeros(store.dtype(dev, r), r.numel());
        let vision = VisionParams::build(&self.vdims, &self.patch_shape, &mut z)?;
        let text = if self.per_layer_grads && self.lora.is_none() {
            LmParams::build_outer(&self.tdims, &self.names, &mut z)?
        } else {
            LmParams::build(&self.tdims, &self.names, &mut z)?
        };
        Ok(QwenParams { vision, text })
    }

    /// Vision tower alone: image embeddings [tokens, out_hidden] in image order.
    pub fn image_embeds(&self, dev: &Device, pixels: &[f32], grids: &[[usize; 3]]) -> Result<Buf> {
        Ok(vision::forward(dev, &self.vdims, &self.params.vision, self.lora_vision(), pixels, grids, true)?.0)
    }

    /// Placeholder positions of `ids`, checked against the images' token count.
    fn placeholders(&self, ids: &[i32], grids: &[[usize; 3]]) -> Result<Vec<usize>> {
        if ids.iter().any(|&i| i as i64 == self.cfg.video_token_id as i64) {
            bail!("Qwen2.5-VL: video tokens are not supported");
        }
        let at = image_positions(ids, self.cfg.image_token_id);
        let unit = self.vdims.unit();
        let want: usize = grids.iter().map(|g| g[0] * g[1] * g[2] / unit).sum();
        if at.len() != want {
            bail!(
                "Qwen2.5-VL: {} image placeholder tokens, but the {} image(s) give {want} features",
                at.len(),
                grids.len()
            );
        }
        Ok(at)
    }

    /// The training forward up to the final hidden states.
    pub fn forward(&self, dev: &Device, b: &Batch, rc: &Recompute) -> Result<QwenFwd> {
        let at = self.placeholders(b.ids, b.grids)?;
        let (embeds, vfwd) = if b.grids.is_empty() {
            (None, None)
        } else {
            let (e, f) = vision::forward(
                dev,
                &self.vdims,
                &self.params.vision,
                self.lora_vision(),
                b.pixels,
                b.grids,
                rc.vision,
            )?;
            (Some(e), Some(f))
        };
        let inject = embeds.as_ref().map(|rows| Inject { rows, at: &at });
        let text = self.lm().forward(dev, Tokens { ids: b.ids, pos: b.pos3, inject }, b.cu_seqlens, &rc.text)?;
        Ok(QwenFwd { vision: vfwd, text })
    }

    /// logits [S, V] of every position (a plain lm_head GEMM).
    pub fn logits(&self, dev: &Device, f: &QwenFwd) -> Result<Buf> {
        self.lm().logits(dev, f.final_hidden(), f.tokens())
    }

    /// (logp, lse), each [S] f32: log p(targets[t]) at every position with mask[t] ≠ 0 (0
    /// elsewhere), without materialising the logits. `targets` [S] i32, mask [S] f32.
    pub fn logprobs(&self, dev: &Device, f: &QwenFwd, targets: &Buf, mask: Option<&Buf>) -> Result<(Buf, Buf)> {
        head::logprobs(dev, &self.tdims, &self.params.text, &f.text, targets, mask)
    }

    /// Backward from d objective / d logp [S] (f32) of `logprobs`: accumulates every gradient.
    pub fn backward_logprobs(
        &mut self, dev: &Device, f: &QwenFwd, targets: &Buf, lse: &Buf, dlogp: &Buf,
    ) -> Result<()> {
        self.backward_logprobs_scaled(dev, f, targets, lse, dlogp, 1.0)
    }

    /// As `backward_logprobs` after the final hidden states were scaled by `hidden_scale`
    /// (1/T: log-probs at temperature T): the head saw h·s, so d h = s · d(h·s).
    pub fn backward_logprobs_scaled(
        &mut self, dev: &Device, f: &QwenFwd, targets: &Buf, lse: &Buf, dlogp: &Buf, hidden_scale: f32,
    ) -> Result<()> {
        self.ensure_grads(dev)?;
        let dhead = head::head_grad(self.grads.as_mut().map(|g| &mut g.text), &self.lora)?;
        let h = LogpGrad { targets, lse, dlogp, hidden_scale };
        let dxf = head::logprobs_bwd(dev, &self.tdims, &self.params.text, &f.text, dhead, &h)?;
        self.backward(dev, f, &dxf)
    }

    /// `backward_logprobs_scaled` of a full fine-tune with the per-layer optimizer step
    /// (`per_layer_grads` set before `zero_grads`): each text layer is handed to `step` as soon
    /// as its gradient is final and that gradient's storage is reused for the next layer; the
    /// rest (vision tower, embedding, final norm, head) goes to `step` at the end.
    pub fn backward_logprobs_stepped(
        &mut self, dev: &Device, f: &QwenFwd, h: &LogpGrad, step: &mut lm::StepFn,
    ) -> Result<()> {
        if self.lora.is_some() {
            bail!("the per-layer optimizer step is for a full fine-tune (under LoRA only the adapters train)");
        }
        self.ensure_grads(dev)?;
        let Some(g) = self.grads.as_mut() else { bail!("gradients not allocated") };
        let s = Stepped { dims: &self.tdims, names: &self.names, p: &mut self.params.text, g: &mut g.text };
        let d_img = head::backward_stepped(dev, s, self.grad_store, &f.text, h, step)?;
        if let (false, Some(vf), Some(d_img)) = (self.frozen_vision, &f.vision, d_img) {
            let tw = Tower { dims: &self.vdims, p: &self.params.vision, lora: &[] };
            vision::backward(dev, tw, VisionGrads { base: Some(&mut g.vision), lora: None }, vf, &d_img)?;
        }
        step(self.params_and_grads())
    }

    /// Backward from d final_hidden [S, D] (the head's own gradient is the caller's, e.g.
    /// `ops::logprob::fwd_bwd` into `lm_head_grad`): accumulates every other gradient.
    pub fn backward(&mut self, dev: &Device, f: &QwenFwd, dxf: &Buf) -> Result<()> {
        self.ensure_grads(dev)?;
        if let Some(l) = self.lora.as_mut() {
            // Frozen base: only the adapters' gradients; the tower only when it has adapters.
            let LoraState { text, vision: vlora, grads, .. } = l;
            let Some(lg) = grads.as_mut() else { bail!("gradients not allocated") };
            let text_lm = Lm { dims: &self.tdims, p: &self.params.text, lora: text };
            let d_img = text_lm.backward(dev, LmGrads { base: None, lora: Some(&mut lg.text) }, &f.text, dxf)?;
            if let (false, Some(vf), Some(d_img)) = (vlora.is_empty(), &f.vision, d_img) {
                let tw = Tower { dims: &self.vdims, p: &self.params.vision, lora: vlora };
                vision::backward(dev, tw, VisionGrads { base: None, lora: Some(&mut lg.vision) }, vf, &d_img)?;
            }
            return Ok(());
        }
        let Some(g) = self.grads.as_mut() else { bail!("gradients not allocated") };
        let base_lm = Lm { dims: &self.tdims, p: &self.params.text, lora: &[] };
        let d_img = base_lm.backward(dev, LmGrads { base: Some(&mut g.text), lora: None }, &f.text, dxf)?;
        if let (false, Some(vf), Some(d_img)) = (self.frozen_vision, &f.vision, d_img) {
            let tw = Tower { dims: &self.vdims, p: &self.params.vision, lora: &[] };
            vision::backward(dev, tw, VisionGrads { base: Some(&mut g.vision), lora: None }, vf, &d_img)?;
        }
        Ok(())
    }

    /// The lm_head gradient [V, D] (the embedding's when tied), allocating gradients if needed.
    /// None under LoRA: the head is frozen and has no gradient (pass None to the head op).
    pub fn lm_head_grad(&mut self, dev: &Device) -> Result<Option<&mut Buf>> {
        self.ensure_grads(dev)?;
        head::head_grad(self.grads.as_mut().map(|g| &mut g.text), &self.lora)
    }

    /// Empty KV caches for `batch` sequences of up to `max_len` tokens.
    pub fn new_session(&self, dev: &Device, batch: usize, max_len: usize) -> Result<Session> {
        Ok(Session { lm: LmCache::new(dev, &self.tdims, self.dtype(), batch, max_len)? })
    }

    /// Feeds `x.n_new` tokens of each session sequence (see `Extend`). Returns logits
    /// [batch·n_new, V], or with `last_only` [batch, V] for each sequence's last new token
    /// (sampling).
    pub fn extend(&self, dev: &Device, s: &mut Session, x: Extend, last_only: bool) -> Result<Buf> {
        let Extend { ids, pos3, n_new, pixels, grids } = x;
        let at = self.placeholders(ids, grids)?;
        let embeds = if grids.is_empty() { None } else { Some(self.image_embeds(dev, pixels, grids)?) };
        let inject = embeds.as_ref().map(|rows| Inject { rows, at: &at });
        self.lm().extend_logits(dev, &mut s.lm, Tokens { ids, pos: pos3, inject }, n_new, last_only)
    }

    /// The text decoder with its adapters (none while `adapters_off`).
    fn lm(&self) -> Lm<'_> {
        Lm { dims: &self.tdims, p: &self.params.text, lora: self.lora_text() }
    }
}

impl QwenVl {
    /// A ragged rollout step over `cache`: sequence b gets ids[cu_new[b]..cu_new[b+1]] (0 = idle)
    /// with M-RoPE positions `pos3` [3, T_new]; `image_rows` [n, D] are the embeddings of the
    /// step's `<|image_pad|>` tokens in order (from `image_embeds`, computed once per image).
    /// Returns logits [active, V] of each non-idle sequence's last new token, in slot order.
    pub fn step_ragged<'s>(
        &self, dev: &Device, cache: &mut LmCache, scratch: &'s mut StepScratch, input: StepInput,
    ) -> Result<&'s mut Buf> {
        let StepInput { ids, pos: pos3, cu_new, image_rows } = input;
        let at = image_positions(ids, self.cfg.image_token_id);
        let inject = lm::inject_checked(&at, image_rows, self.tdims.layer.d)?;
        self.lm().step_logits(dev, cache, scratch, Tokens { ids, pos: pos3, inject }, cu_new)
    }
}

fn entries<'a>(
    p: &'a QwenParams, vd: &VisionDims, ps: &[usize], td: &LmDims, names: &LmNames,
) -> Vec<(ParamRef, &'a Buf)> {
    let mut v = p.vision.entries(vd, ps);
    v.extend(p.text.entries(td, names));
    v
}
