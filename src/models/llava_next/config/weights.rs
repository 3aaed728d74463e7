//! Weight names: the published llava-hf spelling is canonical, [`resolve`] finds the spelling a
//! checkpoint actually uses, [`weight_shapes`] lists every tensor with its expected shape.

use super::*;

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
