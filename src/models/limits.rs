//! Hard caps on sizes read from config files, preprocessor files and flags, and the memory
//! checks that run before weights, training state or caches are allocated. An absurd size must
//! be an error naming the file, the field, the value and the limit, never an allocation that
//! aborts the process or a step that runs for hours.
//!
//! The caps sit far above every published model (Qwen2.5-VL-72B: 80 layers, width 8192,
//! intermediate 29568, vocabulary 152064) and far below what would overflow a `usize` product.

use crate::tensor::Device;
use anyhow::{bail, Result};

/// Decoder layers, vision blocks, CLIP layers.
pub const MAX_LAYERS: usize = 1024;
/// Hidden sizes, head counts and head widths (and heads × head_dim).
pub const MAX_WIDTH: usize = 65536;
/// MLP widths.
pub const MAX_INTERMEDIATE: usize = 1 << 18;
/// Embedding rows.
pub const MAX_VOCAB: usize = 1 << 23;
/// `max_position_embeddings` (also bounds one sample and one KV-cache sequence).
pub const MAX_POSITIONS: usize = 1 << 24;
/// Vision patches of one image: 4× the published Qwen2.5-VL `max_pixels` (65536 patches).
pub const MAX_IMAGE_PATCHES: usize = 1 << 18;
/// Patch side in pixels, temporal patch and spatial merge sizes.
pub const MAX_PATCH: usize = 1024;
pub const MAX_MERGE: usize = 64;
/// Image sides in pixels (tile size, pinpoints, window size).
pub const MAX_IMAGE_SIDE: usize = 1 << 16;

const GIB: f64 = (1u64 << 30) as f64;

/// Bytes as GiB with two decimals, for messages.
pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / GIB)
}

/// Checks that `bytes` fit in what `dev` has available; `what` says what needs them.
pub fn ensure_fits(dev: &Device, bytes: u64, what: &dyn Fn() -> String) -> Result<()> {
    let Some((avail, src)) = dev.available_memory() else { return Ok(()) };
    if bytes > avail {
        bail!(
            "not enough memory for {}: {} needed, {} available on {} ({src})",
            what(),
            gib(bytes),
            gib(avail),
            dev.name()
        );
    }
    Ok(())
}

/// The weights of a model of `n_params` parameters, in the device's weight dtype (bf16 on a GPU,
/// f32 on the CPU), must fit; `file` is the config they come from.
pub fn ensure_weights_fit(dev: &Device, n_params: u64, file: &std::path::Path) -> Result<()> {
    let bytes = n_params.saturating_mul(dev.act_dtype().size() as u64);
    ensure_fits(dev, bytes, &|| {
        format!("the weights of {} ({:.3} B parameters)", file.display(), n_params as f64 / 1e9)
    })
}

/// Training state on the CPU: f32 gradients of the `n_trainable` parameters (plus
/// `extra_grad` other gradient elements, e.g. LoRA's lm_head sink), AdamW's f32 master, exp_avg
/// and exp_avg_sq, plus a rough lower bound of one micro-batch's kept activations
/// (`tokens` × `layers` × (4·d + 2·inter) f32). A GPU is checked by the trainer after the
/// gradients exist, where bf16 linear-layer gradients can still make a run fit.
pub fn ensure_training_fits(
    dev: &Device, n_trainable: u64, extra_grad: u64, tokens: u64, layers: u64, d: u64, inter: u64,
) -> Result<()> {
    if dev.is_cuda() {
        return Ok(());
    }
    let grads = n_trainable.saturating_add(extra_grad).saturating_mul(4);
    let optim = n_trainable.saturating_mul(12);
    let acts = tokens
        .saturating_mul(layers)
        .saturating_mul(d.saturating_mul(4).saturating_add(inter.saturating_mul(2)))
        .saturating_mul(4);
    let total = grads.saturating_add(optim).saturating_add(acts);
    ensure_fits(dev, total, &|| {
        format!(
            "training {:.3} B parameters (gradients {}, AdamW state {}, activations of {tokens} tokens ≥ {})",
            n_trainable as f64 / 1e9,
            gib(grads),
            gib(optim),
            gib(acts)
        )
    })
}

/// The most tokens one sample may have: one micro-batch, and the model's positions.
pub fn sample_token_limit(batch_tokens: usize, max_positions: usize) -> usize {
    batch_tokens.min(max_positions)
}

/// `origin: N tokens, limit M (why)` for a sample over [`sample_token_limit`].
pub fn sample_too_long(origin: &str, id: &str, n: usize, batch_tokens: usize, max_positions: usize) -> String {
    let why = if batch_tokens <= max_positions { "--batch-tokens" } else { "the model's max_position_embeddings" };
    format!("{origin}: {n} tokens, limit {} ({why}; sample {id:?})", sample_token_limit(batch_tokens, max_positions))
}

/// One warning line for checkpoint tensors the config does not use: their count and the first
/// few names. Returns the line (None when every tensor is used).
pub fn unused_tensors_warning(dir: &std::path::Path, unused: &[&str]) -> Option<String> {
    if unused.is_empty() {
        return None;
    }
    let shown: Vec<&str> = unused.iter().take(5).copied().collect();
    let more =
        if unused.len() > shown.len() { format!(", … ({} more)", unused.len() - shown.len()) } else { String::new() };
    Some(format!(
        "am3: warning: {}: {} checkpoint tensor{} not used by config.json: {}{more}",
        dir.display(),
        unused.len(),
        if unused.len() == 1 { " is" } else { "s are" },
        shown.join(", ")
    ))
}
