//! `LlavaNext`: LLaVA-NeXT (`LlavaNextForConditionalGeneration`) as one object: parameters keyed
//! by their canonical llava-hf checkpoint names (any spelling `config::spellings` knows loads),
//! lazily allocated f32 gradients, the training forward (CLIP tower → projector → anyres packing
//! → rows scattered into the `<image>` positions → Mistral / Llama decoder → final hidden
//! states), the head (logits, or fused log-probs of target ids), the explicit backward, and
//! KV-cached incremental decoding for rollouts (`Session`).
//!
//! The decoder is the shared `models::common::lm` with 1-D RoPE (θ from the config), no biases,
//! GQA for Mistral and MHA for Llama. Packing (model-spec B6): each image's features are the
//! base tile's g² patches, then the anyres tile grid unpadded to the image's aspect ratio with
//! `image_newline` closing every row (`packing::AnyresGeometry::plan`); its backward scatters the
//! gradients back to the tile features and sums those of the newline rows into `image_newline`.
//!
//! Pixels come compact: the real tiles of every image in order, `[Σ tiles, 3, S, S]`
//! (`strip_tile_padding` drops a processor batch's padding tiles).
//!
//! LoRA (`enable_lora`): adapters on chosen projections of the text layers (the CLIP tower has
//! none); from then on the base is frozen, `params_and_grads` / `grads_by_name` list only the
//! adapters (PEFT names), the image path gets no backward, and `merged_weights` gives the
//! weights with the adapters merged.

use super::config::{spellings, LlavaNextConfig};
use super::packing::AnyresGeometry;
use super::vision::{self, ClipDims, ClipFwd, ClipParams};
use crate::checkpoint::Checkpoint;
use crate::models::common::decoder::{LayerDims, LayerFlags, RopeKind, Slot};
use crate::models::common::head::{self, LogpGrad};
use crate::models::common::lm::{
    self, Inject, Lm, LmCache, LmDims, LmFwd, LmGrads, LmNames, LmParams, Stepped, Tokens,
};
use crate::models::common::lora::{LayerLora, LoraConfig, LoraState, StackSpec};
use crate::models::common::params::{read_piece, GradStore, ParamRef};
use crate::models::common::step::{StepInput, StepScratch};
use crate::models::common::train_state::{pair_grads, TrainState};
use crate::ops::act::{self, Gelu};
use crate::ops::patch_embed::{gather_rows, scatter_rows, RowIndex};
use crate::ops::{elementwise, matmul};
use crate::tensor::{Buf, DType, Device};
use anyhow::{bail, Result};
use std::path::Path;

pub use crate::models::qwen2_5_vl::model::Recompute;

/// Mistral / Llama: no biases anywhere in the decoder.
pub const TEXT_FLAGS: LayerFlags = LayerFlags { qkv_bias: false, o_bias: false, mlp_bias: false };

/// The projector `linear_1 → GELU → linear_2` (biases per `multimodal_projector_bias`).
pub struct Projector {
    pub w1: Buf,         // [Dt, Dv]
    pub b1: Option<Buf>, // [Dt]
    pub w2: Buf,         // [Dt, Dt]
    pub b2: Option<Buf>, // [Dt]
}

/// All parameters (or all f32 gradients) of the model.
pub struct LlavaParams {
    pub vision: ClipParams,
    pub proj: Projector,
    pub newline: Buf, // [Dt]
    pub text: LmParams,
}

/// One packed training batch.
pub struct Batch<'a> {
    pub ids: &'a [i32],        // [S]
    pub cu_seqlens: &'a [i32], // [nseq + 1]
    /// [Σ tiles, 3, S, S]: every image's real tiles (base first), images in token order.
    pub pixels: &'a [f32],
    /// Original (height, width) per image.
    pub image_sizes: &'a [(usize, usize)],
}

/// New tokens for `LlavaNext::extend`: `n_new` of each session sequence (ids [batch·n_new],
/// sequence-major; their positions continue each sequence's cache), and the images among them
/// as compact pixels and (height, width) sizes.
pub struct Extend<'a> {
    pub ids: &'a [i32],
    pub n_new: usize,
    pub pixels: &'a [f32],
    pub image_sizes: &'a [(usize, usize)],
}

