//! The Qwen2.5-VL language model (`Qwen2_5_VLTextModel` + `lm_head`, model-spec A5, A7, A8): a
//! Qwen2 decoder (GQA, q/k/v biases, no o_proj or MLP bias, RMSNorm, SwiGLU) with M-RoPE, run by
//! the shared decoder LM in `models::common::lm`. This file holds what is Qwen-specific: sizes
//! from the config, checkpoint names, and where the image rows go.

use super::config::TextConfig;
use crate::models::common::decoder::{LayerDims, LayerFlags, RopeKind};
use crate::models::common::lm::{LmDims, LmNames};
use anyhow::{bail, Result};

/// Qwen2: biases on q, k, v only.
pub const TEXT_FLAGS: LayerFlags = LayerFlags { qkv_bias: true, o_bias: false, mlp_bias: false };

pub fn lm_dims(c: &TextConfig) -> Result<LmDims> {
    if c.num_attention_heads == 0
        || c.num_key_value_heads == 0
        || !c.num_attention_heads.is_multiple_of(c.num_key_value_heads)
    {
        bail!(
            "text: num_attention_heads {} must be a positive multiple of num_key_value_heads {}",
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
        rope: RopeKind::MRope { theta: c.rope_theta as f32, sections: c.mrope_section.clone() },
        tied: c.tie_word_embeddings,
    })
}

/// Hub / `save_pretrained` names (`model.layers.{i}…`, `lm_head.weight`).
pub fn lm_names() -> LmNames {
    LmNames { prefix: "model.".into(), lm_head: "lm_head.weight".into() }
}

/// Other spellings of a checkpoint name: transformers ≥ 4.52 keeps the language model under
/// `model.language_model.` and the tower under `model.visual.` in memory (model-spec A8).
pub fn aliases(name: &str) -> Vec<String> {
    if let Some(rest) = name.strip_prefix("model.") {
        vec![format!("model.language_model.{rest}")]
    } else if name.starts_with("visual.") {
        vec![format!("model.{name}")]
    } else {
        Vec::new()
    }
}

/// Positions of the image placeholder tokens, in order (where the vision rows go).
pub fn image_positions(ids: &[i32], image_token_id: u32) -> Vec<usize> {
    ids.iter().enumerate().filter(|(_, &id)| id as i64 == image_token_id as i64).map(|(i, _)| i).collect()
}
