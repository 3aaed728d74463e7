//! The LoRA model tests' shared part: the tiny Qwen model and its batches, LoRA settings and
//! random B matrices, one run, and the chain-rule check of adapter gradients against the merged
//! weight's.
#![allow(dead_code)]

use super::common::*;
use am3safety::models::common::lora::LoraConfig;
use am3safety::models::common::params::{NamedTensors, ParamRef};
use am3safety::models::common::train_state::TrainState;
use am3safety::models::llava_next::model::LlavaNext;
use am3safety::models::qwen2_5_vl::config::QwenVlConfig;
use am3safety::models::qwen2_5_vl::model::{QwenVl, Recompute};
use am3safety::models::tiny;
use am3safety::stages::examples::{pack, Packed};
use am3safety::stages::sft::{self, load_examples};
use am3safety::tensor::{Buf, DType, Device};
use std::path::PathBuf;

pub fn tiny_cfg() -> QwenVlConfig {
    tiny::config(&tiny::tokenizer().unwrap()).unwrap()
}

/// A deterministic seed per tensor piece.
pub fn seed_of(name: &str, row0: usize) -> u64 {
    name.bytes().fold(row0 as u64 ^ 0x5eed, |h, b| h.wrapping_mul(31).wrapping_add(b as u64))
}

/// The tiny Qwen2.5-VL with seeded weights (non-zero biases) in `dt` on `dev`.
pub fn qwen(dev: &Device, dt: DType) -> QwenVl {
    QwenVl::build(tiny_cfg(), &mut |r: &ParamRef| {
        let mut rng = Rng::new(seed_of(&r.name, r.row0));
        let n = r.numel();
        let v = if (r.name.contains("norm") || r.name.contains("ln_q")) && r.name.ends_with(".weight") {
            rng.uniform_vec(n, 0.8, 1.2)
        } else if r.name.ends_with(".bias") {
            rng.normal_vec(n, 0.02)
        } else {
            rng.normal_vec(n, 0.05)
        };
        dev.upload(&bf16_round(&v), dt)
    })
    .unwrap()
}

/// Two demo dialogues with images, packed.
pub fn demo_batch(n: usize) -> Packed {
    let tok = tiny::tokenizer().unwrap();
    let cfg = tiny::config(&tok).unwrap();
    let ex = load_examples(&sft::demo_data(), &tok, &cfg, &tiny::preprocessor().unwrap()).unwrap();
    let refs: Vec<_> = ex.iter().filter(|e| !e.grids.is_empty()).take(n).collect();
    assert_eq!(refs.len(), n, "the demo set should have {n} examples with images");
    pack(&refs)
}

pub fn lora_cfg(rank: usize, alpha: f64, targets: &[&str]) -> LoraConfig {
    LoraConfig::new(rank, alpha, targets, 5).unwrap()
}

pub const QWEN_ALL: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "visual.qkv",
    "visual.proj",
    "visual.gate_proj",
    "visual.up_proj",
    "visual.down_proj",
];

/// Sets every adapter B to seeded random values (a fresh adapter's B is 0).
pub fn randomize_b(dev: &Device, pg: Vec<(ParamRef, &mut Buf, &Buf)>, dt: DType) {
    let mut n = 0;
    for (r, p, _) in pg {
        assert!(r.name.starts_with("base_model.model.") && r.name.contains(".lora_"), "not an adapter: {}", r.name);
        if r.name.ends_with(".lora_B.weight") {
            *p = dev.upload(&bf16_round(&Rng::new(seed_of(&r.name, r.row0)).normal_vec(r.numel(), 0.05)), dt).unwrap();
            n += 1;
        }
    }
    assert!(n > 0, "no lora_B tensors");
}

/// Qwen: logits, and the gradients of Σ probe·logp over the batch's targets.
pub fn qwen_run(dev: &Device, m: &mut QwenVl, p: &Packed, rc: &Recompute) -> (Vec<f32>, NamedTensors) {
    let f = m.forward(dev, &p.batch(), rc).unwrap();
    let logits = dev.to_vec(&m.logits(dev, &f).unwrap()).unwrap();
    let (tb, wb) = (dev.upload_i32(&p.targets).unwrap(), dev.upload(&p.weights, DType::F32).unwrap());
    let (_, lse) = m.logprobs(dev, &f, &tb, Some(&wb)).unwrap();
    let mut rng = Rng::new(21);
    let dlogp: Vec<f32> = p.weights.iter().map(|&w| w * (rng.normal() as f32)).collect();
    m.zero_grads(dev).unwrap();
    m.backward_logprobs(dev, &f, &tb, &lse, &dev.upload(&dlogp, DType::F32).unwrap()).unwrap();
    (logits, m.grads_by_name(dev).unwrap())
}

/// A model built from full tensors (merged weights), rows sliced as each piece needs.
pub fn piece(full: &NamedTensors, r: &ParamRef) -> Vec<f32> {
    let (_, v) = &full[&r.name];
    v[r.row0 * r.row_len()..][..r.numel()].to_vec()
}

/// Checks dB = s·G·Aᵀ and dA = s·Bᵀ·G for every adapter, G being the merged weight's gradient.
pub fn check_chain_rule(
    tag: &str, lora_vals: &NamedTensors, lora_grads: &NamedTensors, merged_grads: &NamedTensors, scale: f64, tol: f64,
) {
    let mut worst = 0f64;
    let mut n = 0;
    for (name, (shape, got)) in lora_grads {
        let module = name
            .strip_prefix("base_model.model.")
            .and_then(|m| m.strip_suffix(".lora_A.weight").or_else(|| m.strip_suffix(".lora_B.weight")))
            .unwrap();
        let (gshape, g) = &merged_grads[&format!("{module}.weight")];
        let (out, din) = (gshape[0], gshape[1]);
        let a = &lora_vals[&format!("base_model.model.{module}.lora_A.weight")].1; // [r, in]
        let b = &lora_vals[&format!("base_model.model.{module}.lora_B.weight")].1; // [out, r]
        let r = a.len() / din;
        let mut want = vec![0f32; got.len()];
        if name.ends_with(".lora_A.weight") {
            assert_eq!(shape, &vec![r, din], "{name}");
            for k in 0..r {
                for j in 0..din {
                    want[k * din + j] =
                        (scale * (0..out).map(|o| b[o * r + k] as f64 * g[o * din + j] as f64).sum::<f64>()) as f32;
                }
            }
        } else {
            assert_eq!(shape, &vec![out, r], "{name}");
            for o in 0..out {
                for k in 0..r {
                    want[o * r + k] =
                        (scale * (0..din).map(|j| g[o * din + j] as f64 * a[k * din + j] as f64).sum::<f64>()) as f32;
                }
            }
        }
        let e = rel_err(got, &want);
        println!("{tag} {name}: rel err {e:.2e}");
        assert!(e <= tol, "{tag} {name}: rel err {e:.2e} > {tol:.0e}");
        worst = worst.max(e);
        n += 1;
    }
    println!("{tag}: {n} adapter gradients, worst rel err {worst:.2e}");
}

/// Two text-only sequences for the LLaVA fixture model.
pub fn llava_text_batch(l: &LlavaNext) -> (Vec<i32>, Vec<i32>) {
    let mut rng = Rng::new(31);
    let v = l.tdims.vocab.min(l.cfg.image_token_index as usize);
    let ids: Vec<i32> = (0..37).map(|_| rng.below(v) as i32).collect();
    (ids, vec![0, 20, 37])
}

pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("am3-lora-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}