/// Where each packed image row comes from: row `dst[i]` of the packed features copies projector
/// row `src[i]`; rows `newline` are `image_newline`.
struct Packing {
    src: RowIndex,     // bound Σ tiles·g²
    dst: RowIndex,     // bound `tokens`
    newline: RowIndex, // bound `tokens`
    tokens: usize,
}

/// What the image path's forward keeps for its backward.
struct ImageFwd {
    clip: ClipFwd,
    feats: Buf, // [n, Dv] CLS-free tile features
    h1: Buf,    // [n, Dt] linear_1 output
    a1: Buf,    // [n, Dt] GELU(h1)
    pack: Packing,
}

/// What the forward keeps for the head and the backward.
pub struct LlavaFwd {
    image: Option<ImageFwd>,
    pub text: LmFwd,
}

impl LlavaFwd {
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

pub struct LlavaNext {
    pub cfg: LlavaNextConfig,
    pub vdims: ClipDims,
    pub tdims: LmDims,
    pub names: LmNames,
    pub params: LlavaParams,
    gelu: Gelu,
    grads: Option<LlavaParams>,
    lora: Option<LoraState>,
    /// Forwards run without the adapters (the LoRA GRPO reference: the base weights, no copy).
    pub adapters_off: std::cell::Cell<bool>,
    /// How `zero_grads` stores the gradients (f32 unless set).
    pub grad_store: GradStore,
    /// `zero_grads` leaves the text layers out (the per-layer optimizer step keeps one layer's
    /// gradient, in `backward_logprobs_stepped`).
    pub per_layer_grads: bool,
    /// `--freeze-vision`: the base backward stops below the projector (the CLIP tower's
    /// gradients stay zero and are not computed; the projector and newline still train).
    pub frozen_vision: bool,
}

/// Decoder sizes from the config.
pub fn lm_dims(cfg: &LlavaNextConfig) -> Result<LmDims> {
    let c = &cfg.text;
    if c.num_attention_heads == 0
        || c.num_key_value_heads == 0
        || !c.num_attention_heads.is_multiple_of(c.num_key_value_heads)
    {
        bail!(
            "text_config: num_attention_heads {} must be a positive multiple of num_key_value_heads {}",
            c.num_attention_heads,
            c.num_key_value_heads
        );
    }
    Ok(LmDims {
        layer: LayerDims {
            d: c.hidden_size,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            inter: c.intermediate_size,
            eps: c.rms_norm_eps as f32,
        },
        flags: TEXT_FLAGS,
        n_layers: c.num_hidden_layers,
        vocab: c.vocab_size,
        rope: RopeKind::Text1d { theta: c.rope_theta as f32 },
        tied: c.tie_word_embeddings,
    })
}

/// Canonical names of the decoder (`language_model.model.*`, `language_model.lm_head.weight`).
pub fn lm_names() -> LmNames {
    LmNames { prefix: "language_model.model.".into(), lm_head: "language_model.lm_head.weight".into() }
}

/// The other accepted spellings of a canonical name (for `read_piece`).
fn aliases(name: &str) -> Vec<String> {
    spellings(name).into_iter().filter(|s| s != name).collect()
}

/// [images, max_tiles, 3, S, S] (a processor batch, padded along the tile axis) → the compact
/// `[Σ tiles, 3, S, S]` the model takes, keeping `num_tiles[i]` tiles of image i.
pub fn strip_tile_padding(pixels: &[f32], max_tiles: usize, num_tiles: &[usize], tile_len: usize) -> Result<Vec<f32>> {
    if pixels.len() != num_tiles.len() * max_tiles * tile_len {
        bail!(
            "pixel_values has {} values, expected {} images × {max_tiles} tiles × {tile_len}",
            pixels.len(),
            num_tiles.len()
        );
    }
    if let Some(&n) = num_tiles.iter().find(|&&n| n > max_tiles) {
        bail!("an image has {n} tiles, more than the batch's {max_tiles}");
    }
    Ok(num_tiles
        .iter()
        .enumerate()
        .flat_map(|(i, &n)| pixels[i * max_tiles * tile_len..][..n * tile_len].iter().copied())
        .collect())
}

impl TrainState for LlavaNext {
    fn all_params(&self) -> Vec<(ParamRef, &Buf)> {
        self.param_entries()
    }

