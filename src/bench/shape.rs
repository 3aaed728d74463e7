//! What the workload suites run on: a named shape with random weights (`tiny`, the embedded
//! default; `qwen2.5-vl-7b` and `llava-next-7b`, the published configs in `assets/`) or a
//! checkpoint directory. Each gives a model without any allocation (a skeleton, for the plan
//! and the FLOP counts), a random or loaded model on a device, its tokenizer and image
//! processor, and a model directory for the GRPO stage. The 7B shapes ship no tokenizer, so
//! they get a synthetic one with the config's special ids (`synth::tokenizer_for`).

use super::synth;
use crate::checkpoint::safetensors_io::SaveDtype;
use crate::models::common::params::ParamRef;
use crate::models::llava_next::config::{LlavaNextConfig, LlavaPreprocessorConfig};
use crate::models::llava_next::model::LlavaNext;
use crate::models::qwen2_5_vl::chat::load_tokenizer;
use crate::models::qwen2_5_vl::config::{QwenPreprocessorConfig, QwenVlConfig};
use crate::models::qwen2_5_vl::model::QwenVl;
use crate::models::tiny;
use crate::ops::{elementwise, init};
use crate::stages::model::{Family, Net, Processor, VlModel};
use crate::stages::sft::{save_side_files, Loaded};
use crate::tensor::{Buf, DType, Device};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

pub const QWEN_7B_CONFIG: &str = include_str!("../../assets/qwen2_5_vl_7b/config.json");
/// llava-hf/llava-v1.6-mistral-7b-hf's config.json (text and vision sizes from the class
/// defaults it relies on: Mistral-7B 4096 × 32 layers, CLIP ViT-L/14 at 336 px).
pub const LLAVA_7B_CONFIG: &str = include_str!("../../assets/llava_next_7b/config.json");

pub const SHAPES: [&str; 3] = ["tiny", "qwen2.5-vl-7b", "llava-next-7b"];

#[derive(Clone, Debug)]
pub enum Source {
    Tiny,
    Config(&'static str),
    Dir(PathBuf),
}

#[derive(Clone, Debug)]
pub struct Subject {
    /// The shape's name, or the directory for `--model`.
    pub name: String,
    pub source: Source,
}

/// Empty parameter buffers: the model's structure (names, shapes, dims) with nothing allocated.
fn empty(_: &ParamRef) -> Result<Buf> {
    Ok(Buf::HostF32(Vec::new()))
}

impl Subject {
    pub fn new(shape: Option<&str>, model: Option<&Path>) -> Result<Subject> {
        match (shape, model) {
            (Some(_), Some(_)) => bail!("--shape and --model exclude each other"),
            (None, Some(d)) => {
                Family::of_dir(d)?;
                Ok(Subject { name: d.display().to_string(), source: Source::Dir(d.to_path_buf()) })
            }
            (Some("tiny"), None) => Ok(Subject { name: "tiny".into(), source: Source::Tiny }),
            (Some("qwen2.5-vl-7b"), None) => {
                Ok(Subject { name: "qwen2.5-vl-7b".into(), source: Source::Config(QWEN_7B_CONFIG) })
            }
            (Some("llava-next-7b"), None) => {
                Ok(Subject { name: "llava-next-7b".into(), source: Source::Config(LLAVA_7B_CONFIG) })
            }
            (Some(s), None) => bail!("--shape {s:?}: expected one of {}", SHAPES.join(", ")),
            (None, None) => bail!("the workload suites need --shape ({}) or --model DIR", SHAPES.join(", ")),
        }
    }

    pub fn is_tiny(&self) -> bool {
        matches!(self.source, Source::Tiny)
    }

    /// The model with empty buffers: sizes, names and dims, nothing allocated.
    pub fn skeleton(&self) -> Result<VlModel> {
        match &self.source {
            Source::Tiny => Ok(QwenVl::build(tiny::config(&tiny::tokenizer()?)?, &mut empty)?.into()),
            Source::Config(text) => {
                let v: serde_json::Value = serde_json::from_str(text).context("embedded config")?;
                let where_ = Path::new("<embedded 7B config>");
                if v.get("model_type").and_then(|m| m.as_str()) == Some("llava_next") {
                    Ok(LlavaNext::build(LlavaNextConfig::from_json(&v, where_)?, &mut empty)?.into())
                } else {
                    Ok(QwenVl::build(QwenVlConfig::from_json(&v, where_)?, &mut empty)?.into())
                }
            }
            Source::Dir(d) => match Family::of_dir(d)? {
                Family::Qwen => Ok(QwenVl::build(QwenVlConfig::load(d)?, &mut empty)?.into()),
                Family::Llava => Ok(LlavaNext::build(LlavaNextConfig::load(d)?, &mut empty)?.into()),
            },
        }
    }

