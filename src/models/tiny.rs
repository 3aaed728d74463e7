//! The embedded default model: a small Qwen2.5-VL-architecture config (vision tower included,
//! so the demo runs the real model code) with the demo's byte-level BPE tokenizer, initialised
//! randomly from a fixed seed. `am3 sft` with no `--model` trains it.

use crate::models::common::params::ParamRef;
use crate::models::qwen2_5_vl::config::{QwenPreprocessorConfig, QwenVlConfig};
use crate::models::qwen2_5_vl::model::QwenVl;
use crate::rng::Rng;
use crate::tensor::Device;
use anyhow::{anyhow, Context, Result};
use std::path::Path;
use tokenizers::Tokenizer;

pub const CONFIG_JSON: &str = include_str!("../../assets/tiny/config.json");
pub const PREPROCESSOR_JSON: &str = include_str!("../../assets/tiny/preprocessor_config.json");
pub const TOKENIZER_JSON: &str = include_str!("../../data/demo/tokenizer.json");
pub const INIT_SEED: u64 = 20260104;

/// The tiny config with the vocabulary and special ids taken from the demo tokenizer.
pub fn config(tok: &Tokenizer) -> Result<QwenVlConfig> {
    let mut v: serde_json::Value = serde_json::from_str(CONFIG_JSON).context("embedded tiny config.json")?;
    let id = |t: &str| tok.token_to_id(t).ok_or_else(|| anyhow!("the demo tokenizer has no {t} token"));
    v["vocab_size"] = tok.get_vocab_size(true).into();
    v["image_token_id"] = id("<|image_pad|>")?.into();
    v["video_token_id"] = id("<|video_pad|>").or_else(|_| id("<|image_pad|>"))?.into();
    v["vision_start_token_id"] = id("<|vision_start|>")?.into();
    v["vision_end_token_id"] = id("<|vision_end|>")?.into();
    v["bos_token_id"] = id("<|endoftext|>")?.into();
    v["eos_token_id"] = id("<|im_end|>")?.into();
    QwenVlConfig::from_json(&v, Path::new("<embedded tiny config.json>"))
}

pub fn preprocessor() -> Result<QwenPreprocessorConfig> {
    let v: serde_json::Value = serde_json::from_str(PREPROCESSOR_JSON).context("embedded preprocessor_config.json")?;
    QwenPreprocessorConfig::from_json(&v, Path::new("<embedded preprocessor_config.json>"))
}

pub fn tokenizer() -> Result<Tokenizer> {
    TOKENIZER_JSON.parse::<Tokenizer>().map_err(|e| anyhow!("embedded demo tokenizer.json: {e}"))
}

/// Random init in the usual transformer way: N(0, initializer_range) weights, unit norm
/// weights, zero biases; deterministic for a seed.
pub fn build(dev: &Device, cfg: QwenVlConfig, seed: u64) -> Result<QwenVl> {
    let mut rng = Rng::new(seed);
    let std = 0.05;
    QwenVl::build(cfg, &mut |r: &ParamRef| {
        let n = r.numel();
        let name = r.name.as_str();
        let is_norm = name.contains("norm") || name.contains("ln_q");
        let v: Vec<f32> = if is_norm && name.ends_with(".weight") {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            rng.normal_vec(n, std)
        };
        dev.upload_act(&v)
    })
}