    /// The vision layers past the feature layer and post_layernorm get no gradient buffers.
    fn base_grads(&self) -> Option<Vec<(ParamRef, &Buf)>> {
        self.grads.as_ref().map(|g| entries(g, &self.cfg, &self.vdims, &self.tdims, &self.names))
    }

    fn lora_state(&self) -> Option<&LoraState> {
        self.lora.as_ref()
    }

    fn zero_grads(&mut self, dev: &Device) -> Result<()> {
        if let Some(l) = self.lora.as_mut() {
            return l.zero_grads(dev);
        }
        let store = self.grad_store;
        let mut z = |r: &ParamRef| dev.zeros(store.dtype(dev, r), r.numel());
        // Free the old gradients first: two sets of a 7B model's do not fit.
        self.grads = None;
        let layers = !self.per_layer_grads;
        self.grads = Some(build_params(&self.cfg, &self.vdims, &self.tdims, &self.names, true, layers, &mut z)?);
        Ok(())
    }
}

impl LlavaNext {
    /// Loads `dir/config.json` and the checkpoint in `dir`.
    pub fn load(dev: &Device, dir: impl AsRef<Path>) -> Result<Self> {
        let cfg = LlavaNextConfig::load(&dir)?;
        let ckpt = Checkpoint::open(&dir)?;
        Self::from_checkpoint(dev, cfg, &ckpt)
    }

    /// Weights from `ckpt`, in the device's activation dtype (bf16 on CUDA, f32 on the CPU).
    pub fn from_checkpoint(dev: &Device, cfg: LlavaNextConfig, ckpt: &Checkpoint) -> Result<Self> {
        Self::from_checkpoint_as(dev, cfg, ckpt, dev.act_dtype())
    }

    /// Weights from `ckpt` in `dtype` (activations follow the weights' dtype).
    pub fn from_checkpoint_as(dev: &Device, cfg: LlavaNextConfig, ckpt: &Checkpoint, dtype: DType) -> Result<Self> {
        Self::build(cfg, &mut |r| dev.upload(&read_piece(ckpt, r, &aliases)?, dtype))
    }

    /// Builds every tensor with `make` (e.g. random init for tests).
    pub fn build(cfg: LlavaNextConfig, make: &mut dyn FnMut(&ParamRef) -> Result<Buf>) -> Result<Self> {
        let vdims = ClipDims::new(&cfg)?;
        let tdims = lm_dims(&cfg)?;
        let names = lm_names();
        let gelu = Gelu::from_hf(&cfg.projector_hidden_act)?;
        let params = build_params(&cfg, &vdims, &tdims, &names, false, true, make)?;
        Ok(LlavaNext {
            cfg,
            vdims,
            tdims,
            names,
            params,
            gelu,
            grads: None,
            lora: None,
            adapters_off: std::cell::Cell::new(false),
            grad_store: GradStore::F32,
            per_layer_grads: false,
            frozen_vision: false,
        })
    }

    /// The dtype of weights and activations.
    pub fn dtype(&self) -> DType {
        self.params.text.embed.dtype()
    }

    /// Every parameter tensor with its canonical checkpoint name (frozen ones included).
    pub fn param_entries(&self) -> Vec<(ParamRef, &Buf)> {
        entries(&self.params, &self.cfg, &self.vdims, &self.tdims, &self.names)
    }

