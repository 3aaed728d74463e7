//! A tiny random LLaVA-NeXT model directory for tests: CLIP (2 layers, 56-px tiles of 14-px
//! patches) + a Mistral (GQA) or Llama (MHA) decoder, the demo tokenizer extended with LLaVA's
//! special tokens, and preprocessor settings with 56-px tiles.
#![allow(dead_code)]

use am3safety::checkpoint::safetensors_io::SaveDtype;
use am3safety::models::common::params::ParamRef;
use am3safety::models::llava_next::config::{spellings, LlavaNextConfig};
use am3safety::models::llava_next::model::LlavaNext;
use am3safety::models::tiny;
use am3safety::rng::Rng;
use am3safety::stages::model::save_weights;
use am3safety::tensor::Device;
use std::path::Path;
use tokenizers::{AddedToken, Tokenizer};

/// The demo tokenizer extended with LLaVA's special tokens (ids after the demo vocabulary).
pub fn llava_tokenizer() -> Tokenizer {
    let mut tok = tiny::tokenizer().unwrap();
    let specials: Vec<AddedToken> = ["<s>", "</s>", "<image>", "[INST]", "[/INST]"]
        .iter()
        .map(|t| AddedToken::from(*t, true).normalized(false))
        .collect();
    tok.add_special_tokens(&specials);
    tok
}

pub const PINPOINTS: &str = "[[56, 56], [56, 112], [112, 56], [112, 112]]";

/// CLIP (2 layers, 56-px tiles of 14-px patches) + a Mistral (GQA) or Llama (MHA) decoder.
pub fn tiny_config(tok: &Tokenizer, family: &str) -> LlavaNextConfig {
    let id = |t: &str| tok.token_to_id(t).unwrap();
    let kv = if family == "mistral" { 2 } else { 4 };
    let text = format!(
        r#"{{"model_type": "{family}", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": {kv}, "head_dim": 16, "vocab_size": {v},
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096, "sliding_window": null,
            "hidden_act": "silu", "tie_word_embeddings": false, "bos_token_id": {bos}, "eos_token_id": {eos}}}"#,
        v = tok.get_vocab_size(true),
        bos = id("<s>"),
        eos = id("</s>")
    );
    let json = format!(
        r#"{{"architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next", "torch_dtype": "float32",
            "image_token_index": {img}, "image_grid_pinpoints": {PINPOINTS}, "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu", "text_config": {text},
            "vision_config": {{"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_channels": 3, "image_size": 56, "patch_size": 14,
            "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu", "projection_dim": 32}}}}"#,
        img = id("<image>")
    );
    LlavaNextConfig::from_json(&serde_json::from_str(&json).unwrap(), Path::new("<tiny llava config>"))
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Random init: N(0, 0.05) weights, unit norm weights, zero biases.
pub fn tiny_model(cfg: LlavaNextConfig, seed: u64) -> LlavaNext {
    let mut rng = Rng::new(seed);
    LlavaNext::build(cfg, &mut |r: &ParamRef| {
        let n = r.numel();
        let v = if r.name.contains("norm") && r.name.ends_with(".weight") {
            vec![1.0; n]
        } else if r.name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            rng.normal_vec(n, 0.05)
        };
        Device::Cpu.upload_act(&v)
    })
    .unwrap()
}

/// The transformers ≥ 4.52 in-memory spelling (`model.language_model.*`, `model.vision_tower.*`,
/// `lm_head.weight`, ...), so the test sees the checkpoint's own names survive training.
pub fn in_memory_name(canonical: &str) -> String {
    let sp = spellings(canonical);
    sp.iter().find(|s| s.starts_with("model.")).or(sp.last()).unwrap().clone()
}

/// Writes a complete model directory: weights (in-memory spelling), config, tokenizer and
/// preprocessor settings with 56-px tiles.
pub fn write_tiny_dir(dir: &Path, family: &str, seed: u64) -> LlavaNext {
    let tok = llava_tokenizer();
    let model = tiny_model(tiny_config(&tok, family), seed);
    save_weights(&Device::Cpu, model.param_entries(), &in_memory_name, dir, SaveDtype::F32).unwrap();
    model.cfg.save(dir).unwrap();
    tok.save(dir.join("tokenizer.json"), false).unwrap();
    let pp = format!(
        r#"{{"image_processor_type": "LlavaNextImageProcessor", "size": {{"shortest_edge": 56}},
            "crop_size": {{"height": 56, "width": 56}}, "image_grid_pinpoints": {PINPOINTS}, "resample": 3,
            "do_rescale": true, "rescale_factor": 0.00392156862745098, "do_normalize": true,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}}"#
    );
    std::fs::write(dir.join("preprocessor_config.json"), pp).unwrap();
    model
}
