//! LLaVA-NeXT configuration (model-spec B1): `config.json` with a nested `text_config` (a
//! Mistral or Llama decoder), a CLIP `vision_config`, the anyres `image_grid_pinpoints`, the
//! feature layer/strategy and the image token; omitted fields inside `text_config` and
//! `vision_config` take the defaults transformers' config classes apply (MistralConfig /
//! LlamaConfig, CLIPVisionConfig), because the sparse published llava-hf files leave e.g. the
//! text `hidden_size` out and rely on them. `text_config` and `vision_config` themselves are
//! required: LlavaNextConfig would silently build a Llama-2-7B / CLIP-L there. Every size is
//! capped (`models::limits`). Also `preprocessor_config.json`
//! (`LlavaNextImageProcessor`), and the checkpoint's weight names: the published llava-hf
//! spelling is canonical, [`resolve`] finds the spelling a checkpoint actually uses
//! (`vision_tower.*` without `vision_model.` as transformers 5 saves it, `model.language_model.*`,
//! `lm_head.weight`, ...), and [`weight_shapes`] lists every tensor with its expected shape.
//!
//! Here: [`LlavaNextConfig`] and its parts; `text` (the decoder's `text_config` and its class
//! defaults), `vision` (the CLIP `vision_config`, the feature layers), `anyres` (the grid
//! pinpoints), `preprocessor` ([`LlavaPreprocessorConfig`]), `weights` (names and shapes).

use crate::checkpoint::{write_atomic, Checkpoint};
use crate::models::limits::{
    MAX_IMAGE_PATCHES, MAX_IMAGE_SIDE, MAX_INTERMEDIATE, MAX_LAYERS, MAX_PATCH, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH,
};
use crate::models::qwen2_5_vl::config::{saved_json, SourceJson, CLIP_MEAN, CLIP_STD};
use crate::models::{read_json, root_object, Fields};
use anyhow::{anyhow, bail, Result};
use serde_json::{json, Map, Value};
use std::path::Path;

mod anyres;
mod preprocessor;
mod text;
mod vision;
mod weights;
use anyres::*;
pub use preprocessor::*;
use text::*;
use vision::*;
pub use weights::*;

/// The decoder family inside `text_config` (decides the chat template, not the math: both are
/// pre-norm RMSNorm/RoPE/SwiGLU decoders without biases).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextFamily {
    /// `model_type: "mistral"` (llava-v1.6-mistral-7b-hf).
    Mistral,
    /// `model_type: "llama"` (llava-v1.6-vicuna-7b-hf; also the default when omitted).
    Llama,
}

impl TextFamily {
    pub fn model_type(self) -> &'static str {
        match self {
            TextFamily::Mistral => "mistral",
            TextFamily::Llama => "llama",
        }
    }
}

/// The language model (`MistralConfig` / `LlamaConfig`).
#[derive(Clone, Debug, PartialEq)]
pub struct TextConfig {
    pub family: TextFamily,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// `head_dim` if given (Mistral may set it), else hidden_size / num_attention_heads.
    pub head_dim: usize,
    /// Embedding rows (32064 for the 7B models: the tokenizer's 32002 padded).
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    /// Mistral's sliding-window size; None when the file says null (the published Mistral) or
    /// for Llama. MistralConfig's class default is 4096 when the key is absent.
    pub sliding_window: Option<usize>,
    pub hidden_act: String,
    pub tie_word_embeddings: bool,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
    pub pad_token_id: Option<u32>,
}

/// The CLIP vision tower (`CLIPVisionConfig`).
#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    /// Side of one tile in pixels (336 for 7B).
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: String,
    /// CLIP's projection width; unused by LLaVA (kept to write the config back).
    pub projection_dim: usize,
}

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
    /// Patches per tile side, g (24 for 7B).
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }
    /// Patch tokens per tile, g² (576), without CLS.
    pub fn num_patches(&self) -> usize {
        self.patches_per_side() * self.patches_per_side()
    }
    /// Positions including CLS (577).
    pub fn num_positions(&self) -> usize {
        self.num_patches() + 1
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureSelect {
    /// Drop the CLS token (the only strategy anyres packing accepts).
    Default,
    /// Keep CLS; transformers' LLaVA-NeXT packing raises on it, so the config is rejected.
    Full,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LlavaNextConfig {
    pub text: TextConfig,
    pub vision: VisionConfig,
    /// The `<image>` placeholder id (32000 for 7B; `image_token_id` is accepted as an alias).
    /// It may be ≥ the vocabulary size: the model must not look its embedding up (transformers
    /// embeds id 0 there and then overwrites those rows with the image features).
    pub image_token_index: u32,
    /// Hidden-state indices as written (−2 = the output of the second-to-last layer); several
    /// are concatenated along channels (their count multiplies the projector's input width).
    pub vision_feature_layer: Vec<i64>,
    pub vision_feature_select_strategy: FeatureSelect,
    /// Candidate anyres canvases as (height, width), in list order (order breaks ties).
    pub image_grid_pinpoints: Vec<(usize, usize)>,
    pub projector_hidden_act: String,
    pub multimodal_projector_bias: bool,
    /// Informational (576 for 7B).
    pub image_seq_length: usize,
    /// Storage dtype recorded in the file.
    pub torch_dtype: String,
    /// The parsed file itself, so a save keeps the fields this struct does not model.
    pub source: SourceJson,
}

/// The published 7B pinpoints, (height, width).
pub const DEFAULT_PINPOINTS: [(usize, usize); 5] = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)];

