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

use crate::checkpoint::{write_atomic, Checkpoint};
use crate::models::limits::{
    MAX_IMAGE_PATCHES, MAX_IMAGE_SIDE, MAX_INTERMEDIATE, MAX_LAYERS, MAX_PATCH, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH,
};
use crate::models::qwen2_5_vl::config::{saved_json, SourceJson, CLIP_MEAN, CLIP_STD};
use crate::models::{read_json, root_object, Fields};
use anyhow::{anyhow, bail, Result};
use serde_json::{json, Map, Value};
use std::path::Path;

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

/// Class defaults of the two decoder configs (transformers' MistralConfig / LlamaConfig).
struct TextDefaults {
    intermediate_size: usize,
    num_key_value_heads: Option<usize>, // None: = num_attention_heads
    max_position_embeddings: usize,
    sliding_window: Option<usize>,
}

const MISTRAL_DEFAULTS: TextDefaults = TextDefaults {
    intermediate_size: 14336,
    num_key_value_heads: Some(8),
    max_position_embeddings: 4096 * 32,
    sliding_window: Some(4096),
};
const LLAMA_DEFAULTS: TextDefaults = TextDefaults {
    intermediate_size: 11008,
    num_key_value_heads: None,
    max_position_embeddings: 2048,
    sliding_window: None,
};

fn parse_text(root: Fields, t: Fields) -> Result<TextConfig> {
    // LlavaNextConfig makes a LlamaConfig when text_config (or its model_type) is absent.
    let family = match t.opt_str("model_type")? {
        None | Some("llama") => TextFamily::Llama,
        Some("mistral") => TextFamily::Mistral,
        Some(other) => {
            return Err(t.err(
                "model_type",
                format!("{other:?} is not supported (LLaVA-NeXT text models here are \"mistral\" or \"llama\")"),
            ))
        }
    };
    let d = match family {
        TextFamily::Mistral => &MISTRAL_DEFAULTS,
        TextFamily::Llama => &LLAMA_DEFAULTS,
    };
    // Omitted sizes: MistralConfig's / LlamaConfig's class defaults (the published files rely on them).
    let hidden_size = t.size_or("hidden_size", 4096, MAX_WIDTH)?;
    let num_attention_heads = t.size_or("num_attention_heads", 32, MAX_WIDTH)?;
    let num_key_value_heads =
        t.size_or("num_key_value_heads", d.num_key_value_heads.unwrap_or(num_attention_heads), MAX_WIDTH)?;
    if num_attention_heads % num_key_value_heads != 0 {
        return Err(t.err(
            "num_key_value_heads",
            format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"),
        ));
    }
    let head_dim = match t.opt_usize("head_dim")? {
        Some(hd) => t.within("head_dim", hd, MAX_WIDTH)?,
        None => {
            if hidden_size % num_attention_heads != 0 {
                return Err(t.err(
                    "num_attention_heads",
                    format!("{num_attention_heads} does not divide hidden_size {hidden_size}"),
                ));
            }
            hidden_size / num_attention_heads
        }
    };
    if head_dim % 2 != 0 {
        return Err(t.err("head_dim", format!("{head_dim} must be even for RoPE")));
    }
    if num_attention_heads * head_dim > MAX_WIDTH {
        return Err(t.err(
            "head_dim",
            format!("{head_dim} × num_attention_heads {num_attention_heads} is above the limit of {MAX_WIDTH}"),
        ));
    }
    let hidden_act = t.opt_str("hidden_act")?.unwrap_or("silu").to_string();
    if hidden_act != "silu" {
        return Err(t.err("hidden_act", format!("{hidden_act:?} is not supported (Mistral and Llama use \"silu\")")));
    }
    for key in ["attention_bias", "mlp_bias"] {
        if t.opt_bool(key)? == Some(true) {
            return Err(t.err(key, "biases in the decoder are not supported (the LLaVA-NeXT decoders have none)"));
        }
    }

    // RoPE: theta at the text level, or inside `rope_parameters` (v5) / `rope_scaling`.
    let mut rope_theta = t.opt_f64("rope_theta")?;
    for key in ["rope_parameters", "rope_scaling"] {
        if let Some(m) = t.object(key)? {
            let prefix = format!("text_config.{key}");
            let r = Fields::new(m, &prefix, t.file);
            let tk = if r.has("rope_type") { "rope_type" } else { "type" };
            match r.opt_str(tk)? {
                None | Some("default") => {}
                Some(other) => {
                    return Err(
                        r.err(tk, format!("rope type {other:?} is not supported (only plain RoPE, \"default\")"))
                    )
                }
            }
            if let Some(th) = r.opt_f64("rope_theta")? {
                rope_theta = Some(th);
            }
        }
    }
    let rope_theta = rope_theta.unwrap_or(10000.0);
    if rope_theta <= 0.0 {
        return Err(t.err("rope_theta", format!("must be positive, got {rope_theta}")));
    }

    // A present null means "no window"; only an absent key takes the class default.
    let sliding_window = match t.obj.get("sliding_window") {
        None => d.sliding_window,
        Some(Value::Null) => None,
        Some(_) => Some(t.size_or("sliding_window", 1, MAX_POSITIONS)?),
    };
    if family == TextFamily::Llama && sliding_window.is_some() {
        return Err(t.err("sliding_window", "Llama has no sliding window; remove the field or set it to null"));
    }

    // The text vocab decides the embedding; old files also repeat it at the top level.
    let vocab_size = match t.opt_usize("vocab_size")? {
        Some(n) => t.within("vocab_size", n, MAX_VOCAB)?,
        None => root.within("vocab_size", root.opt_usize("vocab_size")?.unwrap_or(32000), MAX_VOCAB)?,
    };
    let tie_root = root.opt_bool("tie_word_embeddings")?;
    let tie_text = t.opt_bool("tie_word_embeddings")?;
    let tie_word_embeddings = match (tie_root, tie_text) {
        (Some(a), Some(b)) if a != b => {
            return Err(
                root.err("tie_word_embeddings", format!("{a} conflicts with text_config.tie_word_embeddings = {b}"))
            )
        }
        (Some(a), _) | (None, Some(a)) => a,
        (None, None) => false,
    };
    let tok = |key: &str, default: u32| -> Result<u32> {
        Ok(match t.opt_token_id(key)? {
            Some(id) => id,
            None => root.opt_token_id(key)?.unwrap_or(default),
        })
    };
    let pad_token_id = match t.opt_token_id("pad_token_id")? {
        Some(id) => Some(id),
        None => root.opt_token_id("pad_token_id")?,
    };
    Ok(TextConfig {
        family,
        hidden_size,
        intermediate_size: t.size_or("intermediate_size", d.intermediate_size, MAX_INTERMEDIATE)?,
        num_hidden_layers: t.size_or("num_hidden_layers", 32, MAX_LAYERS)?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        vocab_size,
        rms_norm_eps: t.pos_f64("rms_norm_eps", 1e-6)?,
        rope_theta,
        max_position_embeddings: t.size_or("max_position_embeddings", d.max_position_embeddings, MAX_POSITIONS)?,
        sliding_window,
        hidden_act,
        tie_word_embeddings,
        bos_token_id: tok("bos_token_id", 1)?,
        eos_token_id: tok("eos_token_id", 2)?,
        pad_token_id,
    })
}