    pub fn tokenizer(&self, skeleton: &VlModel) -> Result<Tokenizer> {
        match &self.source {
            Source::Tiny => tiny::tokenizer(),
            Source::Config(_) => synth::tokenizer_for(skeleton),
            Source::Dir(d) => load_tokenizer(d)?.with_context(|| format!("{}: no tokenizer.json", d.display())),
        }
    }

    pub fn processor(&self, model: &VlModel) -> Result<Processor> {
        match (&self.source, &model.net) {
            (Source::Tiny, _) => Ok(Processor::Qwen(tiny::preprocessor()?)),
            // Qwen2.5-VL-7B's own settings (min/max pixels 3136 / 12845056).
            (Source::Config(_), Net::Qwen(_)) => Ok(Processor::Qwen(QwenPreprocessorConfig::default())),
            (Source::Config(_), Net::Llava(m)) => Ok(Processor::Llava(LlavaPreprocessorConfig::for_model(&m.cfg))),
            (Source::Dir(d), _) => Processor::load(d, model),
        }
    }

    /// The model on `dev` (random weights from `seed`, or the checkpoint), with its tokenizer
    /// and processor.
    pub fn load(&self, dev: &Device, seed: u64) -> Result<Loaded> {
        let model: VlModel = match &self.source {
            Source::Tiny => tiny::build(dev, tiny::config(&tiny::tokenizer()?)?, tiny::INIT_SEED ^ seed)?.into(),
            Source::Config(_) => random_like(dev, &self.skeleton()?, seed)?,
            Source::Dir(d) => VlModel::load(dev, d)?,
        };
        let tok = self.tokenizer(&model)?;
        let pp = self.processor(&model)?;
        let src_dir = match &self.source {
            Source::Dir(d) => Some(d.clone()),
            _ => None,
        };
        Ok(Loaded { model, tok, pp, src_dir })
    }

    /// A model directory the GRPO stage can start from: the checkpoint itself, or the random
    /// model written into `tmp` (weights, config, tokenizer, processor files).
    pub fn model_dir(&self, dev: &Device, tmp: &Path, seed: u64) -> Result<PathBuf> {
        if let Source::Dir(d) = &self.source {
            return Ok(d.clone());
        }
        let l = self.load(dev, seed)?;
        let dir = tmp.join("model");
        std::fs::create_dir_all(&dir)?;
        l.model.save(dev, &dir, if dev.is_cuda() { SaveDtype::BF16 } else { SaveDtype::F32 })?;
        match &self.source {
            Source::Tiny => save_side_files(&l, &dir)?,
            // No preprocessor file: both families' loaders default to the 7B settings.
            _ => l
                .tok
                .save(dir.join("tokenizer.json"), false)
                .map_err(|e| anyhow::anyhow!("saving tokenizer.json: {e}"))?,
        }
        Ok(dir)
    }