impl LlavaNextConfig {
    /// Reads `dir/config.json`.
    pub fn load(dir: impl AsRef<Path>) -> Result<LlavaNextConfig> {
        let path = dir.as_ref().join("config.json");
        let v = read_json(&path)?;
        Self::from_json(&v, &path)
    }

    /// Parses a config object; `file` is only used in messages.
    pub fn from_json(v: &Value, file: &Path) -> Result<LlavaNextConfig> {
        let root = Fields::new(root_object(v, file)?, "", file);
        match root.opt_str("model_type")? {
            Some("llava_next") => {}
            Some(other) => {
                return Err(root.err(
                    "model_type",
                    format!("expected \"llava_next\", got {other:?} (not a LLaVA-NeXT checkpoint)"),
                ))
            }
            None => {
                let archs = root.get("architectures").map(|a| a.to_string()).unwrap_or_default();
                if !archs.contains("LlavaNext") {
                    return Err(root.err(
                        "model_type",
                        "missing, and `architectures` does not name LlavaNextForConditionalGeneration",
                    ));
                }
            }
        }
        let required = |key: &str, what: &str| -> Result<&Map<String, Value>> {
            root.object(key)?.ok_or_else(|| root.err(key, format!("missing (required: {what}; transformers would build a default one that is not this checkpoint)")))
        };
        let t = Fields::new(required("text_config", "the decoder's sizes")?, "text_config", file);
        let text = parse_text(root, t)?;
        let vf = Fields::new(required("vision_config", "the vision tower's sizes")?, "vision_config", file);
        let vision = parse_vision(vf, &CLIP_CLASS_DEFAULTS)?;

        let image_token_index = match root.opt_token_id("image_token_index")? {
            Some(id) => id,
            None => root.opt_token_id("image_token_id")?.unwrap_or(32000),
        };
        // The id may lie past the embedding (the class defaults pair 32000 with a 32000-row
        // vocabulary): transformers never embeds placeholder ids, it overwrites their rows.

        let vision_feature_layer = parse_feature_layers(root, vision.num_hidden_layers)?;
        let vision_feature_select_strategy = match root.opt_str("vision_feature_select_strategy")?.unwrap_or("default") {
            "default" => FeatureSelect::Default,
            "full" => {
                return Err(root.err(
                    "vision_feature_select_strategy",
                    "\"full\" keeps CLS, which LLaVA-NeXT's anyres packing cannot place (transformers raises at the forward); use \"default\"",
                ))
            }
            other => return Err(root.err("vision_feature_select_strategy", format!("expected \"default\" or \"full\", got {other:?}"))),
        };

        let image_grid_pinpoints = match root.get("image_grid_pinpoints") {
            None => DEFAULT_PINPOINTS.to_vec(),
            Some(v) => parse_pinpoints(root, v)?,
        };
        for &(h, w) in &image_grid_pinpoints {
            if h % vision.image_size != 0 || w % vision.image_size != 0 {
                return Err(root.err(
                    "image_grid_pinpoints",
                    format!(
                        "[{h}, {w}] is not a multiple of vision_config.image_size {} (tiles would be partial)",
                        vision.image_size
                    ),
                ));
            }
            // The base image plus the canvas's tiles, all through the tower.
            let patches = ((h / vision.image_size) * (w / vision.image_size) + 1) * vision.num_patches();
            if patches > MAX_IMAGE_PATCHES {
                return Err(root.err(
                    "image_grid_pinpoints",
                    format!(
                        "[{h}, {w}] gives {patches} vision patches per image, above the limit of {MAX_IMAGE_PATCHES}"
                    ),
                ));
            }
        }

        let projector_hidden_act = root.opt_str("projector_hidden_act")?.unwrap_or("gelu").to_string();
        if projector_hidden_act != "gelu" {
            return Err(root.err(
                "projector_hidden_act",
                format!("{projector_hidden_act:?} is not supported (LLaVA-NeXT uses \"gelu\")"),
            ));
        }
        let cfg = LlavaNextConfig {
            image_token_index,
            vision_feature_layer,
            vision_feature_select_strategy,
            image_grid_pinpoints,
            projector_hidden_act,
            multimodal_projector_bias: root.opt_bool("multimodal_projector_bias")?.unwrap_or(true),
            image_seq_length: root.opt_usize("image_seq_length")?.unwrap_or(576),
            torch_dtype: match root.opt_str("torch_dtype")? {
                Some(s) => s.to_string(),
                None => root
                    .opt_str("dtype")?
                    .or(t.opt_str("torch_dtype")?)
                    .or(t.opt_str("dtype")?)
                    .unwrap_or("float16")
                    .to_string(),
            },
            text,
            vision,
            source: SourceJson::of(v),
        };
        Ok(cfg)
    }