/// Vision defaults: CLIPVisionConfig's own (for fields a present `vision_config` omits).
struct VisionDefaults {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    image_size: usize,
    patch_size: usize,
    projection_dim: usize,
}

const CLIP_CLASS_DEFAULTS: VisionDefaults = VisionDefaults {
    hidden_size: 768,
    intermediate_size: 3072,
    num_hidden_layers: 12,
    num_attention_heads: 12,
    image_size: 224,
    patch_size: 32,
    projection_dim: 512,
};

fn parse_vision(v: Fields, d: &VisionDefaults) -> Result<VisionConfig> {
    match v.opt_str("model_type")? {
        None | Some("clip_vision_model") => {}
        Some(other) => {
            return Err(
                v.err("model_type", format!("{other:?} is not supported (only a CLIP tower, \"clip_vision_model\")"))
            )
        }
    }
    let hidden_size = v.size_or("hidden_size", d.hidden_size, MAX_WIDTH)?;
    let num_attention_heads = v.size_or("num_attention_heads", d.num_attention_heads, MAX_WIDTH)?;
    if hidden_size % num_attention_heads != 0 {
        return Err(
            v.err("num_attention_heads", format!("{num_attention_heads} does not divide hidden_size {hidden_size}"))
        );
    }
    let image_size = v.size_or("image_size", d.image_size, MAX_IMAGE_SIDE)?;
    let patch_size = v.size_or("patch_size", d.patch_size, MAX_PATCH)?;
    if image_size % patch_size != 0 {
        return Err(v.err("patch_size", format!("{patch_size} does not divide image_size {image_size}")));
    }
    let per_tile = (image_size / patch_size) * (image_size / patch_size);
    if per_tile > MAX_IMAGE_PATCHES {
        return Err(v.err(
            "image_size",
            format!("{image_size} gives {per_tile} patches per tile, above the limit of {MAX_IMAGE_PATCHES}"),
        ));
    }
    let num_channels = v.pos_usize("num_channels", 3)?;
    if num_channels != 3 {
        return Err(v.err("num_channels", format!("{num_channels}: only RGB (3) images are supported")));
    }
    let hidden_act = v.opt_str("hidden_act")?.unwrap_or("quick_gelu").to_string();
    if hidden_act != "quick_gelu" {
        return Err(v.err("hidden_act", format!("{hidden_act:?} is not supported (CLIP uses \"quick_gelu\")")));
    }
    Ok(VisionConfig {
        hidden_size,
        intermediate_size: v.size_or("intermediate_size", d.intermediate_size, MAX_INTERMEDIATE)?,
        num_hidden_layers: v.size_or("num_hidden_layers", d.num_hidden_layers, MAX_LAYERS)?,
        num_attention_heads,
        num_channels,
        image_size,
        patch_size,
        layer_norm_eps: v.pos_f64("layer_norm_eps", 1e-5)?,
        hidden_act,
        projection_dim: v.pos_usize("projection_dim", d.projection_dim)?,
    })
}