    /// Puts LoRA adapters (B = 0, so the outputs do not change) on the text projections `cfg`
    /// names and freezes every base weight. Vision targets are refused (the CLIP tower does not
    /// use the shared block).
    pub fn enable_lora(&mut self, dev: &Device, cfg: &LoraConfig) -> Result<()> {
        if self.lora.is_some() {
            bail!("LoRA is already enabled on this model");
        }
        cfg.validate()?;
        if !cfg.vision_slots().is_empty() {
            bail!("LLaVA-NeXT: LoRA on the vision tower is not supported (targets {:?})", cfg.targets);
        }
        let (td, names) = (&self.tdims, &self.names);
        let text_ref = |i: usize, s: Slot| names.layer(td, i, s);
        let no_ref = |i: usize, s: Slot| names.layer(td, i, s);
        let text = StackSpec { blocks: td.n_layers, slots: cfg.text_slots(), base_ref: &text_ref, fused_qkv: false };
        let vis = StackSpec { blocks: 0, slots: Vec::new(), base_ref: &no_ref, fused_qkv: false };
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

    /// Every parameter that gets a gradient, mutably, with that gradient (for the optimizer).
    /// The vision layers past the feature layer and post_layernorm are left out; under LoRA
    /// only the adapters are listed. Empty before the first backward.
    pub fn params_and_grads(&mut self) -> Vec<(ParamRef, &mut Buf, &Buf)> {
        if let Some(l) = self.lora.as_mut() {
            return l.params_and_grads();
        }
        let Some(g) = &self.grads else { return Vec::new() };
        let (cfg, vd, td, names) = (&self.cfg, &self.vdims, &self.tdims, &self.names);
        let mut gs = g.vision.entries(vd);
        gs.extend(head_entries(&g.proj, &g.newline, cfg));
        gs.extend(g.text.entries(td, names));
        let LlavaParams { vision, proj, newline, text } = &mut self.params;
        let mut ps = vision.entries_mut(vd);
        ps.extend(head_entries_mut(proj, newline, cfg));
        ps.extend(text.entries_mut(td, names));
        // By name: the vision list of the gradients is a prefix of the parameters', and the
        // per-layer layout has no text layers.
        pair_grads(ps, gs)
    }

    /// Every parameter tensor, mutably (frozen ones included), and the LoRA adapters when
    /// enabled: what the optimizer's masters are restored into.
    pub fn params_mut(&mut self) -> Vec<(ParamRef, &mut Buf)> {
        let (cfg, vd, td, names) = (&self.cfg, &self.vdims, &self.tdims, &self.names);
        let LlavaParams { vision, proj, newline, text } = &mut self.params;
        let mut ps = vision.entries_mut(vd);
        ps.extend(head_entries_mut(proj, newline, cfg));
        ps.extend(text.entries_mut(td, names));
        if let Some(l) = self.lora.as_mut() {
            ps.extend(l.entries_mut());
        }
        ps
    }

    /// Anyres layout of each image.
    pub fn geometries(&self, image_sizes: &[(usize, usize)]) -> Result<Vec<AnyresGeometry>> {
        let v = &self.cfg.vision;
        image_sizes
            .iter()
            .map(|&hw| AnyresGeometry::new(hw, &self.cfg.image_grid_pinpoints, v.image_size, v.patch_size))
            .collect()
    }

    /// Packed image features [Σ tokens, Dt] (what replaces the `<image>` tokens), images in order.
    pub fn image_embeds(&self, dev: &Device, pixels: &[f32], image_sizes: &[(usize, usize)]) -> Result<Buf> {
        Ok(self.image_forward(dev, pixels, image_sizes, false)?.0)
    }

    fn image_forward(
        &self, dev: &Device, pixels: &[f32], image_sizes: &[(usize, usize)], recompute: bool,
    ) -> Result<(Buf, ImageFwd)> {
        let (vd, dt) = (&self.vdims, self.dtype());
        let geos = self.geometries(image_sizes)?;
        let tiles: usize = geos.iter().map(|g| g.num_tiles()).sum();
        if pixels.len() != tiles * vd.tile_len() {
            bail!("LLaVA-NeXT: pixel_values has {} values; the {} image(s) of sizes {image_sizes:?} need {tiles} tiles × {}", pixels.len(), geos.len(), vd.tile_len());
        }
        let (feats, clip) = vision::forward(dev, vd, &self.params.vision, pixels, tiles, recompute)?;
        let (n, dv, dtx) = (tiles * vd.g * vd.g, vd.d, self.tdims.layer.d);
        let p = &self.params.proj;
        let (mut h1, mut a1, mut proj) = (dev.zeros(dt, n * dtx)?, dev.zeros(dt, n * dtx)?, dev.zeros(dt, n * dtx)?);
        matmul::linear_fwd(dev, &mut h1, &feats, &p.w1, p.b1.as_ref(), matmul::Linear { t: n, din: dv, dout: dtx })?;
        act::gelu_fwd(dev, &mut a1, &h1, n * dtx, self.gelu)?;
        matmul::linear_fwd(dev, &mut proj, &a1, &p.w2, p.b2.as_ref(), matmul::Linear { t: n, din: dtx, dout: dtx })?;
        let pack = packing(dev, &geos, vd.g, n)?;
        let mut out = dev.zeros(dt, pack.tokens * dtx)?;
        let mut sel = dev.zeros(dt, pack.src.len() * dtx)?;
        gather_rows(dev, &mut sel, &proj, &pack.src, dtx)?;
        scatter_rows(dev, &mut out, &sel, &pack.dst, dtx)?;
        let mut nl = dev.zeros(dt, pack.newline.len() * dtx)?;
        elementwise::bias_add(dev, &mut nl, &self.params.newline, pack.newline.len(), dtx)?;
        scatter_rows(dev, &mut out, &nl, &pack.newline, dtx)?;
        Ok((out, ImageFwd { clip, feats, h1, a1, pack }))
    }

    /// Backward of `image_forward` from d packed features [Σ tokens, Dt].
    fn image_backward(&self, dev: &Device, g: &mut LlavaParams, f: &ImageFwd, dout: &Buf) -> Result<()> {
        let (vd, dt, dtx) = (&self.vdims, self.dtype(), self.tdims.layer.d);
        let (pk, n, p) = (&f.pack, f.pack.src.bound, &self.params.proj);
        let mut dsel = dev.zeros(dt, pk.dst.len() * dtx)?;
        gather_rows(dev, &mut dsel, dout, &pk.dst, dtx)?;
        let mut dproj = dev.zeros(dt, n * dtx)?; // rows the unpadding cropped get 0
        scatter_rows(dev, &mut dproj, &dsel, &pk.src, dtx)?;
        let mut dnl = dev.zeros(dt, pk.newline.len() * dtx)?;
        gather_rows(dev, &mut dnl, dout, &pk.newline, dtx)?;
        elementwise::bias_bwd(dev, &mut g.newline, &dnl, pk.newline.len(), dtx)?;
        let mut da1 = dev.zeros(dt, n * dtx)?;
        matmul::linear_bwd(
            dev,
            matmul::LinearGrads { dx: Some(&mut da1), dw: &mut g.proj.w2, db: g.proj.b2.as_mut() },
            &dproj,
            &f.a1,
            &p.w2,
            matmul::Linear { t: n, din: dtx, dout: dtx },
        )?;
        let mut dh1 = dproj; // reuse [n, Dt]
        act::gelu_bwd(dev, &mut dh1, &da1, &f.h1, n * dtx, self.gelu)?;
        // Frozen tower: the projector's input gradient is not needed either.
        let mut dfeat = if self.frozen_vision { None } else { Some(dev.zeros(dt, n * vd.d)?) };
        matmul::linear_bwd(
            dev,
            matmul::LinearGrads { dx: dfeat.as_mut(), dw: &mut g.proj.w1, db: g.proj.b1.as_mut() },
            &dh1,
            &f.feats,
            &p.w1,
            matmul::Linear { t: n, din: vd.d, dout: dtx },
        )?;
        match &dfeat {
            Some(dfeat) => vision::backward(dev, vd, &self.params.vision, &mut g.vision, &f.clip, dfeat),
            None => Ok(()),
        }
    }

    /// Placeholder positions of `ids`, checked against the images' token count, and the ids the
    /// embedding reads (placeholders → 0: their rows are overwritten, and the id may lie past the
    /// vocabulary).
    fn placeholders(&self, ids: &[i32], image_sizes: &[(usize, usize)]) -> Result<(Vec<usize>, Vec<i32>)> {
        let img = self.cfg.image_token_index as i64;
        let at: Vec<usize> = ids.iter().enumerate().filter(|(_, &id)| id as i64 == img).map(|(i, _)| i).collect();
        let want: usize = self.geometries(image_sizes)?.iter().map(|g| g.num_tokens()).sum();
        if at.len() != want {
            bail!(
                "LLaVA-NeXT: {} <image> tokens, but the {} image(s) of sizes {image_sizes:?} give {want} features",
                at.len(),
                image_sizes.len()
            );
        }
        let ids = ids.iter().map(|&id| if id as i64 == img { 0 } else { id }).collect();
        Ok((at, ids))
    }

    /// Mistral's sliding window (if set) must cover every sequence: it is not applied.
    fn check_window(&self, len: usize) -> Result<()> {
        match self.cfg.text.sliding_window {
            Some(w) if len > w => bail!(
                "LLaVA-NeXT: a sequence of {len} tokens exceeds Mistral's sliding_window {w}, which is not implemented"
            ),
            _ => Ok(()),
        }
    }

    /// The training forward up to the final hidden states (positions restart at 0 in every
    /// sequence of `cu_seqlens`).
    pub fn forward(&self, dev: &Device, b: &Batch, rc: &Recompute) -> Result<LlavaFwd> {
        let (at, ids) = self.placeholders(b.ids, b.image_sizes)?;
        let mut pos = vec![0i32; ids.len()];
        for w in b.cu_seqlens.windows(2) {
            let (a, e) = (w[0].max(0) as usize, (w[1].max(0) as usize).min(ids.len()));
            self.check_window(e.saturating_sub(a))?;
            for (i, p) in pos.iter_mut().enumerate().take(e).skip(a) {
                *p = (i - a) as i32;
            }
        }
        let (embeds, image) = if b.image_sizes.is_empty() {
            (None, None)
        } else {
            let (e, f) = self.image_forward(dev, b.pixels, b.image_sizes, rc.vision)?;
            (Some(e), Some(f))
        };
        let inject = embeds.as_ref().map(|rows| Inject { rows, at: &at });
        let text = self.lm().forward(dev, Tokens { ids: &ids, pos: &pos, inject }, b.cu_seqlens, &rc.text)?;
        Ok(LlavaFwd { image, text })
    }

    /// logits [S, V] of every position (a plain lm_head GEMM).
    pub fn logits(&self, dev: &Device, f: &LlavaFwd) -> Result<Buf> {
        self.lm().logits(dev, f.final_hidden(), f.tokens())
    }

    /// (logp, lse), each [S] f32: log p(targets[t]) where mask[t] ≠ 0 (0 elsewhere).
    pub fn logprobs(&self, dev: &Device, f: &LlavaFwd, targets: &Buf, mask: Option<&Buf>) -> Result<(Buf, Buf)> {
        head::logprobs(dev, &self.tdims, &self.params.text, &f.text, targets, mask)
    }

    /// Backward from d objective / d logp [S] (f32) of `logprobs`: accumulates every gradient.
    pub fn backward_logprobs(
        &mut self, dev: &Device, f: &LlavaFwd, targets: &Buf, lse: &Buf, dlogp: &Buf,
    ) -> Result<()> {
        self.backward_logprobs_scaled(dev, f, targets, lse, dlogp, 1.0)
    }

    /// As `backward_logprobs` after the final hidden states were scaled by `hidden_scale`
    /// (1/T: log-probs at temperature T): the head saw h·s, so d h = s · d(h·s).
    pub fn backward_logprobs_scaled(
        &mut self, dev: &Device, f: &LlavaFwd, targets: &Buf, lse: &Buf, dlogp: &Buf, hidden_scale: f32,
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
    /// rest (tower, projector, newline, embedding, final norm, head) goes to `step` at the end.
    pub fn backward_logprobs_stepped(
        &mut self, dev: &Device, f: &LlavaFwd, h: &LogpGrad, step: &mut lm::StepFn,
    ) -> Result<()> {
        if self.lora.is_some() {
            bail!("the per-layer optimizer step is for a full fine-tune (under LoRA only the adapters train)");
        }
        self.ensure_grads(dev)?;
        let Some(mut g) = self.grads.take() else { bail!("gradients not allocated") };
        let r = self.stepped_into(dev, &mut g, f, h, step);
        self.grads = Some(g);
        r?;
        step(self.params_and_grads())
    }

    fn stepped_into(
        &mut self, dev: &Device, g: &mut LlavaParams, f: &LlavaFwd, h: &LogpGrad, step: &mut lm::StepFn,
    ) -> Result<()> {
        let s = Stepped { dims: &self.tdims, names: &self.names, p: &mut self.params.text, g: &mut g.text };
        let d_img = head::backward_stepped(dev, s, self.grad_store, &f.text, h, step)?;
        match (&f.image, d_img) {
            (Some(img), Some(d_img)) => self.image_backward(dev, g, img, &d_img),
            _ => Ok(()),
        }
    }

    /// Backward from d final_hidden [S, D] (the lm_head's own gradient is the caller's, e.g.
    /// `ops::logprob::fwd_bwd` into `lm_head_grad`): accumulates every other gradient.
    pub fn backward(&mut self, dev: &Device, f: &LlavaFwd, dxf: &Buf) -> Result<()> {
        self.ensure_grads(dev)?;
        if let Some(l) = self.lora.as_mut() {
            // Frozen base and tower: only the text adapters' gradients.
            let LoraState { text, grads, .. } = l;
            let Some(lg) = grads.as_mut() else { bail!("gradients not allocated") };
            let text_lm = Lm { dims: &self.tdims, p: &self.params.text, lora: text };
            text_lm.backward(dev, LmGrads { base: None, lora: Some(&mut lg.text) }, &f.text, dxf)?;
            return Ok(());
        }
        let Some(mut g) = self.grads.take() else { bail!("gradients not allocated") };
        let r = self.backward_into(dev, &mut g, f, dxf);
        self.grads = Some(g);
        r
    }

    fn backward_into(&self, dev: &Device, g: &mut LlavaParams, f: &LlavaFwd, dxf: &Buf) -> Result<()> {
        let base_lm = Lm { dims: &self.tdims, p: &self.params.text, lora: &[] };
        let d_img = base_lm.backward(dev, LmGrads { base: Some(&mut g.text), lora: None }, &f.text, dxf)?;
        match (&f.image, d_img) {
            (Some(img), Some(d_img)) => self.image_backward(dev, g, img, &d_img),
            _ => Ok(()),
        }
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
        let Extend { ids, n_new, pixels, image_sizes } = x;
        let (at, ids) = self.placeholders(ids, image_sizes)?;
        let lens = s.lm.lens().to_vec();
        if n_new == 0 || ids.len() != lens.len() * n_new {
            bail!("LLaVA-NeXT extend: {} ids for {} sequences of {n_new} new tokens", ids.len(), lens.len());
        }
        let mut pos = Vec::with_capacity(ids.len());
        for &l in &lens {
            self.check_window(l as usize + n_new)?;
            pos.extend((0..n_new as i32).map(|j| l + j));
        }
        let embeds = if image_sizes.is_empty() { None } else { Some(self.image_embeds(dev, pixels, image_sizes)?) };
        let inject = embeds.as_ref().map(|rows| Inject { rows, at: &at });
        self.lm().extend_logits(dev, &mut s.lm, Tokens { ids: &ids, pos: &pos, inject }, n_new, last_only)
    }

    /// The text decoder with its adapters (none while `adapters_off`).
    fn lm(&self) -> Lm<'_> {
        Lm { dims: &self.tdims, p: &self.params.text, lora: self.lora_text() }
    }
}

impl LlavaNext {
    /// A ragged rollout step (see `QwenVl::step_ragged`); positions `pos` [T_new] continue each
    /// sequence's cache. `<image>` ids are replaced by 0 before the embedding (the placeholder may
    /// lie past the vocabulary); their rows come from `image_rows`.
    pub fn step_ragged<'s>(
        &self, dev: &Device, cache: &mut LmCache, scratch: &'s mut StepScratch, input: StepInput,
    ) -> Result<&'s mut Buf> {
        let StepInput { ids, pos, cu_new, image_rows } = input;
        let img = self.cfg.image_token_index as i64;
        let at: Vec<usize> = ids.iter().enumerate().filter(|(_, &id)| id as i64 == img).map(|(i, _)| i).collect();
        let ids: Vec<i32> = ids.iter().map(|&id| if id as i64 == img { 0 } else { id }).collect();
        for (b, &l) in cache.lens().iter().enumerate() {
            self.check_window(l as usize + (cu_new[b + 1] - cu_new[b]) as usize)?;
        }
        let inject = lm::inject_checked(&at, image_rows, self.tdims.layer.d)?;
        self.lm().step_logits(dev, cache, scratch, Tokens { ids: &ids, pos, inject }, cu_new)
    }
}

