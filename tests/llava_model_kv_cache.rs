//! LLaVA-NeXT KV-cached prefill + appended turn + decode against the full forward: on the
//! fixture, and on a random model with two images side by side in one placeholder run.
mod common;
#[path = "common/fixture_variant.rs"]
mod fixture_variant;
use am3safety::models::llava_next::model::{Batch, Recompute};
use am3safety::tensor::{DType, Device};
use common::*;

#[path = "support/llava_model.rs"]
mod llava_model_support;
use llava_model_support::*;

#[test]
fn llava_cpu_kv_cache_matches_full_forward() {
    fixture_kv_cache_check(&Device::Cpu, DType::F32, Tol::KvCache.value(), "cpu f32");
}

/// A random tiny LLaVA-NeXT (CLIP + Llama MHA decoder, built here from a config written in the
/// test) with three images: two side by side in one placeholder run (one turn showing two
/// images), the third in a later turn. The KV-cached logits equal the full forward's when the
/// chunks split the run exactly between the two images, when one chunk holds both, and when the
/// prefill ends before any image.
#[test]
fn llava_cpu_kv_cache_adjacent_images() {
    let cfg = tiny_llama_config();
    let dev = Device::Cpu;
    let model = random_llava(&cfg, &dev, DType::F32, 0.3);
    let (x, spans) = three_image_inputs(&model);
    let geo = model.geometries(&x.sizes).unwrap();
    let (s, vocab) = (x.ids.len(), model.tdims.vocab);
    let auto = kv_splits(&spans, s);
    assert_eq!(auto[0], spans[1].start, "kv_splits splits the shared run between the two images");
    kv_cache_check(&dev, &model, &x, &auto, Tol::KvCache.value(), "cpu f32 (adjacent images, split between them)");
    kv_cache_check(
        &dev,
        &model,
        &x,
        &[spans[1].end + 1, s - 2],
        Tol::KvCache.value(),
        "cpu f32 (adjacent images in one chunk)",
    );
    kv_cache_check(
        &dev,
        &model,
        &x,
        &[spans[0].start - 2, spans[2].end + 1],
        Tol::KvCache.value(),
        "cpu f32 (text prefill, all images appended in one chunk)",
    );
    // Each image's features land in its own tokens: changing one image's pixels leaves every
    // logit before its first placeholder as it was (causal attention) and changes those from it on.
    let logits = |px: &[f32]| {
        let b = Batch { ids: &x.ids, cu_seqlens: &x.cu, pixels: px, image_sizes: &x.sizes };
        dev.to_vec(&model.logits(&dev, &model.forward(&dev, &b, &Recompute::default()).unwrap()).unwrap()).unwrap()
    };
    let base = logits(&x.pixels);
    let tile_len = model.vdims.tile_len();
    for k in 0..geo.len() {
        let off: usize = geo[..k].iter().map(|g| g.num_tiles()).sum::<usize>() * tile_len;
        let mut px = x.pixels.clone();
        for p in &mut px[off..off + geo[k].num_tiles() * tile_len] {
            *p = -*p;
        }
        let moved = logits(&px);
        let cut = spans[k].start * vocab;
        let (before, after) = (rel_err(&moved[..cut], &base[..cut]), rel_err(&moved[cut..], &base[cut..]));
        println!(
            "image {k}'s pixels negated: logits before its tokens rel diff {before:.2e}, from them on {after:.2e}"
        );
        assert!(before == 0.0 && after > 1e-4, "image {k}'s features are not at its own placeholders");
    }
}
