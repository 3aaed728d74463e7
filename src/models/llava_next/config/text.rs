//! The decoder's `text_config` (Mistral or Llama): its fields, with the class defaults
//! transformers' MistralConfig / LlamaConfig apply to omitted ones.

use super::*;

/// Class defaults of the two decoder configs (transformers' MistralConfig / LlamaConfig).
pub(super) struct TextDefaults {
    intermediate_size: usize,
    num_key_value_heads: Option<usize>, // None: = num_attention_heads
    max_position_embeddings: usize,
    sliding_window: Option<usize>,
}

pub(super) const MISTRAL_DEFAULTS: TextDefaults = TextDefaults {
    intermediate_size: 14336,
    num_key_value_heads: Some(8),
    max_position_embeddings: 4096 * 32,
    sliding_window: Some(4096),
};
pub(super) const LLAMA_DEFAULTS: TextDefaults = TextDefaults {
    intermediate_size: 11008,
    num_key_value_heads: None,
    max_position_embeddings: 2048,
    sliding_window: None,
};

pub(super) fn parse_text(root: Fields, t: Fields) -> Result<TextConfig> {
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
