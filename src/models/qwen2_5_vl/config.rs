//! Qwen2.5-VL configuration: `config.json` in both layouts (the flat published one, with text
//! fields at the top level and `rope_scaling.mrope_section`, and the nested transformers-5 one,
//! with `text_config` and `rope_parameters`), validated field by field, and written back in the
//! flat published layout. Also `preprocessor_config.json` (`Qwen2VLImageProcessor`).
//! Field names, 7B values and class defaults: model-spec A1 and A3.
//!
//! The sizes the weights' shapes follow from are required (`hidden_size`, `intermediate_size`,
//! `num_hidden_layers`, `num_attention_heads`, `num_key_value_heads`, `vocab_size`, and the
//! vision `depth`, `hidden_size`, `intermediate_size`, `num_heads`, `out_hidden_size`, so
//! `vision_config` too): transformers' class defaults there are one model's values, and a
//! config that omits them is broken. Other omitted fields take the class defaults of
//! `Qwen2_5_VLTextConfig` / `Qwen2_5_VLVisionConfig` / `Qwen2VLImageProcessor`. Every size is
//! capped (`models::limits`).

use crate::checkpoint::write_atomic;
use crate::models::limits::{
    MAX_IMAGE_PATCHES, MAX_IMAGE_SIDE, MAX_INTERMEDIATE, MAX_LAYERS, MAX_MERGE, MAX_PATCH, MAX_POSITIONS, MAX_VOCAB,
    MAX_WIDTH,
};
use crate::models::{read_json, root_object, Fields};
use anyhow::{bail, Result};
use serde_json::{json, Value};
use std::path::Path;

/// The language model (`Qwen2_5_VLTextConfig`).
#[derive(Clone, Debug, PartialEq)]
pub struct TextConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// hidden_size / num_attention_heads.
    pub head_dim: usize,
    /// Embedding rows (padded past the tokenizer's size).
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Frequencies per axis (t, h, w); sums to head_dim / 2.
    pub mrope_section: Vec<usize>,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
}

/// The vision tower (`Qwen2_5_VLVisionConfig`).
#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    pub depth: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub spatial_merge_size: usize,
    pub temporal_patch_size: usize,
    /// In pixels (112 for 7B: 4×4 merged tokens per window).
    pub window_size: usize,
    /// Blocks that attend over the whole image instead of windows.
    pub fullatt_block_indexes: Vec<usize>,
    /// Merger output width = the text hidden size.
    pub out_hidden_size: usize,
    pub hidden_act: String,
    /// Videos only.
    pub tokens_per_second: usize,
}

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
    /// Values per patch row of pixel_values: channels · temporal · patch².
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Parameters of the tower: patch embedding, blocks (every bias on), merger.
    pub fn num_params(&self) -> u64 {
        let (d, i, o) = (self.hidden_size as u64, self.intermediate_size as u64, self.out_hidden_size as u64);
        let m = d * (self.spatial_merge_size * self.spatial_merge_size) as u64;
        let block = (3 * d * d + 3 * d) + (d * d + d) + 2 * (i * d + i) + (d * i + d) + 2 * d;
        d * self.patch_dim() as u64 + self.depth as u64 * block + d + (m * m + m) + (o * m + o)
    }
}

impl TextConfig {
    /// Parameters of the language model: embedding, layers (q/k/v biases), norm, untied lm_head.
    pub fn num_params(&self) -> u64 {
        let (d, i, v) = (self.hidden_size as u64, self.intermediate_size as u64, self.vocab_size as u64);
        let q = (self.num_attention_heads * self.head_dim) as u64;
        let kv = (self.num_key_value_heads * self.head_dim) as u64;
        let layer = (d * q + q) + 2 * (d * kv + kv) + q * d + 3 * d * i + 2 * d;
        v * d + self.num_hidden_layers as u64 * layer + d + if self.tie_word_embeddings { 0 } else { v * d }
    }
}