    /// Hidden-state indices (0 = embeddings after `pre_layrnorm`, l+1 = output of encoder layer
    /// l) of `vision_feature_layer`, in the order their features are concatenated.
    pub fn feature_hidden_states(&self) -> Vec<usize> {
        let n = self.vision.num_hidden_layers as i64;
        // In range: checked at parse time.
        self.vision_feature_layer.iter().map(|&l| if l < 0 { (n + 1 + l) as usize } else { l as usize }).collect()
    }

    /// Encoder layers the forward must run (layers past the deepest selected state, and
    /// `post_layernorm`, do not affect the output).
    pub fn vision_layers_used(&self) -> usize {
        self.feature_hidden_states().into_iter().max().unwrap_or(0)
    }

    /// Width of the projector's input: vision hidden × number of selected layers.
    pub fn projector_in(&self) -> usize {
        self.vision.hidden_size * self.vision_feature_layer.len()
    }

    /// Parameters of the whole model (every tensor of [`weight_shapes`]), from the config alone.
    pub fn num_params(&self) -> u64 {
        weight_shapes(self).iter().map(|(_, s)| s.iter().map(|&d| d as u64).product::<u64>()).sum()
    }

    /// The config in the published llava-hf layout (nested text/vision configs with every field
    /// written out, so defaults never depend on the loader's version).
    pub fn to_json(&self) -> Value {
        let t = &self.text;
        let v = &self.vision;
        let arch = match t.family {
            TextFamily::Mistral => "MistralForCausalLM",
            TextFamily::Llama => "LlamaForCausalLM",
        };
        let layer = if self.vision_feature_layer.len() == 1 {
            json!(self.vision_feature_layer[0])
        } else {
            json!(self.vision_feature_layer)
        };
        let mut text = json!({
            "architectures": [arch],
            "model_type": t.family.model_type(),
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim,
            "vocab_size": t.vocab_size,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "max_position_embeddings": t.max_position_embeddings,
            "hidden_act": t.hidden_act,
            "tie_word_embeddings": t.tie_word_embeddings,
            "bos_token_id": t.bos_token_id,
            "eos_token_id": t.eos_token_id,
            "pad_token_id": t.pad_token_id,
            "attention_dropout": 0.0,
            "torch_dtype": self.torch_dtype,
        });
        if t.family == TextFamily::Mistral {
            // Written explicitly: an absent key would mean MistralConfig's default of 4096.
            text["sliding_window"] = json!(t.sliding_window);
        } else {
            text["attention_bias"] = json!(false);
            text["mlp_bias"] = json!(false);
        }
        json!({
            "architectures": ["LlavaNextForConditionalGeneration"],
            "model_type": "llava_next",
            "image_token_index": self.image_token_index,
            "image_grid_pinpoints": self.image_grid_pinpoints.iter().map(|&(h, w)| json!([h, w])).collect::<Vec<_>>(),
            "image_seq_length": self.image_seq_length,
            "projector_hidden_act": self.projector_hidden_act,
            "multimodal_projector_bias": self.multimodal_projector_bias,
            "vision_feature_layer": layer,
            "vision_feature_select_strategy": "default",
            "tie_word_embeddings": t.tie_word_embeddings,
            "use_image_newline_parameter": true,
            "vocab_size": t.vocab_size,
            "torch_dtype": self.torch_dtype,
            "text_config": text,
            "vision_config": {
                "model_type": "clip_vision_model",
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_hidden_layers": v.num_hidden_layers,
                "num_attention_heads": v.num_attention_heads,
                "num_channels": v.num_channels,
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "layer_norm_eps": v.layer_norm_eps,
                "hidden_act": v.hidden_act,
                "projection_dim": v.projection_dim,
                "attention_dropout": 0.0,
            },
        })
    }

    /// What `save` writes: the source file with only the fields this project changed rewritten
    /// (`qwen2_5_vl::config::saved_json`), `dtype` (or the recorded one) as the storage dtype.
    pub fn to_saved_json(&self, dtype: Option<&str>) -> Value {
        let reparsed =
            self.source.get().and_then(|v| Self::from_json(v, Path::new("<source>")).ok()).map(|c| c.to_json());
        saved_json(self.source.get(), reparsed.as_ref(), &self.to_json(), dtype.unwrap_or(&self.torch_dtype))
    }

    /// Writes `dir/config.json` atomically (see `to_saved_json`).
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        self.save_as(dir, &self.torch_dtype)
    }

    /// `save`, recording `dtype` ("float32", "bfloat16") as what the tensors are.
    pub fn save_as(&self, dir: impl AsRef<Path>, dtype: &str) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.to_saved_json(Some(dtype)))?;
        write_atomic(&dir.as_ref().join("config.json"), text.as_bytes())
    }
}