/// `vision_feature_layer`: an int or a non-empty list of ints, each a valid hidden-state index
/// (−(n+1) ..= n for n encoder layers).
fn parse_feature_layers(root: Fields, n_layers: usize) -> Result<Vec<i64>> {
    let key = "vision_feature_layer";
    let as_int = |x: &Value| -> Result<i64> {
        x.as_i64().ok_or_else(|| root.err(key, format!("expected an integer or a list of integers, got {x}")))
    };
    let layers = match root.get(key) {
        None => vec![-2],
        Some(Value::Array(a)) if !a.is_empty() => a.iter().map(as_int).collect::<Result<Vec<_>>>()?,
        Some(Value::Array(_)) => return Err(root.err(key, "the list is empty")),
        Some(x) => vec![as_int(x)?],
    };
    let n = n_layers as i64;
    if let Some(&bad) = layers.iter().find(|&&l| l < -(n + 1) || l > n) {
        return Err(root.err(
            key,
            format!("{bad} is not a hidden state of a {n_layers}-layer vision tower (valid: {} ..= {n})", -(n + 1)),
        ));
    }
    Ok(layers)
}

fn parse_pinpoints(f: Fields, v: &Value) -> Result<Vec<(usize, usize)>> {
    let key = "image_grid_pinpoints";
    let bad =
        || f.err(key, format!("expected a non-empty list of [height, width] pairs of positive integers, got {v}"));
    let Value::Array(list) = v else { return Err(bad()) };
    if list.is_empty() {
        return Err(bad());
    }
    let mut out = Vec::with_capacity(list.len());
    for p in list {
        match p.as_array().map(|a| a.iter().map(Value::as_u64).collect::<Vec<_>>()) {
            Some(a) if a.len() == 2 => match (a[0], a[1]) {
                (Some(h), Some(w)) if h > 0 && w > 0 => {
                    if h.max(w) > MAX_IMAGE_SIDE as u64 {
                        return Err(
                            f.err(key, format!("[{h}, {w}] has a side above the limit of {MAX_IMAGE_SIDE} pixels"))
                        );
                    }
                    out.push((h as usize, w as usize))
                }
                _ => return Err(bad()),
            },
            _ => return Err(bad()),
        }
    }
    Ok(out)
}

/// `preprocessor_config.json` of `LlavaNextImageProcessor`.
#[derive(Clone, Debug, PartialEq)]
pub struct LlavaPreprocessorConfig {
    /// `size.shortest_edge`: the side of the base image and of each tile (336).
    pub shortest_edge: usize,
    /// `crop_size` (height, width); must equal the tile size (anything else would crop tiles).
    pub crop_size: (usize, usize),
    pub image_grid_pinpoints: Vec<(usize, usize)>,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub rescale_factor: f64,
    pub do_rescale: bool,
    pub do_normalize: bool,
    /// PIL resample code; only 3 (bicubic) is supported.
    pub resample: u32,
}