    /// The published baselines were measured with Qwen2(.5-VL)-7B: they apply to that shape
    /// (or a checkpoint of its sizes) only.
    pub fn baselines_apply(&self, skeleton: &VlModel) -> bool {
        let t = skeleton.tdims();
        skeleton.family() == Family::Qwen && t.layer.d == 3584 && t.n_layers == 28 && t.vocab == 152064
    }
}

/// Random weights shaped like `skeleton`, initialised on the device: N(0, 0.02) matrices,
/// unit norm weights, zero biases.
pub fn random_like(dev: &Device, skeleton: &VlModel, seed: u64) -> Result<VlModel> {
    let mut k = 0u64;
    let mut make = |r: &ParamRef| -> Result<Buf> {
        let n = r.numel();
        let mut b = dev.zeros_act(n)?;
        k += 1;
        let name = r.name.as_str();
        if (name.contains("norm") || name.contains("ln_q")) && name.ends_with(".weight") {
            elementwise::fill(dev, &mut b, 1.0, n)?;
        } else if !name.ends_with(".bias") {
            init::normal(dev, &mut b, n, seed.wrapping_mul(1_000_003).wrapping_add(k), 0.0, 0.02)?;
        }
        Ok(b)
    };
    Ok(match &skeleton.net {
        Net::Qwen(m) => QwenVl::build(m.cfg.clone(), &mut make)?.into(),
        Net::Llava(m) => LlavaNext::build(m.cfg.clone(), &mut make)?.into(),
    })
}

/// Parameters that get a gradient (and AdamW state in a full fine-tune): all of Qwen's;
/// LLaVA's but the CLIP layers past the feature layer and its post-layernorm.
pub fn grad_refs(m: &VlModel) -> Vec<ParamRef> {
    let used = match &m.net {
        Net::Llava(l) => Some(l.vdims.feature_state),
        Net::Qwen(_) => None,
    };
    m.param_entries()
        .into_iter()
        .map(|(r, _)| r)
        .filter(|r| match used {
            None => true,
            Some(n) => {
                if r.name.contains("vision_tower.") && r.name.contains("post_layernorm") {
                    return false;
                }
                match r
                    .name
                    .split("encoder.layers.")
                    .nth(1)
                    .and_then(|t| t.split('.').next())
                    .and_then(|i| i.parse::<usize>().ok())
                {
                    Some(i) if r.name.starts_with("vision_tower.") => i < n,
                    _ => true,
                }
            }
        })
        .collect()
}

/// Model FLOPs from the shape (matmuls as 2·m·n·k, attention's two products; norms,
/// activations and the optimizer not counted; a backward as twice the forward).
#[derive(Clone, Debug)]
pub struct FlopModel {
    /// Decoder matmul weights per token, lm_head included.
    pub lm_matmul: f64,
    /// lm_head (V × D) alone.
    pub head: f64,
    pub q_dim: f64,
    pub layers: f64,
    pub vision: VisionFlops,
}

#[derive(Clone, Debug)]
pub enum VisionFlops {
    /// Per patch: block matmuls and patch embedding; per merged token: the merger; attention
    /// per block (full or windowed).
    Qwen {
        per_patch: f64,
        per_merged: f64,
        unit: usize,
        d: f64,
        full_blocks: usize,
        window_blocks: usize,
        window: usize,
    },
    /// Per tile: CLIP layers that run over g²+1 tokens, patch embedding and projector over g².
    Clip { per_token: f64, per_patch: f64, tokens: usize, patches: usize, d: f64, layers: usize },
}

impl FlopModel {
    pub fn of(m: &VlModel) -> FlopModel {
        let t = m.tdims();
        let entries: Vec<ParamRef> = m.param_entries().into_iter().map(|(r, _)| r).collect();
        let two_d = |r: &ParamRef| r.full_shape.len() == 2;
        let head = (t.vocab * t.layer.d) as f64;
        let mut lm: f64 = entries
            .iter()
            .filter(|r| {
                two_d(r)
                    && !m.is_vision(&r.name)
                    && !r.name.contains("embed_tokens")
                    && !r.name.contains("multi_modal_projector")
            })
            .map(|r| r.numel() as f64)
            .sum();
        if t.tied {
            lm += head;
        }
        let vision = match &m.net {
            Net::Qwen(q) => {
                let v = &q.vdims;
                let blocks: f64 = entries
                    .iter()
                    .filter(|r| two_d(r) && r.name.starts_with("visual.blocks."))
                    .map(|r| r.numel() as f64)
                    .sum();
                let patch = (v.patch_dim * v.block.d) as f64;
                let merger: f64 = entries
                    .iter()
                    .filter(|r| two_d(r) && r.name.starts_with("visual.merger."))
                    .map(|r| r.numel() as f64)
                    .sum();
                let side = v.vws * v.merge;
                VisionFlops::Qwen {
                    per_patch: 2.0 * (blocks + patch),
                    per_merged: 2.0 * merger,
                    unit: v.unit(),
                    d: v.block.d as f64,
                    full_blocks: v.fullatt.len(),
                    window_blocks: v.depth - v.fullatt.len(),
                    window: side * side,
                }
            }
            Net::Llava(l) => {
                let v = &l.vdims;
                let layer_of = |n: &str| {
                    n.split("encoder.layers.")
                        .nth(1)
                        .and_then(|t| t.split('.').next())
                        .and_then(|i| i.parse::<usize>().ok())
                };
                let layers: f64 = entries
                    .iter()
                    .filter(|r| {
                        two_d(r)
                            && layer_of(&r.name).is_some_and(|i| i < v.feature_state)
                            && r.name.starts_with("vision_tower.")
                    })
                    .map(|r| r.numel() as f64)
                    .sum();
                let patch = (v.channels * v.patch * v.patch * v.d) as f64;
                let proj: f64 = entries
                    .iter()
                    .filter(|r| two_d(r) && r.name.contains("multi_modal_projector"))
                    .map(|r| r.numel() as f64)
                    .sum();
                VisionFlops::Clip {
                    per_token: 2.0 * layers,
                    per_patch: 2.0 * (patch + proj),
                    tokens: v.g * v.g + 1,
                    patches: v.g * v.g,
                    d: v.d as f64,
                    layers: v.feature_state,
                }
            }
        };
        FlopModel { lm_matmul: lm, head, q_dim: t.layer.q_dim() as f64, layers: t.n_layers as f64, vision }
    }

