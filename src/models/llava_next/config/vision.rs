//! The CLIP `vision_config` (CLIPVisionConfig's defaults for omitted fields) and
//! `vision_feature_layer`.

use super::*;

/// Vision defaults: CLIPVisionConfig's own (for fields a present `vision_config` omits).
pub(super) struct VisionDefaults {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    image_size: usize,
    patch_size: usize,
    projection_dim: usize,
}

pub(super) const CLIP_CLASS_DEFAULTS: VisionDefaults = VisionDefaults {
    hidden_size: 768,
    intermediate_size: 3072,
    num_hidden_layers: 12,
    num_attention_heads: 12,
    image_size: 224,
    patch_size: 32,
    projection_dim: 512,
};

pub(super) fn parse_vision(v: Fields, d: &VisionDefaults) -> Result<VisionConfig> {
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
pub(super) fn parse_feature_layers(root: Fields, n_layers: usize) -> Result<Vec<i64>> {
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