impl Default for LlavaPreprocessorConfig {
    /// The published 7B settings.
    fn default() -> Self {
        LlavaPreprocessorConfig {
            shortest_edge: 336,
            crop_size: (336, 336),
            image_grid_pinpoints: DEFAULT_PINPOINTS.to_vec(),
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
            rescale_factor: 1.0 / 255.0,
            do_rescale: true,
            do_normalize: true,
            resample: 3,
        }
    }
}

impl LlavaPreprocessorConfig {
    /// The tile side in pixels.
    pub fn tile_size(&self) -> usize {
        self.shortest_edge
    }

    /// Reads `dir/preprocessor_config.json`; without the file, the settings that fit `model`
    /// (its tile size and pinpoints, CLIP normalisation).
    pub fn load(dir: impl AsRef<Path>, model: &LlavaNextConfig) -> Result<LlavaPreprocessorConfig> {
        let path = dir.as_ref().join("preprocessor_config.json");
        if !path.exists() {
            return Ok(Self::for_model(model));
        }
        let v = read_json(&path)?;
        let cfg = Self::from_json(&v, &path)?;
        cfg.check_against(model).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        Ok(cfg)
    }

    /// Defaults matched to a model config.
    pub fn for_model(model: &LlavaNextConfig) -> LlavaPreprocessorConfig {
        let s = model.vision.image_size;
        LlavaPreprocessorConfig {
            shortest_edge: s,
            crop_size: (s, s),
            image_grid_pinpoints: model.image_grid_pinpoints.clone(),
            ..Self::default()
        }
    }

    pub fn from_json(v: &Value, file: &Path) -> Result<LlavaPreprocessorConfig> {
        let f = Fields::new(root_object(v, file)?, "", file);
        if let Some(kind) = f.opt_str("image_processor_type")? {
            if !kind.starts_with("LlavaNextImageProcessor") {
                return Err(f.err("image_processor_type", format!("expected LlavaNextImageProcessor, got {kind:?}")));
            }
        }
        let d = Self::default();
        let shortest_edge = match f.object("size")? {
            None => d.shortest_edge,
            Some(m) => {
                let s = Fields::new(m, "size", file);
                match (s.opt_usize("shortest_edge")?, s.opt_usize("height")?, s.opt_usize("width")?) {
                    (Some(e), _, _) if e > 0 => s.within("shortest_edge", e, MAX_IMAGE_SIDE)?,
                    (None, Some(h), Some(w)) if h == w && h > 0 => s.within("height", h, MAX_IMAGE_SIDE)?,
                    _ => {
                        return Err(
                            s.err("shortest_edge", "expected a positive shortest_edge (or equal height and width)")
                        )
                    }
                }
            }
        };
        let crop_size = match f.get("crop_size") {
            None => (shortest_edge, shortest_edge),
            Some(Value::Object(m)) => {
                let c = Fields::new(m, "crop_size", file);
                (c.pos_usize("height", shortest_edge)?, c.pos_usize("width", shortest_edge)?)
            }
            Some(_) => (f.pos_usize("crop_size", shortest_edge)?, f.pos_usize("crop_size", shortest_edge)?),
        };
        if crop_size != (shortest_edge, shortest_edge) {
            return Err(f.err(
                "crop_size",
                format!("{crop_size:?} differs from the tile size {shortest_edge} (size.shortest_edge); cropped tiles are not supported"),
            ));
        }
        let image_grid_pinpoints = match f.get("image_grid_pinpoints") {
            None => d.image_grid_pinpoints,
            Some(v) => parse_pinpoints(f, v)?,
        };
        let triple = |key: &str, default: [f32; 3], positive: bool| -> Result<[f32; 3]> {
            match f.opt_f64_list(key)? {
                None => Ok(default),
                Some(l) if l.len() == 3 && (!positive || l.iter().all(|&x| x > 0.0)) => {
                    Ok([l[0] as f32, l[1] as f32, l[2] as f32])
                }
                Some(l) => {
                    Err(f.err(key, format!("expected 3 {}numbers, got {l:?}", if positive { "positive " } else { "" })))
                }
            }
        };
        let resample = f.opt_usize("resample")?.unwrap_or(3) as u32;
        if resample != 3 {
            return Err(f.err("resample", format!("{resample} is not supported (only 3, bicubic)")));
        }
        if f.opt_bool("do_convert_rgb")? == Some(false) {
            return Err(f.err("do_convert_rgb", "false is not supported (images are always converted to RGB)"));
        }
        Ok(LlavaPreprocessorConfig {
            shortest_edge,
            crop_size,
            image_grid_pinpoints,
            image_mean: triple("image_mean", d.image_mean, false)?,
            image_std: triple("image_std", d.image_std, true)?,
            rescale_factor: f.pos_f64("rescale_factor", d.rescale_factor)?,
            do_rescale: f.opt_bool("do_rescale")?.unwrap_or(true),
            do_normalize: f.opt_bool("do_normalize")?.unwrap_or(true),
            resample,
        })
    }