    /// Forward FLOPs of causal sequences of these lengths through the decoder, with the head
    /// on `head_rows` rows (all of them in training, the last one in a prefill).
    pub fn lm_fwd(&self, seqs: &[usize], head_rows: usize) -> f64 {
        seqs.iter()
            .map(|&s| {
                2.0 * (self.lm_matmul - self.head) * s as f64 + 2.0 * (s as f64).powi(2) * self.q_dim * self.layers
            })
            .sum::<f64>()
            + 2.0 * self.head * head_rows as f64
    }

    /// Forward FLOPs of the vision tower: Qwen images as patch grids [t, h, w], LLaVA as a
    /// count of 336-px tiles (grids [tiles, 0, 0]).
    pub fn vision_fwd(&self, grids: &[[usize; 3]]) -> f64 {
        match &self.vision {
            VisionFlops::Qwen { per_patch, per_merged, unit, d, full_blocks, window_blocks, window } => grids
                .iter()
                .map(|g| {
                    let p = (g[0] * g[1] * g[2]) as f64;
                    let w = (*window as f64).min(p);
                    per_patch * p
                        + per_merged * p / *unit as f64
                        + 4.0 * d * (p * p * *full_blocks as f64 + p * w * *window_blocks as f64)
                })
                .sum(),
            VisionFlops::Clip { per_token, per_patch, tokens, patches, d, layers } => {
                let tiles: usize = grids.iter().map(|g| g[0]).sum();
                let (t, p) = (*tokens as f64, *patches as f64);
                tiles as f64 * (per_token * t + per_patch * p + 4.0 * d * t * t * *layers as f64)
            }
        }
    }

    pub fn describe(&self) -> serde_json::Value {
        let vision = match &self.vision {
            VisionFlops::Qwen { per_patch, per_merged, full_blocks, window_blocks, window, .. } => format!(
                "Qwen2.5-VL tower: {:.3} GFLOP per patch (blocks + patch embedding), {:.3} GFLOP per merged token (merger), attention 4·P²·d in {full_blocks} full blocks and 4·P·{window}·d in {window_blocks} windowed blocks (P patches per image)",
                per_patch / 1e9,
                per_merged / 1e9
            ),
            VisionFlops::Clip { per_token, per_patch, tokens, layers, .. } => {
                format!("CLIP tower: per 336-px tile {layers} layers × {tokens} tokens ({:.3} GFLOP per token) + patch embedding and projector ({:.3} GFLOP per patch) + attention 4·T²·d per layer", per_token / 1e9, per_patch / 1e9)
            }
        };
        serde_json::json!({
            "method": "matmuls 2·m·n·k and attention's two products only (norms, activations, optimizer not counted); causal attention over a sequence of S tokens 2·S²·q_dim per layer; training = 3 × forward (recomputation not counted, so MFU is model FLOPs utilisation); MFU against 770 TFLOP/s (bf16 GEMM measured on this workplace's H200) and 989 TFLOP/s (H200 dense bf16 datasheet)",
            "lm_matmul_params": self.lm_matmul,
            "lm_fwd_gflop_per_token_without_attention": 2.0 * self.lm_matmul / 1e9,
            "lm_head_params": self.head,
            "attention": format!("2·S²·{}·{} per causal sequence of S tokens", self.q_dim, self.layers),
            "vision": vision,
        })
    }
}

/// Bytes of a set of parameter buffers as allocated.
pub fn buf_bytes<'a>(bufs: impl IntoIterator<Item = &'a Buf>) -> usize {
    bufs.into_iter().map(|b| b.len() * b.dtype().size()).sum()
}

/// The element size a device stores weights and activations in.
pub fn act_bytes(dev: &Device) -> usize {
    match dev.act_dtype() {
        DType::BF16 if dev.is_cuda() => 2,
        _ => 4,
    }
}
