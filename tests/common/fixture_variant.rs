//! Test-only fixture variants: a copy of a transformers fixture directory in another of the
//! layouts transformers writes, made here from the original so that the model tests exercise
//! those layouts without new reference files. Only names and layout change, never a number:
//!
//! - weights: every tensor's bytes are copied as they are, under the name the target key
//!   layout gives it, in one `model.safetensors` or in shards with `model.safetensors.index.json`;
//! - `grads.safetensors` (keyed by checkpoint name): renamed exactly like the weights;
//! - `config.json`: rewritten to another layout that means the same model (Qwen2.5-VL: flat ⇄
//!   nested `text_config`/`rope_parameters`; LLaVA-NeXT: the decoder's `model_type` Mistral ⇄
//!   Llama, the math of both being the same pre-norm RoPE/SwiGLU decoder without biases);
//! - every other file (inputs, references, images, processor settings) is copied unchanged.
//!
//! The key layouts are written out here, independent of the loader's own spelling tables:
//! - LLaVA-NeXT: llava-hf published (`vision_tower.vision_model.*`, `multi_modal_projector.*`,
//!   `image_newline`, `language_model.model.*`, `language_model.lm_head.weight`); the same with
//!   the vision tower as `vision_tower.*` (no `vision_model.`); and the transformers ≥ 4.52
//!   module layout (`model.vision_tower.vision_model.*`, `model.multi_modal_projector.*`,
//!   `model.image_newline`, `model.language_model.*`, `lm_head.weight`).
//! - Qwen2.5-VL: published (`visual.*`, `model.*`, `lm_head.weight`) and the transformers ≥ 4.52
//!   module layout (`model.visual.*`, `model.language_model.*`, `lm_head.weight`).
#![allow(dead_code)]

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

/// One variant written to disk.
pub struct Variant {
    /// Short name (also the directory name under the variants' root).
    pub name: String,
    /// The fixture directory of the variant (config.json, weights, references).
    pub dir: PathBuf,
    /// Source checkpoint name → the variant's name, for every weight.
    pub renamed: BTreeMap<String, String>,
    /// What differs from the source, for the test log.
    pub what: String,
}

// ---------------------------------------------------------------------------------------------
// Key layouts.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LlavaKeys {
    /// llava-hf published: `vision_tower.vision_model.*`, `language_model.model.*`, ...
    Published,
    /// The vision tower without `vision_model.` (`vision_tower.*`), the rest as published.
    VisionTowerFlat,
    /// transformers ≥ 4.52 modules: `model.vision_tower.vision_model.*`, `model.language_model.*`,
    /// `model.multi_modal_projector.*`, `model.image_newline`, `lm_head.weight`.
    Modules,
}