impl QwenVlConfig {
    /// Parameters of the whole model, from the config alone (what loading will allocate).
    pub fn num_params(&self) -> u64 {
        self.text.num_params() + self.vision.num_params()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct QwenVlConfig {
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
    /// Storage dtype recorded in the file ("bfloat16", "float32").
    pub torch_dtype: String,
    /// The parsed file itself, so a save keeps the fields this struct does not model.
    pub source: SourceJson,
}

const SUPPORTED_ACT: &str = "silu";

impl QwenVlConfig {
    /// Reads `dir/config.json`.
    pub fn load(dir: impl AsRef<Path>) -> Result<QwenVlConfig> {
        let path = dir.as_ref().join("config.json");
        let v = read_json(&path)?;
        Self::from_json(&v, &path)
    }

    /// Parses a config object; `file` is only used in messages.
    pub fn from_json(v: &Value, file: &Path) -> Result<QwenVlConfig> {
        let root = Fields::new(root_object(v, file)?, "", file);
        match root.opt_str("model_type")? {
            Some("qwen2_5_vl") => {}
            Some(other) => {
                return Err(root.err(
                    "model_type",
                    format!("expected \"qwen2_5_vl\", got {other:?} (not a Qwen2.5-VL checkpoint)"),
                ))
            }
            None => {
                let archs = root.get("architectures").map(|a| a.to_string()).unwrap_or_default();
                if !archs.contains("Qwen2_5_VLForConditionalGeneration") {
                    return Err(root.err(
                        "model_type",
                        "missing, and `architectures` does not name Qwen2_5_VLForConditionalGeneration",
                    ));
                }
            }
        }
        // Nested (transformers 5) when `text_config` is present; flat (published) otherwise.
        let nested = root.object("text_config")?;
        let t = match nested {
            Some(m) => Fields::new(m, "text_config", file),
            None => root,
        };
        let text = parse_text(root, t)?;
        let Some(vobj) = root.object("vision_config")? else {
            return Err(root.err("vision_config", "missing (required: the vision tower's sizes)"));
        };
        let vf = Fields::new(vobj, "vision_config", file);
        let vision = parse_vision(vf)?;

        // Token ids sit at the top level; v5 files may also keep bos/eos in text_config.
        let tok = |key: &str, default: u32| -> Result<u32> {
            Ok(match root.opt_token_id(key)? {
                Some(id) => id,
                None => t.opt_token_id(key)?.unwrap_or(default),
            })
        };
        let cfg = QwenVlConfig {
            image_token_id: tok("image_token_id", 151655)?,
            video_token_id: tok("video_token_id", 151656)?,
            vision_start_token_id: tok("vision_start_token_id", 151652)?,
            vision_end_token_id: tok("vision_end_token_id", 151653)?,
            bos_token_id: tok("bos_token_id", 151643)?,
            eos_token_id: tok("eos_token_id", 151645)?,
            torch_dtype: match root.opt_str("torch_dtype")? {
                Some(s) => s.to_string(),
                None => root.opt_str("dtype")?.or(t.opt_str("dtype")?).unwrap_or("bfloat16").to_string(),
            },
            text,
            vision,
            source: SourceJson::of(v),
        };
        if cfg.vision.out_hidden_size != cfg.text.hidden_size {
            return Err(vf.err(
                "out_hidden_size",
                format!("{} must equal the text hidden_size {}", cfg.vision.out_hidden_size, cfg.text.hidden_size),
            ));
        }
        for (key, id) in [
            ("image_token_id", cfg.image_token_id),
            ("video_token_id", cfg.video_token_id),
            ("vision_start_token_id", cfg.vision_start_token_id),
            ("vision_end_token_id", cfg.vision_end_token_id),
        ] {
            if id as usize >= cfg.text.vocab_size {
                return Err(root.err(key, format!("{id} is outside the vocabulary of {}", cfg.text.vocab_size)));
            }
        }
        Ok(cfg)
    }

    /// The config in the flat published layout (`Qwen/Qwen2.5-VL-7B-Instruct`'s config.json),
    /// which both transformers 4.5x and 5 load.
    pub fn to_json(&self) -> Value {
        let t = &self.text;
        let v = &self.vision;
        let vision = json!({
            "model_type": "qwen2_5_vl",
            "depth": v.depth,
            "hidden_act": v.hidden_act,
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads,
            "in_chans": v.in_channels,
            "in_channels": v.in_channels,
            "out_hidden_size": v.out_hidden_size,
            "patch_size": v.patch_size,
            "spatial_patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size,
            "tokens_per_second": v.tokens_per_second,
            "window_size": v.window_size,
            "fullatt_block_indexes": v.fullatt_block_indexes,
        });
        json!({
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "hidden_act": t.hidden_act,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "max_position_embeddings": t.max_position_embeddings,
            "max_window_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_hidden_layers": t.num_hidden_layers,
            "num_key_value_heads": t.num_key_value_heads,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": t.mrope_section},
            "sliding_window": t.max_position_embeddings,
            "use_sliding_window": false,
            "tie_word_embeddings": t.tie_word_embeddings,
            "torch_dtype": self.torch_dtype,
            "use_cache": true,
            "vocab_size": t.vocab_size,
            "vision_config": vision,
        })
    }

    /// What `save` writes: the source file with only the fields this project changed rewritten
    /// (its layout, `transformers_version` and unmodelled fields kept), `dtype` (or the
    /// recorded one) as the storage dtype; `to_json` when there is no source.
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

/// A config's source JSON. Configs compare by what they model, so any two are equal here.
#[derive(Clone, Default)]
pub struct SourceJson(pub Option<std::sync::Arc<Value>>);

impl std::fmt::Debug for SourceJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.get().and_then(|v| v.as_object()).map_or(0, |m| m.len());
        write!(f, "SourceJson({n} fields)")
    }
}

impl PartialEq for SourceJson {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl SourceJson {
    pub fn of(v: &Value) -> SourceJson {
        SourceJson(Some(std::sync::Arc::new(v.clone())))
    }
    pub fn get(&self) -> Option<&Value> {
        self.0.as_deref()
    }
}

/// The config.json to save: `source` with every field where `ours` (the struct now) differs
/// from `reparsed` (the struct as parsed) written into it, or all of `ours` when the source no
/// longer parses; then the storage dtype. The root `_name_or_path` goes: the weights are ours.
pub fn saved_json(source: Option<&Value>, reparsed: Option<&Value>, ours: &Value, dtype: &str) -> Value {
    let mut out = match source {
        Some(s @ Value::Object(_)) => s.clone(),
        _ => ours.clone(),
    };
    if source.is_some() {
        overlay(&mut out, reparsed, ours);
    }
    if let Value::Object(m) = &mut out {
        m.remove("_name_or_path");
    }
    set_dtype(&mut out, dtype);
    out
}

/// Writes the fields of `ours` that differ from `base` into `out` (recursing into objects) and
/// drops those `ours` no longer has; a root field that `out` keeps in `text_config` (the nested
/// layout) is written there.
fn overlay(out: &mut Value, base: Option<&Value>, ours: &Value) {
    let (Value::Object(o), Value::Object(w)) = (out, ours) else { return };
    if let Some(Value::Object(b)) = base {
        for k in b.keys().filter(|k| !w.contains_key(*k)) {
            o.remove(k);
        }
    }
    for (k, v) in w {
        let b = base.and_then(|b| b.get(k));
        if b == Some(v) {
            continue;
        }
        if let (Value::Object(_), Some(Value::Object(_))) = (v, o.get(k)) {
            overlay(o.get_mut(k).unwrap(), b, v);
            continue;
        }
        let nested = o.get_mut("text_config").and_then(|t| t.as_object_mut()).filter(|t| t.contains_key(k));
        match nested {
            Some(t) => {
                t.insert(k.clone(), v.clone());
                if o.contains_key(k) {
                    o.insert(k.clone(), v.clone());
                }
            }
            None => {
                o.insert(k.clone(), v.clone());
            }
        }
    }
}

/// Sets every `torch_dtype`/`dtype` key of the root and its sub-configs to `dtype`, and the
/// root's `torch_dtype` when the root has neither.
fn set_dtype(out: &mut Value, dtype: &str) {
    let Value::Object(root) = out else { return };
    for sub in ["text_config", "vision_config"] {
        if let Some(Value::Object(m)) = root.get_mut(sub) {
            for k in ["torch_dtype", "dtype"] {
                if m.contains_key(k) {
                    m.insert(k.into(), json!(dtype));
                }
            }
        }
    }
    let mut any = false;
    for k in ["torch_dtype", "dtype"] {
        if root.contains_key(k) {
            root.insert(k.into(), json!(dtype));
            any = true;
        }
    }
    if !any {
        root.insert("torch_dtype".into(), json!(dtype));
    }
}

/// Text fields from `t` (the root in the flat layout, `text_config` in the nested one).
fn parse_text(root: Fields, t: Fields) -> Result<TextConfig> {
    let hidden_size = t.size("hidden_size", MAX_WIDTH)?;
    let num_attention_heads = t.size("num_attention_heads", MAX_WIDTH)?;
    let num_key_value_heads = t.size("num_key_value_heads", MAX_WIDTH)?;
    if hidden_size % num_attention_heads != 0 {
        return Err(
            t.err("num_attention_heads", format!("{num_attention_heads} does not divide hidden_size {hidden_size}"))
        );
    }
    if num_attention_heads % num_key_value_heads != 0 {
        return Err(t.err(
            "num_key_value_heads",
            format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"),
        ));
    }
    let head_dim = hidden_size / num_attention_heads;
    if head_dim % 2 != 0 {
        return Err(t.err("num_attention_heads", format!("head dim {head_dim} must be even for RoPE")));
    }
    // The Qwen2.5-VL attention always uses hidden/heads; a differing head_dim is not this model.
    if let Some(hd) = t.opt_usize("head_dim")? {
        if hd != head_dim {
            return Err(t.err("head_dim", format!("{hd} differs from hidden_size/num_attention_heads = {head_dim}")));
        }
    }
    if t.opt_bool("use_sliding_window")? == Some(true) {
        return Err(t.err("use_sliding_window", "sliding-window attention is not supported"));
    }
    let hidden_act = t.opt_str("hidden_act")?.unwrap_or("silu").to_string();
    if hidden_act != SUPPORTED_ACT {
        return Err(t.err("hidden_act", format!("{hidden_act:?} is not supported (Qwen2.5-VL uses \"silu\")")));
    }

    // RoPE: `rope_parameters` (v5) or `rope_scaling` (published); theta inside either, or at the
    // level of the text fields.
    let rope_obj = match t.object("rope_parameters")? {
        Some(m) => Some(Fields::new(
            m,
            if t.prefix.is_empty() { "rope_parameters" } else { "text_config.rope_parameters" },
            t.file,
        )),
        None => t.object("rope_scaling")?.map(|m| {
            Fields::new(m, if t.prefix.is_empty() { "rope_scaling" } else { "text_config.rope_scaling" }, t.file)
        }),
    };
    let mut rope_theta = t.opt_f64("rope_theta")?;
    let mut mrope_section = None;
    if let Some(r) = rope_obj {
        let key = if r.has("rope_type") { "rope_type" } else { "type" };
        match r.opt_str(key)? {
            None | Some("mrope") | Some("default") => {}
            Some(other) => {
                return Err(
                    r.err(key, format!("rope type {other:?} is not supported (expected \"mrope\" or \"default\")"))
                )
            }
        }
        if let Some(th) = r.opt_f64("rope_theta")? {
            rope_theta = Some(th);
        }
        mrope_section = r.opt_usize_list("mrope_section")?;
    }
    let rope_theta = rope_theta.unwrap_or(1e6);
    if rope_theta <= 0.0 {
        return Err(t.err("rope_theta", format!("must be positive, got {rope_theta}")));
    }
    let mrope_section = mrope_section.unwrap_or_else(|| vec![16, 24, 24]);
    if mrope_section.len() != 3 || mrope_section.iter().sum::<usize>() != head_dim / 2 {
        let r = rope_obj.unwrap_or(t);
        return Err(r.err(
            "mrope_section",
            format!("{mrope_section:?} must have 3 entries summing to head_dim/2 = {}", head_dim / 2),
        ));
    }

    // tie_word_embeddings: top level (both layouts) or text_config; they must agree if both say.
    let tie_root = root.opt_bool("tie_word_embeddings")?;
    let tie_text = if t.prefix.is_empty() { None } else { t.opt_bool("tie_word_embeddings")? };
    let tie_word_embeddings = match (tie_root, tie_text) {
        (Some(a), Some(b)) if a != b => {
            return Err(
                root.err("tie_word_embeddings", format!("{a} conflicts with text_config.tie_word_embeddings = {b}"))
            )
        }
        (Some(a), _) | (None, Some(a)) => a,
        (None, None) => false,
    };

    Ok(TextConfig {
        hidden_size,
        intermediate_size: t.size("intermediate_size", MAX_INTERMEDIATE)?,
        num_hidden_layers: t.size("num_hidden_layers", MAX_LAYERS)?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        vocab_size: t.size("vocab_size", MAX_VOCAB)?,
        rms_norm_eps: t.pos_f64("rms_norm_eps", 1e-5)?,
        rope_theta,
        mrope_section,
        tie_word_embeddings,
        max_position_embeddings: t.size_or("max_position_embeddings", 32768, MAX_POSITIONS)?,
        hidden_act,
    })
}

fn parse_vision(v: Fields) -> Result<VisionConfig> {
    match v.opt_str("model_type")? {
        None | Some("qwen2_5_vl") | Some("qwen2_5_vl_vision") => {}
        Some(other) => return Err(v.err("model_type", format!("expected \"qwen2_5_vl_vision\", got {other:?}"))),
    }
    let depth = v.size("depth", MAX_LAYERS)?;
    let hidden_size = v.size("hidden_size", MAX_WIDTH)?;
    let num_heads = v.size("num_heads", MAX_WIDTH)?;
    if hidden_size % num_heads != 0 || (hidden_size / num_heads) % 4 != 0 {
        return Err(v.err(
            "num_heads",
            format!("{num_heads} must divide hidden_size {hidden_size} into heads of a multiple of 4 (2-D RoPE)"),
        ));
    }
    let in_channels = match v.opt_usize("in_channels")? {
        Some(c) => c,
        None => v.opt_usize("in_chans")?.unwrap_or(3),
    };
    if in_channels != 3 {
        return Err(v.err("in_channels", format!("{in_channels}: only RGB (3) images are supported")));
    }
    let patch_size = v.size_or("patch_size", 14, MAX_PATCH)?;
    let spatial_merge_size = v.size_or("spatial_merge_size", 2, MAX_MERGE)?;
    let window_size = v.size_or("window_size", 112, MAX_IMAGE_SIDE)?;
    if window_size % (patch_size * spatial_merge_size) != 0 {
        return Err(v.err(
            "window_size",
            format!(
                "{window_size} is not a multiple of patch_size·spatial_merge_size = {}",
                patch_size * spatial_merge_size
            ),
        ));
    }
    let fullatt_block_indexes = v.opt_usize_list("fullatt_block_indexes")?.unwrap_or_else(|| vec![7, 15, 23, 31]);
    if let Some(&bad) = fullatt_block_indexes.iter().find(|&&i| i >= depth) {
        return Err(v.err("fullatt_block_indexes", format!("block {bad} is past depth {depth}")));
    }
    let hidden_act = v.opt_str("hidden_act")?.unwrap_or("silu").to_string();
    if hidden_act != SUPPORTED_ACT {
        return Err(v.err("hidden_act", format!("{hidden_act:?} is not supported (Qwen2.5-VL uses \"silu\")")));
    }
    Ok(VisionConfig {
        depth,
        hidden_size,
        intermediate_size: v.size("intermediate_size", MAX_INTERMEDIATE)?,
        num_heads,
        in_channels,
        patch_size,
        spatial_merge_size,
        temporal_patch_size: v.size_or("temporal_patch_size", 2, MAX_MERGE)?,
        window_size,
        fullatt_block_indexes,
        out_hidden_size: v.size("out_hidden_size", MAX_WIDTH)?,
        hidden_act,
        tokens_per_second: v.pos_usize("tokens_per_second", 4)?,
    })
}

/// `preprocessor_config.json` of `Qwen2VLImageProcessor`.
#[derive(Clone, Debug, PartialEq)]
pub struct QwenPreprocessorConfig {
    pub min_pixels: usize,
    pub max_pixels: usize,
    pub patch_size: usize,
    pub merge_size: usize,
    pub temporal_patch_size: usize,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub rescale_factor: f64,
    pub do_resize: bool,
    pub do_rescale: bool,
    pub do_normalize: bool,
}

/// OpenAI CLIP normalization.
pub const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
#[allow(clippy::excessive_precision)] // the published values, digit for digit
pub const CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

impl Default for QwenPreprocessorConfig {
    /// The published 7B settings (min 56·56, max 28·28·16384 pixels).
    fn default() -> Self {
        QwenPreprocessorConfig {
            min_pixels: 3136,
            max_pixels: 12845056,
            patch_size: 14,
            merge_size: 2,
            temporal_patch_size: 2,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
            rescale_factor: 1.0 / 255.0,
            do_resize: true,
            do_rescale: true,
            do_normalize: true,
        }
    }
}

impl QwenPreprocessorConfig {
    /// Side multiple of resized images: patch · merge (28).
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// Reads `dir/preprocessor_config.json`; the 7B defaults when the file is absent.
    pub fn load(dir: impl AsRef<Path>) -> Result<QwenPreprocessorConfig> {
        let path = dir.as_ref().join("preprocessor_config.json");
        if !path.exists() {
            return Ok(Self::default());
        }
        let v = read_json(&path)?;
        Self::from_json(&v, &path)
    }

