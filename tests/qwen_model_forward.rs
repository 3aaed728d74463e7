//! Qwen2.5-VL model math against the transformers fixtures (`fixture_dir("qwen2_5_vl_tiny")`), on
//! the CPU in f32: the vision tower's embeddings, logits, token log-probs, the objective and every
//! parameter gradient; activation checkpointing; packed batches; the vision layout of the spec's
//! example.
mod common;
#[path = "common/fixture_variant.rs"]
mod fixture_variant;
use am3safety::models::common::params::NamedTensors;
use am3safety::models::qwen2_5_vl::model::Recompute;
use am3safety::models::qwen2_5_vl::vision::VisionLayout;
use am3safety::tensor::{DType, Device};
use common::*;

#[path = "support/qwen_model.rs"]
mod qwen_model_support;
use qwen_model_support::*;

#[test]
fn vision_layout_matches_spec_example() {
    // model-spec A4.3: grid 18×24 patches, 4×4 merged tokens per window.
    let l = VisionLayout::new(&[[1, 18, 24]], 2, 4).unwrap();
    assert_eq!(&l.window_index[..18], &[0, 1, 2, 3, 12, 13, 14, 15, 24, 25, 26, 27, 36, 37, 38, 39, 4, 5]);
    assert_eq!(l.cu_window, vec![0, 64, 128, 192, 256, 320, 384, 400, 416, 432]);
    assert_eq!(l.cu_full, vec![0, 432]);
    // Two images: the second one's windows follow, offset by the first one's tokens.
    let l2 = VisionLayout::new(&[[1, 4, 4], [1, 16, 16]], 2, 4).unwrap();
    assert_eq!(&l2.window_index[..5], &[0, 1, 2, 3, 4]);
    assert_eq!(l2.cu_full, vec![0, 16, 272]);
    assert_eq!(l2.cu_window, vec![0, 16, 80, 144, 208, 272]);
    assert!(VisionLayout::new(&[[1, 5, 4]], 2, 4).is_err(), "odd grids must be rejected");
}

#[test]
fn qwen_cpu_vision_embeds() {
    let fx = Fixture::load();
    let dev = Device::Cpu;
    check_vision_embeds(&fx, &dev, &fx.model(&dev, DType::F32), Tol::FixtureEmbeds.value(), "cpu f32");
}

#[test]
fn qwen_cpu_matches_transformers() {
    cpu_matches_transformers(&Fixture::load(), "cpu f32");
}

/// Two sequences packed with cu_seqlens (each with its images) give each sequence's own logits,
/// and the summed objective's gradients are the sum of the per-sequence ones.
#[test]
fn qwen_cpu_packed_batch_matches_single() {
    let fx = Fixture::load();
    let dev = Device::Cpu;
    let one = fx.inputs();
    let s = one.ids.len();
    let twice = |v: &[i32]| [v, v].concat();
    let pos3: Vec<i32> = (0..3).flat_map(|r| twice(&one.pos3[r * s..(r + 1) * s])).collect();
    let two = Inputs {
        ids: twice(&one.ids),
        cu: vec![0, s as i32, 2 * s as i32],
        pos3,
        pixels: [one.pixels.clone(), one.pixels.clone()].concat(),
        grids: [one.grids.clone(), one.grids.clone()].concat(),
        loss_mask: twice(&one.loss_mask),
    };
    let mut model = fx.model(&dev, DType::F32);
    let r1 = run_inputs(&one, &dev, &mut model, &Recompute::default());
    let r2 = run_inputs(&two, &dev, &mut model, &Recompute::default());
    let v = fx.cfg.text.vocab_size;
    report("cpu f32", "packed logits, sequence 0", rel_err(&r2.logits[..s * v], &r1.logits), Tol::Packing);
    report("cpu f32", "packed logits, sequence 1", rel_err(&r2.logits[s * v..], &r1.logits), Tol::Packing);
    report("cpu f32", "packed objective vs 2x single", (r2.objective / (2.0 * r1.objective) - 1.0).abs(), Tol::Packing);
    let doubled: NamedTensors =
        r1.grads.iter().map(|(n, (sh, g))| (n.clone(), (sh.clone(), g.iter().map(|x| 2.0 * x).collect()))).collect();
    report(
        "cpu f32",
        "packed grads vs 2x single (worst tensor)",
        worst_grad_err(&r2.grads, &doubled, "packed"),
        Tol::PackedGrads,
    );
}
