//! LLaVA-NeXT model math against the transformers fixtures (`fixture_dir("llava_next_tiny")`), on
//! the CPU in f32: packed image features per image (CLIP → projector → anyres packing with
//! image_newline), logits, token log-probs, the objective Σ_t loss_mask[t+1]·logp[t] and every
//! parameter gradient; activation checkpointing; packed batches; feature layers and input errors.
//!
//! Nothing is taken from the shared fixture's particulars: image counts, sizes and tiles, the key
//! layout (gradients are compared under the checkpoint's own names, as `am3 forward` writes them),
//! the decoder family (Mistral GQA or Llama MHA) and where the images sit are all read from the
//! files (`support/llava_model.rs`).
mod common;
#[path = "common/fixture_variant.rs"]
mod fixture_variant;
use am3safety::models::common::params::NamedTensors;
use am3safety::models::llava_next::model::Recompute;
use am3safety::tensor::{DType, Device};
use common::*;

#[path = "support/llava_model.rs"]
mod llava_model_support;
use llava_model_support::*;

#[test]
fn llava_cpu_image_embeds() {
    let fx = Fixture::load();
    let dev = Device::Cpu;
    check_image_embeds(&fx, &dev, &fx.model(&dev, DType::F32), Tol::FixtureEmbeds.value(), "cpu f32");
}

#[test]
fn llava_cpu_matches_transformers() {
    cpu_matches_transformers(&Fixture::load(), "cpu f32");
}

/// Two sequences packed with cu_seqlens give each sequence's own logits, and the summed
/// objective's gradients are twice the single one's.
#[test]
fn llava_cpu_packed_batch_matches_single() {
    let fx = Fixture::load();
    let dev = Device::Cpu;
    let mut model = fx.model(&dev, DType::F32);
    let one = fx.inputs(&model);
    let s = one.ids.len();
    let twice = |v: &[i32]| [v, v].concat();
    let two = Inputs {
        ids: twice(&one.ids),
        cu: vec![0, s as i32, 2 * s as i32],
        pixels: [one.pixels.clone(), one.pixels.clone()].concat(),
        sizes: [one.sizes.clone(), one.sizes.clone()].concat(),
        loss_mask: twice(&one.loss_mask),
    };
    let r1 = run_inputs(&one, &dev, &mut model, &Recompute::default());
    let r2 = run_inputs(&two, &dev, &mut model, &Recompute::default());
    let v = fx.cfg.text.vocab_size;
    report("cpu f32", "packed logits, sequence 0", rel_err(&r2.logits[..s * v], &r1.logits), Tol::Packing);
    report("cpu f32", "packed logits, sequence 1", rel_err(&r2.logits[s * v..], &r1.logits), Tol::Packing);
    report("cpu f32", "packed objective vs 2x single", (r2.objective / (2.0 * r1.objective) - 1.0).abs(), Tol::Packing);
    let doubled: NamedTensors =
        r1.grads.iter().map(|(n, (sh, g))| (n.clone(), (sh.clone(), g.iter().map(|x| 2.0 * x).collect()))).collect();
    for (n, (_, g2)) in &r2.grads {
        println!("cpu f32 packed grad {n}: rel err vs 2x single {:.2e}", named_grad_err(n, g2, &doubled, true));
    }
    report(
        "cpu f32",
        "packed grads vs 2x single (worst tensor)",
        worst_grad_err(&r2.grads, &doubled, "packed"),
        Tol::PackedGrads,
    );
}

/// Edge cases on the fixture weights: other feature layers (the last one: every layer gets a
/// gradient; the embeddings: none does), padding tiles dropped, and bad inputs rejected with
/// errors instead of panics.
#[test]
fn llava_cpu_feature_layers_and_input_errors() {
    feature_layers_and_input_errors(&Fixture::load());
}
