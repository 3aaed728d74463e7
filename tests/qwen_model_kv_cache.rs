//! Qwen2.5-VL KV-cached prefill + appended turn + decode against the full forward: on the fixture,
//! and on a random model with three images.
mod common;
#[path = "common/fixture_variant.rs"]
mod fixture_variant;
use am3safety::tensor::{DType, Device};
use common::*;

#[path = "support/qwen_model.rs"]
mod qwen_model_support;
use qwen_model_support::*;

#[test]
fn qwen_cpu_kv_cache_matches_full_forward() {
    fixture_kv_cache_check(&Device::Cpu, DType::F32, Tol::KvCache.value(), "cpu f32");
}

/// A random model of the fixture's config with three images, two of them back to back in one
/// turn, the third in a later turn. The KV-cached logits and M-RoPE positions equal the full
/// forward's for several chunkings (between the two images, both in one chunk, a text-only
/// prefill).
#[test]
fn qwen_cpu_kv_cache_three_images() {
    let cfg = Fixture::load().cfg;
    let dev = Device::Cpu;
    let model = random_qwen(&cfg, &dev, DType::F32);
    let (x, spans) = three_image_inputs(&cfg);
    let s = x.ids.len();
    let tag = "cpu f32 (three images)";
    kv_cache_check(&dev, &model, &cfg, &x, &kv_splits(&spans, s), Tol::KvCache.value(), tag);
    kv_cache_check(
        &dev,
        &model,
        &cfg,
        &x,
        &[spans[0].end + 1, s - 2],
        Tol::KvCache.value(),
        &format!("{tag}, split between images 0 and 1"),
    );
    kv_cache_check(
        &dev,
        &model,
        &cfg,
        &x,
        &[spans[0].start - 3, spans[1].end + 1, spans[2].end + 1],
        Tol::KvCache.value(),
        &format!("{tag}, two images in one chunk"),
    );
}