/// The pack plan of every image as global row indices (images back to back).
fn packing(dev: &Device, geos: &[AnyresGeometry], g: usize, n_feat: usize) -> Result<Packing> {
    let (mut src, mut dst, mut newline) = (Vec::new(), Vec::new(), Vec::new());
    let (mut feat_off, mut tok_off) = (0usize, 0usize);
    for geo in geos {
        if geo.g != g {
            bail!("anyres geometry has {} patches per side, the tower {g}", geo.g);
        }
        for (j, s) in geo.plan().iter().enumerate() {
            match s.feature_row(g) {
                Some(r) => {
                    src.push(feat_off + r);
                    dst.push(tok_off + j);
                }
                None => newline.push(tok_off + j),
            }
        }
        feat_off += geo.num_tiles() * g * g;
        tok_off += geo.num_tokens();
    }
    Ok(Packing {
        src: RowIndex::new(dev, &src, n_feat)?,
        dst: RowIndex::new(dev, &dst, tok_off)?,
        newline: RowIndex::new(dev, &newline, tok_off)?,
        tokens: tok_off,
    })
}

/// Projector (w1, b1, w2, b2) and image_newline names; biases per the config.
fn head_refs(cfg: &LlavaNextConfig) -> [ParamRef; 5] {
    let (dv, d) = (cfg.projector_in(), cfg.text.hidden_size);
    [
        ParamRef::whole("multi_modal_projector.linear_1.weight", &[d, dv]),
        ParamRef::whole("multi_modal_projector.linear_1.bias", &[d]),
        ParamRef::whole("multi_modal_projector.linear_2.weight", &[d, d]),
        ParamRef::whole("multi_modal_projector.linear_2.bias", &[d]),
        ParamRef::whole("image_newline", &[d]),
    ]
}