    pub fn from_json(v: &Value, file: &Path) -> Result<QwenPreprocessorConfig> {
        let f = Fields::new(root_object(v, file)?, "", file);
        if let Some(kind) = f.opt_str("image_processor_type")? {
            if !kind.starts_with("Qwen2VLImageProcessor") {
                return Err(f.err("image_processor_type", format!("expected Qwen2VLImageProcessor, got {kind:?}")));
            }
        }
        let d = Self::default();
        // `min_pixels`/`max_pixels` win over `size` (transformers does the same); v5 files carry
        // only `size: {shortest_edge: min_pixels, longest_edge: max_pixels}`.
        let size = f.object("size")?.map(|m| Fields::new(m, "size", file));
        let pick = |key: &str, size_key: &str, default: usize| -> Result<usize> {
            if let Some(n) = f.opt_usize(key)? {
                return Ok(n);
            }
            if let Some(s) = size {
                if let Some(n) = s.opt_usize(size_key)? {
                    return Ok(n);
                }
            }
            Ok(default)
        };
        let min_pixels = pick("min_pixels", "shortest_edge", d.min_pixels)?;
        let max_pixels = pick("max_pixels", "longest_edge", d.max_pixels)?;
        if min_pixels == 0 || max_pixels < min_pixels {
            return Err(f.err("max_pixels", format!("pixel limits [{min_pixels}, {max_pixels}] are not a valid range")));
        }
        let patch_size = f.size_or("patch_size", d.patch_size, MAX_PATCH)?;
        // An image is resized to at most max_pixels, so this bounds its patches (and memory).
        let pixel_limit = MAX_IMAGE_PATCHES * patch_size * patch_size;
        if max_pixels > pixel_limit {
            let key = if f.has("max_pixels") || size.is_none() { "max_pixels" } else { "size.longest_edge" };
            return Err(f.err(
                key,
                format!("{max_pixels} is above the limit of {pixel_limit} ({MAX_IMAGE_PATCHES} patches of {patch_size}×{patch_size} pixels per image)"),
            ));
        }
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
        let cfg = QwenPreprocessorConfig {
            min_pixels,
            max_pixels,
            patch_size,
            merge_size: f.size_or("merge_size", d.merge_size, MAX_MERGE)?,
            temporal_patch_size: f.size_or("temporal_patch_size", d.temporal_patch_size, MAX_MERGE)?,
            image_mean: triple("image_mean", d.image_mean, false)?,
            image_std: triple("image_std", d.image_std, true)?,
            rescale_factor: f.pos_f64("rescale_factor", d.rescale_factor)?,
            do_resize: f.opt_bool("do_resize")?.unwrap_or(true),
            do_rescale: f.opt_bool("do_rescale")?.unwrap_or(true),
            do_normalize: f.opt_bool("do_normalize")?.unwrap_or(true),
        };
        Ok(cfg)
    }

    /// Checks that these settings fit the model's vision tower.
    pub fn check_against(&self, v: &VisionConfig) -> Result<()> {
        if self.patch_size != v.patch_size
            || self.merge_size != v.spatial_merge_size
            || self.temporal_patch_size != v.temporal_patch_size
        {
            bail!(
                "preprocessor patch/merge/temporal sizes {}/{}/{} do not match the vision config's {}/{}/{}",
                self.patch_size,
                self.merge_size,
                self.temporal_patch_size,
                v.patch_size,
                v.spatial_merge_size,
                v.temporal_patch_size
            );
        }
        Ok(())
    }
}