    /// Checks that these settings produce what `model` consumes: tiles of its image_size and
    /// the same pinpoints (the token count the processor writes must equal the model's).
    pub fn check_against(&self, model: &LlavaNextConfig) -> Result<()> {
        if self.shortest_edge != model.vision.image_size {
            bail!(
                "size.shortest_edge {} does not match the model's vision_config.image_size {}",
                self.shortest_edge,
                model.vision.image_size
            );
        }
        if self.image_grid_pinpoints != model.image_grid_pinpoints {
            bail!(
                "image_grid_pinpoints {:?} differ from the model config's {:?}",
                self.image_grid_pinpoints,
                model.image_grid_pinpoints
            );
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Weight names.

/// Other spellings of a canonical (llava-hf published) tensor name, most likely first after
/// the canonical one: transformers 5 saves the vision tower without `vision_model.`; in-memory
/// state dicts (v4.52+, v5) put everything under `model.` with `lm_head.weight` at the top;
/// a bare `LlavaNextModel` has `language_model.` directly over the decoder.
pub fn spellings(canonical: &str) -> Vec<String> {
    let c = canonical_name(canonical);
    let mut out = vec![c.clone()];
    if let Some(rest) = c.strip_prefix("vision_tower.vision_model.") {
        out.push(format!("vision_tower.{rest}"));
        out.push(format!("model.vision_tower.vision_model.{rest}"));
        out.push(format!("model.vision_tower.{rest}"));
    } else if let Some(rest) = c.strip_prefix("language_model.model.") {
        out.push(format!("model.language_model.{rest}"));
        out.push(format!("language_model.{rest}"));
    } else if c == "language_model.lm_head.weight" {
        out.push("lm_head.weight".to_string());
    } else if c.starts_with("multi_modal_projector.") || c == "image_newline" {
        out.push(format!("model.{c}"));
    }
    out
}

/// The canonical (llava-hf published) spelling of any accepted spelling of a tensor name.
/// Names outside the model are returned unchanged.
pub fn canonical_name(name: &str) -> String {
    let n = name.strip_prefix("model.").filter(|r| {
        r.starts_with("vision_tower.")
            || r.starts_with("language_model.")
            || r.starts_with("multi_modal_projector.")
            || *r == "image_newline"
    });
    let in_memory = n.is_some();
    let n = n.unwrap_or(name);
    if n == "lm_head.weight" {
        return "language_model.lm_head.weight".to_string();
    }
    if let Some(rest) = n.strip_prefix("vision_tower.") {
        let rest = rest.strip_prefix("vision_model.").unwrap_or(rest);
        return format!("vision_tower.vision_model.{rest}");
    }
    if let Some(rest) = n.strip_prefix("language_model.") {
        // `model.language_model.X` and bare `language_model.X` are the decoder itself.
        if in_memory || !(rest.starts_with("model.") || rest.starts_with("lm_head.")) {
            return format!("language_model.model.{rest}");
        }
        return n.to_string();
    }
    n.to_string()
}

/// The name under which `ckpt` stores `canonical` (any spelling may be passed). The error
/// names the tensor, the spellings tried and the checkpoint's files.
pub fn resolve(ckpt: &Checkpoint, canonical: &str) -> Result<String> {
    let cands = spellings(canonical);
    if let Some(found) = cands.iter().find(|c| ckpt.has(c)) {
        return Ok(found.clone());
    }
    // The checkpoint's own not-found message names its directory and files.
    let inner = ckpt.raw(&cands[0]).err().map(|e| e.to_string()).unwrap_or_default();
    bail!(
        "LLaVA-NeXT weight `{}` is missing: none of its spellings [{}] is present; {inner}",
        cands[0],
        cands.join(", ")
    )
}

/// Every tensor of a LLaVA-NeXT checkpoint for `cfg`, canonical name and shape, in model order
/// (vision tower, projector, image_newline, decoder, lm_head). `lm_head` is left out when the
/// embeddings are tied.
pub fn weight_shapes(cfg: &LlavaNextConfig) -> Vec<(String, Vec<usize>)> {
    let v = &cfg.vision;
    let t = &cfg.text;
    let (dv, iv) = (v.hidden_size, v.intermediate_size);
    let (d, i, hd) = (t.hidden_size, t.intermediate_size, t.head_dim);
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>| out.push((name, shape));
    let vp = "vision_tower.vision_model";
    add(format!("{vp}.embeddings.class_embedding"), vec![dv]);
    add(format!("{vp}.embeddings.patch_embedding.weight"), vec![dv, v.num_channels, v.patch_size, v.patch_size]);
    add(format!("{vp}.embeddings.position_embedding.weight"), vec![v.num_positions(), dv]);
    add(format!("{vp}.pre_layrnorm.weight"), vec![dv]);
    add(format!("{vp}.pre_layrnorm.bias"), vec![dv]);
    for l in 0..v.num_hidden_layers {
        let p = format!("{vp}.encoder.layers.{l}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            add(format!("{p}.self_attn.{proj}.weight"), vec![dv, dv]);
            add(format!("{p}.self_attn.{proj}.bias"), vec![dv]);
        }
        for ln in ["layer_norm1", "layer_norm2"] {
            add(format!("{p}.{ln}.weight"), vec![dv]);
            add(format!("{p}.{ln}.bias"), vec![dv]);
        }
        add(format!("{p}.mlp.fc1.weight"), vec![iv, dv]);
        add(format!("{p}.mlp.fc1.bias"), vec![iv]);
        add(format!("{p}.mlp.fc2.weight"), vec![dv, iv]);
        add(format!("{p}.mlp.fc2.bias"), vec![dv]);
    }
    add(format!("{vp}.post_layernorm.weight"), vec![dv]);
    add(format!("{vp}.post_layernorm.bias"), vec![dv]);
    add("multi_modal_projector.linear_1.weight".into(), vec![d, cfg.projector_in()]);
    if cfg.multimodal_projector_bias {
        add("multi_modal_projector.linear_1.bias".into(), vec![d]);
    }
    add("multi_modal_projector.linear_2.weight".into(), vec![d, d]);
    if cfg.multimodal_projector_bias {
        add("multi_modal_projector.linear_2.bias".into(), vec![d]);
    }
    add("image_newline".into(), vec![d]);
    let lp = "language_model.model";
    add(format!("{lp}.embed_tokens.weight"), vec![t.vocab_size, d]);
    for l in 0..t.num_hidden_layers {
        let p = format!("{lp}.layers.{l}");
        add(format!("{p}.self_attn.q_proj.weight"), vec![t.num_attention_heads * hd, d]);
        add(format!("{p}.self_attn.k_proj.weight"), vec![t.num_key_value_heads * hd, d]);
        add(format!("{p}.self_attn.v_proj.weight"), vec![t.num_key_value_heads * hd, d]);
        add(format!("{p}.self_attn.o_proj.weight"), vec![d, t.num_attention_heads * hd]);
        add(format!("{p}.mlp.gate_proj.weight"), vec![i, d]);
        add(format!("{p}.mlp.up_proj.weight"), vec![i, d]);
        add(format!("{p}.mlp.down_proj.weight"), vec![d, i]);
        add(format!("{p}.input_layernorm.weight"), vec![d]);
        add(format!("{p}.post_attention_layernorm.weight"), vec![d]);
    }
    add(format!("{lp}.norm.weight"), vec![d]);
    if !t.tie_word_embeddings {
        add("language_model.lm_head.weight".into(), vec![t.vocab_size, d]);
    }
    out
}

/// Resolves every tensor of [`weight_shapes`] in `ckpt` and checks its shape. Returns
/// (canonical, stored name) pairs in model order; the first missing or misshapen tensor is an
/// error naming it and its file.
pub fn check_weights(ckpt: &Checkpoint, cfg: &LlavaNextConfig) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for (canon, shape) in weight_shapes(cfg) {
        let stored = resolve(ckpt, &canon)?;
        ckpt.check_shape(&stored, &shape)?;
        out.push((canon, stored));
    }
    Ok(out)
}