/// `text_layers` false: the decoder layers are left out (the per-layer step's gradient set).
fn build_params(
    cfg: &LlavaNextConfig, vd: &ClipDims, td: &LmDims, names: &LmNames, grads: bool, text_layers: bool,
    make: &mut dyn FnMut(&ParamRef) -> Result<Buf>,
) -> Result<LlavaParams> {
    let vision = ClipParams::build(vd, grads, make)?;
    let [rw1, rb1, rw2, rb2, rnl] = head_refs(cfg);
    let bias = cfg.multimodal_projector_bias;
    let w1 = make(&rw1)?;
    let b1 = if bias { Some(make(&rb1)?) } else { None };
    let w2 = make(&rw2)?;
    let b2 = if bias { Some(make(&rb2)?) } else { None };
    let newline = make(&rnl)?;
    let text = if text_layers { LmParams::build(td, names, make)? } else { LmParams::build_outer(td, names, make)? };
    Ok(LlavaParams { vision, proj: Projector { w1, b1, w2, b2 }, newline, text })
}

fn head_entries<'a>(p: &'a Projector, newline: &'a Buf, cfg: &LlavaNextConfig) -> Vec<(ParamRef, &'a Buf)> {
    let [rw1, rb1, rw2, rb2, rnl] = head_refs(cfg);
    let mut v = vec![(rw1, &p.w1)];
    v.extend(p.b1.as_ref().map(|b| (rb1, b)));
    v.push((rw2, &p.w2));
    v.extend(p.b2.as_ref().map(|b| (rb2, b)));
    v.push((rnl, newline));
    v
}

fn head_entries_mut<'a>(
    p: &'a mut Projector, newline: &'a mut Buf, cfg: &LlavaNextConfig,
) -> Vec<(ParamRef, &'a mut Buf)> {
    let [rw1, rb1, rw2, rb2, rnl] = head_refs(cfg);
    let Projector { w1, b1, w2, b2 } = p;
    let mut v = vec![(rw1, w1)];
    v.extend(b1.as_mut().map(|b| (rb1, b)));
    v.push((rw2, w2));
    v.extend(b2.as_mut().map(|b| (rb2, b)));
    v.push((rnl, newline));
    v
}

fn entries<'a>(
    p: &'a LlavaParams, cfg: &LlavaNextConfig, vd: &ClipDims, td: &LmDims, names: &LmNames,
) -> Vec<(ParamRef, &'a Buf)> {
    let mut v = p.vision.entries(vd);
    v.extend(head_entries(&p.proj, &p.newline, cfg));
    v.extend(p.text.entries(td, names));
    v
}