impl LlavaKeys {
    /// The layout of a checkpoint's tensor names.
    pub fn of<'a>(names: impl IntoIterator<Item = &'a String>) -> LlavaKeys {
        let names: Vec<&String> = names.into_iter().collect();
        if names.iter().any(|n| n.starts_with("model.")) {
            LlavaKeys::Modules
        } else if names.iter().any(|n| n.starts_with("vision_tower.") && !n.starts_with("vision_tower.vision_model.")) {
            LlavaKeys::VisionTowerFlat
        } else {
            LlavaKeys::Published
        }
    }

    /// The published spelling of a name in any of these layouts (also mixed ones, e.g.
    /// `model.vision_tower.*` without `vision_model.`).
    pub fn canonical(self, name: &str) -> String {
        let inner = name.strip_prefix("model.").filter(|r| {
            r.starts_with("vision_tower.")
                || r.starts_with("language_model.")
                || r.starts_with("multi_modal_projector.")
                || *r == "image_newline"
        });
        let n = inner.unwrap_or(name);
        if n == "lm_head.weight" {
            return "language_model.lm_head.weight".to_string();
        }
        if let Some(rest) = n.strip_prefix("vision_tower.") {
            return format!("vision_tower.vision_model.{}", rest.strip_prefix("vision_model.").unwrap_or(rest));
        }
        match (inner.is_some(), n.strip_prefix("language_model.")) {
            // `model.language_model.X` is the decoder's X.
            (true, Some(rest)) => format!("language_model.model.{rest}"),
            _ => n.to_string(),
        }
    }

    /// The name of the published `canonical` in this layout.
    pub fn spell(self, canonical: &str) -> String {
        match self {
            LlavaKeys::Published => canonical.to_string(),
            LlavaKeys::VisionTowerFlat => match canonical.strip_prefix("vision_tower.vision_model.") {
                Some(rest) => format!("vision_tower.{rest}"),
                None => canonical.to_string(),
            },
            LlavaKeys::Modules => {
                if canonical == "language_model.lm_head.weight" {
                    "lm_head.weight".to_string()
                } else if let Some(rest) = canonical.strip_prefix("language_model.model.") {
                    format!("model.language_model.{rest}")
                } else {
                    format!("model.{canonical}")
                }
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QwenKeys {
    /// Published: `visual.*`, `model.*` (the decoder), `lm_head.weight`.
    Published,
    /// transformers ≥ 4.52 modules: `model.visual.*`, `model.language_model.*`, `lm_head.weight`.
    Modules,
}

impl QwenKeys {
    pub fn of<'a>(names: impl IntoIterator<Item = &'a String>) -> QwenKeys {
        let mut names = names.into_iter();
        if names.any(|n| n.starts_with("model.language_model.") || n.starts_with("model.visual.")) {
            QwenKeys::Modules
        } else {
            QwenKeys::Published
        }
    }

    pub fn canonical(self, name: &str) -> String {
        match self {
            QwenKeys::Published => name.to_string(),
            QwenKeys::Modules => {
                if let Some(rest) = name.strip_prefix("model.language_model.") {
                    format!("model.{rest}")
                } else if let Some(rest) = name.strip_prefix("model.visual.") {
                    format!("visual.{rest}")
                } else {
                    name.to_string()
                }
            }
        }
    }

    pub fn spell(self, canonical: &str) -> String {
        match self {
            QwenKeys::Published => canonical.to_string(),
            QwenKeys::Modules => {
                if let Some(rest) = canonical.strip_prefix("model.") {
                    format!("model.language_model.{rest}")
                } else if let Some(rest) = canonical.strip_prefix("visual.") {
                    format!("model.visual.{rest}")
                } else {
                    canonical.to_string()
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// safetensors files, byte for byte.

/// A tensor as stored: name, dtype, shape, raw little-endian bytes.
pub struct RawTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Every tensor of a safetensors file and the file's `__metadata__`.
pub fn read_raw(path: &Path) -> (Vec<RawTensor>, Option<HashMap<String, String>>) {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let meta = SafeTensors::read_metadata(&bytes).unwrap().1.metadata().clone();
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(name, v)| RawTensor { name, dtype: v.dtype(), shape: v.shape().to_vec(), data: v.data().to_vec() })
        .collect();
    (tensors, meta)
}

/// Writes tensors (renamed by the caller) as one safetensors file.
pub fn write_raw(path: &Path, tensors: &[RawTensor], meta: Option<HashMap<String, String>>) {
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|t| (t.name.clone(), TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap())).collect();
    let bytes = safetensors::serialize(views, meta).unwrap_or_else(|e| panic!("serializing {}: {e}", path.display()));
    fs::write(path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// The weight files of a checkpoint directory: `model.safetensors`, or the shards its index lists.
pub fn weight_files(dir: &Path) -> Vec<PathBuf> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return vec![single];
    }
    let index = dir.join("model.safetensors.index.json");
    let v: Value =
        serde_json::from_str(&fs::read_to_string(&index).unwrap_or_else(|e| panic!("{}: {e}", index.display())))
            .unwrap();
    let mut files: Vec<PathBuf> =
        v["weight_map"].as_object().unwrap().values().map(|f| dir.join(f.as_str().unwrap())).collect();
    files.sort();
    files.dedup();
    files
}

fn is_weight_file(name: &str) -> bool {
    name == "model.safetensors"
        || name == "model.safetensors.index.json"
        || (name.starts_with("model-") && name.ends_with(".safetensors"))
}

/// Writes `tensors` into `dir` as `model.safetensors` (shards = 1) or as `shards` files
/// `model-0000K-of-0000N.safetensors` with `model.safetensors.index.json`, as transformers
/// writes a checkpoint larger than its shard size.
pub fn write_weights(dir: &Path, mut tensors: Vec<RawTensor>, meta: Option<HashMap<String, String>>, shards: usize) {
    if shards <= 1 {
        return write_raw(&dir.join("model.safetensors"), &tensors, meta);
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let total: usize = tensors.iter().map(|t| t.data.len()).sum();
    let per = total.div_ceil(shards);
    let mut groups: Vec<Vec<RawTensor>> = (0..shards).map(|_| Vec::new()).collect();
    let (mut k, mut filled) = (0, 0);
    for t in tensors {
        if filled >= per && k + 1 < shards {
            (k, filled) = (k + 1, 0);
        }
        filled += t.data.len();
        groups[k].push(t);
    }
    let mut weight_map = Map::new();
    for (k, g) in groups.iter().enumerate() {
        assert!(!g.is_empty(), "shard {k} of {shards} would be empty");
        let file = format!("model-{:05}-of-{shards:05}.safetensors", k + 1);
        for t in g {
            weight_map.insert(t.name.clone(), json!(file));
        }
        write_raw(&dir.join(&file), g, meta.clone());
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    fs::write(dir.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index).unwrap()).unwrap();
}

/// Writes the variant of the fixture `src` into `dst`: weights and `grads.safetensors` renamed
/// by `rename` (source checkpoint name → variant name), `config` as config.json, every other
/// file copied. Every gradient must be keyed by a weight's name.
pub fn write_variant(
    src: &Path, dst: &Path, rename: &dyn Fn(&str) -> String, config: &Value, shards: usize,
) -> BTreeMap<String, String> {
    let _ = fs::remove_dir_all(dst);
    fs::create_dir_all(dst).unwrap();
    let (mut weights, mut meta) = (Vec::new(), None);
    for f in weight_files(src) {
        let (t, m) = read_raw(&f);
        weights.extend(t);
        meta = meta.or(m);
    }
    let mut renamed = BTreeMap::new();
    for t in weights.iter_mut() {
        let new = rename(&t.name);
        assert!(renamed.insert(t.name.clone(), new.clone()).is_none(), "`{}` is stored twice", t.name);
        t.name = new;
    }
    let distinct: std::collections::BTreeSet<&String> = renamed.values().collect();
    assert_eq!(distinct.len(), renamed.len(), "two weights got the same variant name");
    write_weights(dst, weights, meta, shards);

    let (mut grads, gmeta) = read_raw(&src.join("grads.safetensors"));
    for g in grads.iter_mut() {
        let new = renamed
            .get(&g.name)
            .unwrap_or_else(|| panic!("{}: gradient `{}` is not a weight's name", src.display(), g.name));
        g.name = new.clone();
    }
    write_raw(&dst.join("grads.safetensors"), &grads, gmeta);

    fs::write(dst.join("config.json"), serde_json::to_string_pretty(config).unwrap()).unwrap();
    for e in fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().to_string();
        if e.path().is_file() && !is_weight_file(&name) && name != "grads.safetensors" && name != "config.json" {
            fs::copy(e.path(), dst.join(&name)).unwrap();
        }
    }
    renamed
}

/// The tensor names of a checkpoint directory.
pub fn weight_names(dir: &Path) -> Vec<String> {
    weight_files(dir).iter().flat_map(|f| read_raw(f).0.into_iter().map(|t| t.name)).collect()
}

fn read_config(dir: &Path) -> Value {
    let p = dir.join("config.json");
    serde_json::from_str(&fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Config rewrites.

/// Top-level keys of a nested (transformers 5) Qwen2.5-VL config.json; every other key of the
/// flat layout belongs to the language model and moves into `text_config`.
const QWEN_TOP_LEVEL: &[&str] = &[
    "architectures",
    "model_type",
    "transformers_version",
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
    "vision_config",
    "tie_word_embeddings",
    "dtype",
    "torch_dtype",
];

/// A Qwen2.5-VL config.json in the other layout: flat (published: text fields at the top,
/// `rope_scaling: {type: mrope, mrope_section}` and `rope_theta`) ⇄ nested (transformers 5:
/// `text_config` with `model_type: qwen2_5_vl_text` and `rope_parameters: {rope_type, mrope_section,
/// rope_theta}`, `dtype` instead of `torch_dtype`). Returns the new config and its layout's name.
pub fn qwen_other_config(v: &Value) -> (Value, &'static str) {
    let root = v.as_object().expect("config.json is an object");
    if let Some(text) = root.get("text_config").and_then(Value::as_object) {
        // nested → flat
        let mut out = Map::new();
        for (k, x) in root {
            match k.as_str() {
                "text_config" => {}
                "dtype" => {
                    out.insert("torch_dtype".into(), x.clone());
                }
                _ => {
                    out.insert(k.clone(), x.clone());
                }
            }
        }
        for (k, x) in text {
            match k.as_str() {
                "model_type" => {}
                "dtype" | "torch_dtype" => {
                    out.entry("torch_dtype").or_insert(x.clone());
                }
                "rope_parameters" | "rope_scaling" => {
                    if let Some(th) = x.get("rope_theta") {
                        out.insert("rope_theta".into(), th.clone());
                    }
                    if let Some(ms) = x.get("mrope_section") {
                        out.insert("rope_scaling".into(), json!({"type": "mrope", "mrope_section": ms}));
                    }
                }
                _ => {
                    out.entry(k.clone()).or_insert(x.clone());
                }
            }
        }
        (Value::Object(out), "flat (published)")
    } else {
        // flat → nested
        let (mut out, mut text) = (Map::new(), Map::new());
        text.insert("model_type".into(), json!("qwen2_5_vl_text"));
        let mut rope = Map::new();
        rope.insert("rope_type".into(), json!("default"));
        for (k, x) in root {
            match k.as_str() {
                "torch_dtype" => {
                    out.insert("dtype".into(), x.clone());
                    text.insert("dtype".into(), x.clone());
                }
                "rope_theta" => {
                    rope.insert("rope_theta".into(), x.clone());
                }
                "rope_scaling" => {
                    if let Some(ms) = x.get("mrope_section") {
                        rope.insert("mrope_section".into(), ms.clone());
                    }
                }
                _ if QWEN_TOP_LEVEL.contains(&k.as_str()) => {
                    out.insert(k.clone(), x.clone());
                }
                _ => {
                    text.insert(k.clone(), x.clone());
                }
            }
        }
        text.insert("rope_parameters".into(), Value::Object(rope));
        out.insert("text_config".into(), Value::Object(text));
        (Value::Object(out), "nested text_config/vision_config (transformers 5)")
    }
}

/// A LLaVA-NeXT config.json whose decoder is declared as the other family, Mistral ⇄ Llama,
/// with every size the two classes default differently written out (`num_key_value_heads`,
/// `head_dim`, `intermediate_size`, `max_position_embeddings`), Llama's RoPE as v5's
/// `rope_parameters` and no sliding window. Returns None where the text model uses anything
/// only one family has (RoPE scaling, biases).
pub fn llava_other_family(v: &Value, sizes: [usize; 4]) -> Option<(Value, &'static str)> {
    let mut out = v.clone();
    let t = out.get_mut("text_config")?.as_object_mut()?;
    let family = t.get("model_type").and_then(Value::as_str).unwrap_or("llama").to_string();
    for key in ["rope_scaling", "rope_parameters"] {
        if let Some(r) = t.get(key).filter(|r| !r.is_null()) {
            let kind = r.get("rope_type").or(r.get("type")).and_then(Value::as_str).unwrap_or("default");
            if kind != "default" {
                return None;
            }
        }
    }
    if ["attention_bias", "mlp_bias"].iter().any(|k| t.get(*k) == Some(&json!(true))) {
        return None;
    }
    let [kv, hd, inter, maxpos] = sizes;
    t.insert("num_key_value_heads".into(), json!(kv));
    t.insert("head_dim".into(), json!(hd));
    t.insert("intermediate_size".into(), json!(inter));
    t.insert("max_position_embeddings".into(), json!(maxpos));
    let arch = |t: &mut Map<String, Value>, a: &str| {
        if t.contains_key("architectures") {
            t.insert("architectures".into(), json!([a]));
        }
    };
    let name = match family.as_str() {
        "mistral" => {
            t.insert("model_type".into(), json!("llama"));
            t.remove("sliding_window");
            t.insert("attention_bias".into(), json!(false));
            t.insert("mlp_bias".into(), json!(false));
            let theta =
                t.remove("rope_theta").or_else(|| t.get("rope_parameters").and_then(|r| r.get("rope_theta")).cloned());
            let mut rope = json!({"rope_type": "default"});
            if let Some(th) = theta {
                rope["rope_theta"] = th;
            }
            t.insert("rope_parameters".into(), rope);
            t.remove("rope_scaling");
            arch(t, "LlamaForCausalLM");
            "text model declared as Llama (was Mistral)"
        }
        "llama" => {
            t.insert("model_type".into(), json!("mistral"));
            t.insert("sliding_window".into(), Value::Null);
            for k in ["attention_bias", "mlp_bias", "pretraining_tp"] {
                t.remove(k);
            }
            arch(t, "MistralForCausalLM");
            "text model declared as Mistral (was Llama)"
        }
        _ => return None,
    };
    Some((out, name))
}

// ---------------------------------------------------------------------------------------------
// The variants of each family.

/// LLaVA-NeXT variants of the fixture `src`, written under `root/<name>/llava_next_tiny`:
/// 1. the vision tower as `vision_tower.*` (or, for a source already in that layout, the
///    published `vision_tower.vision_model.*`), the decoder declared as the other family
///    (`sizes`: num_key_value_heads, head_dim, intermediate_size, max_position_embeddings of the
///    source), one file;
/// 2. the module layout (`model.*`, `lm_head.weight`; published for a source already in it),
///    in two shards with an index, config unchanged.
pub fn llava_variants(src: &Path, root: &Path, sizes: [usize; 4]) -> Vec<Variant> {
    let names = weight_names(src);
    let from = LlavaKeys::of(&names);
    let config = read_config(src);
    let mut out = Vec::new();
    let to = if from == LlavaKeys::VisionTowerFlat { LlavaKeys::Published } else { LlavaKeys::VisionTowerFlat };
    let (cfg1, fam) = llava_other_family(&config, sizes).unwrap_or((config.clone(), "config unchanged"));
    for (name, to, cfg, shards, what) in [
        ("llava-keys-a", to, cfg1, 1, format!("keys {from:?} → {to:?}; {fam}")),
        (
            "llava-keys-b",
            if from == LlavaKeys::Modules { LlavaKeys::Published } else { LlavaKeys::Modules },
            config.clone(),
            2,
            String::new(),
        ),
    ] {
        let what = if what.is_empty() {
            format!("keys {from:?} → {to:?}, 2 shards + index; config unchanged")
        } else {
            what
        };
        let dir = root.join(name).join("llava_next_tiny");
        let renamed = write_variant(src, &dir, &|n| to.spell(&from.canonical(n)), &cfg, shards);
        out.push(Variant { name: name.to_string(), dir, renamed, what });
    }
    out
}

/// Qwen2.5-VL variants of the fixture `src`, written under `root/<name>/qwen2_5_vl_tiny`:
/// 1. config.json in the other layout (flat ⇄ nested), keys unchanged, one file;
/// 2. the other key layout (published ⇄ modules), in two shards with an index, config unchanged.
pub fn qwen_variants(src: &Path, root: &Path) -> Vec<Variant> {
    let names = weight_names(src);
    let from = QwenKeys::of(&names);
    let config = read_config(src);
    let (cfg1, layout) = qwen_other_config(&config);
    let to = if from == QwenKeys::Modules { QwenKeys::Published } else { QwenKeys::Modules };
    let mut out = Vec::new();
    for (name, to, cfg, shards, what) in [
        ("qwen-config", from, cfg1, 1, format!("config.json rewritten {layout}; keys unchanged ({from:?})")),
        ("qwen-keys", to, config.clone(), 2, format!("keys {from:?} → {to:?}, 2 shards + index; config unchanged")),
    ] {
        let dir = root.join(name).join("qwen2_5_vl_tiny");
        let renamed = write_variant(src, &dir, &|n| to.spell(&from.canonical(n)), &cfg, shards);
        out.push(Variant { name: name.to_string(), dir, renamed, what });
    }
    out
}
