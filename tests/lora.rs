//! LoRA. The op: forward against the explicit product, backward against f64 finite
//! differences, the CPU dispatch, and cuBLAS against the CPU (bf16 and f32). The models: zero-B
//! adapters leave the logits unchanged; the adapters' gradients equal the chain rule through the
//! merged weight's gradient (dB = s·G·Aᵀ, dA = s·Bᵀ·G, G = dL/d(W + s·B·A)), Qwen2.5-VL (text
//! and fused vision qkv) and LLaVA-NeXT; SFT steps lower the loss with the base bit-identical;
//! a merged save reloads with the same logits; the PEFT adapter files; `am3 sft --lora-*` (flags,
//! adapter checkpoints, bit-for-bit resume, merged checkpoints); the same models on the GPU.
mod common;
use am3safety::checkpoint::safetensors_io::{read_tensor_file, SaveDtype};
use am3safety::models::common::lora::{LoraConfig, ADAPTER_CONFIG, ADAPTER_WEIGHTS, DEFAULT_TARGETS};
use am3safety::models::common::params::{assemble, NamedTensors, ParamRef};
use am3safety::models::common::train_state::TrainState;
use am3safety::models::llava_next::model::{Batch as LlavaBatch, LlavaNext};
use am3safety::models::qwen2_5_vl::config::QwenVlConfig;
use am3safety::models::qwen2_5_vl::model::{QwenVl, Recompute};
use am3safety::models::tiny;
use am3safety::ops::adamw::AdamW;
use am3safety::ops::lora::{self, cpu, Adapter};
use am3safety::stages::examples::{pack, Packed};
use am3safety::stages::model::VlModel;
use am3safety::stages::sft::{self, latest_checkpoint, load_examples, nll_micro_batch, SftArgs};
use am3safety::tensor::{Buf, DType, Device, DevicePref};
use am3safety::train::metrics::read_metrics;
use am3safety::train::optim::Optimizer;
use common::*;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// The op.

/// (t, din, dout, r): odd sizes, size 1, rank above din.
const OP_SHAPES: &[(usize, usize, usize, usize)] =
    &[(1, 1, 1, 1), (3, 7, 5, 2), (5, 16, 9, 4), (4, 3, 11, 8), (9, 33, 17, 3)];

fn normal64(rng: &mut Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.normal()).collect()
}

/// s·(x·Aᵀ)·Bᵀ by the definition, f64.
#[allow(clippy::too_many_arguments)]
fn explicit(x: &[f64], a: &[f64], b: &[f64], t: usize, din: usize, dout: usize, r: usize, s: f64) -> Vec<f64> {
    let mut u = vec![0f64; t * r];
    for i in 0..t {
        for k in 0..r {
            u[i * r + k] = (0..din).map(|j| x[i * din + j] * a[k * din + j]).sum();
        }
    }
    let mut y = vec![0f64; t * dout];
    for i in 0..t {
        for o in 0..dout {
            y[i * dout + o] = s * (0..r).map(|k| u[i * r + k] * b[o * r + k]).sum::<f64>();
        }
    }
    y
}

#[test]
fn lora_op_forward_matches_explicit_product() {
    let mut rng = Rng::new(11);
    for &(t, din, dout, r) in OP_SHAPES {
        let (x, a, b, y0) = (
            normal64(&mut rng, t * din),
            normal64(&mut rng, r * din),
            normal64(&mut rng, dout * r),
            normal64(&mut rng, t * dout),
        );
        let mut y = y0.clone();
        cpu::fwd(&mut y, &x, &a, &b, t, din, dout, r, 0.75);
        let want: Vec<f64> = explicit(&x, &a, &b, t, din, dout, r, 0.75).iter().zip(&y0).map(|(d, y)| y + d).collect();
        let e = rel_err64(&y, &want);
        println!("lora fwd {t}x{din}->{dout} r{r}: rel err {e:.2e} (y += branch)");
        assert!(e < 1e-13, "lora fwd {t}x{din}->{dout} r{r}: {e:.2e}");
    }
}

#[test]
fn lora_op_gradcheck() {
    let mut rng = Rng::new(12);
    let s = 1.5f32;
    for &(t, din, dout, r) in OP_SHAPES {
        let (x, a, b) = (normal64(&mut rng, t * din), normal64(&mut rng, r * din), normal64(&mut rng, dout * r));
        let g = probe(&mut rng, t * dout);
        let loss = |x: &[f64], a: &[f64], b: &[f64]| {
            let mut y = vec![0f64; t * dout];
            cpu::fwd(&mut y, x, a, b, t, din, dout, r, s);
            dot(&y, &g)
        };
        let (mut dx, mut da, mut db) = (vec![0f64; t * din], vec![0f64; r * din], vec![0f64; dout * r]);
        cpu::bwd(Some(&mut dx), Some(&mut da), Some(&mut db), &g, &x, &a, &b, t, din, dout, r, s);
        let tag = format!("{t}x{din}->{dout} r{r}");
        gradcheck(&format!("lora dx {tag}"), &x, &dx, &mut |xp| loss(xp, &a, &b), 64, 1e-5);
        gradcheck(&format!("lora dA {tag}"), &a, &da, &mut |ap| loss(&x, ap, &b), 64, 1e-5);
        gradcheck(&format!("lora dB {tag}"), &b, &db, &mut |bp| loss(&x, &a, bp), 64, 1e-5);
        // Every output accumulates: a second call adds the same again.
        let (mut dx2, mut da2, mut db2) = (dx.clone(), da.clone(), db.clone());
        cpu::bwd(Some(&mut dx2), Some(&mut da2), Some(&mut db2), &g, &x, &a, &b, t, din, dout, r, s);
        for (two, one) in [(&dx2, &dx), (&da2, &da), (&db2, &db)] {
            let want: Vec<f64> = one.iter().map(|v| 2.0 * v).collect();
            assert!(rel_err64(two, &want) < 1e-14, "lora bwd {tag}: outputs must accumulate");
        }
    }
}

#[test]
fn lora_op_cpu_dispatch_matches_reference() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(13);
    let (t, din, dout, r) = (6, 10, 7, 3);
    let (x, a, b, dy) = (
        rng.normal_vec(t * din, 1.0),
        rng.normal_vec(r * din, 1.0),
        rng.normal_vec(dout * r, 1.0),
        rng.normal_vec(t * dout, 1.0),
    );
    let up = |v: &[f32]| dev.upload(v, DType::F32).unwrap();
    let (bx, ba, bb, bdy) = (up(&x), up(&a), up(&b), up(&dy));
    let ad = Adapter { a: &ba, b: &bb, rank: r, scale: 2.0 };
    let mut y = dev.zeros_f32(t * dout).unwrap();
    lora::fwd(&dev, &mut y, &bx, &ad, t, din, dout).unwrap();
    let mut want = vec![0f32; t * dout];
    cpu::fwd(&mut want, &x, &a, &b, t, din, dout, r, 2.0);
    assert_eq!(dev.to_vec(&y).unwrap(), want);
    // A frozen adapter (no dA, dB) gives the same dx.
    let (mut dx1, mut dx2) = (dev.zeros_f32(t * din).unwrap(), dev.zeros_f32(t * din).unwrap());
    let (mut da, mut db) = (dev.zeros_f32(r * din).unwrap(), dev.zeros_f32(dout * r).unwrap());
    lora::bwd(&dev, Some(&mut dx1), Some(&mut da), Some(&mut db), &bdy, &bx, &ad, t, din, dout).unwrap();
    lora::bwd(&dev, Some(&mut dx2), None, None, &bdy, &bx, &ad, t, din, dout).unwrap();
    assert_eq!(dev.to_vec(&dx1).unwrap(), dev.to_vec(&dx2).unwrap());
    // Bad shapes and ranks are errors naming the op and argument.
    let e = lora::fwd(&dev, &mut y, &bx, &ad, t, din + 1, dout).unwrap_err().to_string();
    assert!(e.contains("lora_fwd") && e.contains(" a "), "{e}");
    let e = lora::bwd(&dev, None, Some(&mut dev.zeros_f32(3).unwrap()), None, &bdy, &bx, &ad, t, din, dout)
        .unwrap_err()
        .to_string();
    assert!(e.contains("lora_bwd") && e.contains("da"), "{e}");
    let bad = Adapter { rank: 0, ..ad };
    assert!(lora::fwd(&dev, &mut y, &bx, &bad, t, din, dout).is_err());
}

/// The GPU against the CPU for both dtypes. Outputs accumulate (+=), so instead of NaN poison
/// each case runs twice: from zeros (the branch alone, judged precisely) and from random
/// starting values (the accumulation).
#[test]
fn lora_op_cuda_matches_cpu() {
    let Some(gpu) = cuda_or_skip("lora_op_cuda_matches_cpu") else { return };
    let shapes: &[(usize, usize, usize, usize)] =
        &[(1, 1, 1, 1), (3, 7, 5, 2), (17, 33, 65, 8), (64, 128, 80, 16), (129, 257, 96, 4), (200, 512, 1000, 64)];
    let mut rng = Rng::new(14);
    for (dt, tol) in [(DType::BF16, 1e-2), (DType::F32, 1e-5)] {
        for &(t, din, dout, r) in shapes {
            for accumulate in [false, true] {
                let round = |v: Vec<f32>| if dt == DType::BF16 { bf16_round(&v) } else { v };
                let init = |rng: &mut Rng, n: usize| if accumulate { rng.normal_vec(n, 1.0) } else { vec![0.0; n] };
                let x = round(rng.normal_vec(t * din, 1.0));
                let a = round(rng.normal_vec(r * din, 0.5));
                let b = round(rng.normal_vec(dout * r, 0.5));
                let dy = round(rng.normal_vec(t * dout, 1.0));
                let (y0, dx0) = (round(init(&mut rng, t * dout)), round(init(&mut rng, t * din)));
                let (da0, db0) = (init(&mut rng, r * din), init(&mut rng, dout * r));
                let scale = 0.8f32;
                // CPU reference (f32).
                let mut want_y = y0.clone();
                cpu::fwd(&mut want_y, &x, &a, &b, t, din, dout, r, scale);
                let (mut want_dx, mut want_da, mut want_db) = (dx0.clone(), da0.clone(), db0.clone());
                cpu::bwd(
                    Some(&mut want_dx),
                    Some(&mut want_da),
                    Some(&mut want_db),
                    &dy,
                    &x,
                    &a,
                    &b,
                    t,
                    din,
                    dout,
                    r,
                    scale,
                );
                // GPU.
                let upd = |v: &[f32]| gpu.upload(v, dt).unwrap();
                let (gx, ga, gb, gdy) = (upd(&x), upd(&a), upd(&b), upd(&dy));
                let (mut gy, mut gdx) = (upd(&y0), upd(&dx0));
                let (mut gda, mut gdb) = (gpu.upload(&da0, DType::F32).unwrap(), gpu.upload(&db0, DType::F32).unwrap());
                let ad = Adapter { a: &ga, b: &gb, rank: r, scale };
                lora::fwd(&gpu, &mut gy, &gx, &ad, t, din, dout).unwrap();
                lora::bwd(&gpu, Some(&mut gdx), Some(&mut gda), Some(&mut gdb), &gdy, &gx, &ad, t, din, dout).unwrap();
                let tag = format!(
                    "lora {} {t}x{din}->{dout} r{r} {}",
                    dt.suffix(),
                    if accumulate { "accumulate" } else { "from zero" }
                );
                for (what, g, w) in
                    [("y", &gy, &want_y), ("dx", &gdx, &want_dx), ("dA", &gda, &want_da), ("dB", &gdb, &want_db)]
                {
                    let got = gpu.to_vec(g).unwrap();
                    let e = rel_err(&got, w);
                    println!("{tag} {what}: rel err {e:.2e} (tol {tol:.0e})");
                    assert!(e <= tol, "{tag} {what}: rel err {e:.2e} > {tol:.0e}");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The models.

fn tiny_cfg() -> QwenVlConfig {
    tiny::config(&tiny::tokenizer().unwrap()).unwrap()
}

/// A deterministic seed per tensor piece.
fn seed_of(name: &str, row0: usize) -> u64 {
    name.bytes().fold(row0 as u64 ^ 0x5eed, |h, b| h.wrapping_mul(31).wrapping_add(b as u64))
}

/// The tiny Qwen2.5-VL with seeded weights (non-zero biases) in `dt` on `dev`.
fn qwen(dev: &Device, dt: DType) -> QwenVl {
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
fn demo_batch(n: usize) -> Packed {
    let tok = tiny::tokenizer().unwrap();
    let cfg = tiny::config(&tok).unwrap();
    let ex = load_examples(&sft::demo_data(), &tok, &cfg, &tiny::preprocessor().unwrap()).unwrap();
    let refs: Vec<_> = ex.iter().filter(|e| !e.grids.is_empty()).take(n).collect();
    assert_eq!(refs.len(), n, "the demo set should have {n} examples with images");
    pack(&refs)
}

fn lora_cfg(rank: usize, alpha: f64, targets: &[&str]) -> LoraConfig {
    LoraConfig::new(rank, alpha, targets, 5).unwrap()
}

const QWEN_ALL: &[&str] = &[
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
fn randomize_b(dev: &Device, pg: Vec<(ParamRef, &mut Buf, &Buf)>, dt: DType) {
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
fn qwen_run(dev: &Device, m: &mut QwenVl, p: &Packed, rc: &Recompute) -> (Vec<f32>, NamedTensors) {
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
fn piece(full: &NamedTensors, r: &ParamRef) -> Vec<f32> {
    let (_, v) = &full[&r.name];
    v[r.row0 * r.row_len()..][..r.numel()].to_vec()
}

/// Checks dB = s·G·Aᵀ and dA = s·Bᵀ·G for every adapter, G being the merged weight's gradient.
fn check_chain_rule(
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

#[test]
fn lora_zero_b_keeps_the_logits() {
    let dev = Device::Cpu;
    let p = demo_batch(2);
    let mut m = qwen(&dev, DType::F32);
    let f = m.forward(&dev, &p.batch(), &Recompute::default()).unwrap();
    let before = dev.to_vec(&m.logits(&dev, &f).unwrap()).unwrap();
    m.enable_lora(&dev, &lora_cfg(4, 8.0, QWEN_ALL)).unwrap();
    assert!(m.enable_lora(&dev, &lora_cfg(4, 8.0, QWEN_ALL)).is_err(), "enabling twice must fail");
    let f = m.forward(&dev, &p.batch(), &Recompute::default()).unwrap();
    let after = dev.to_vec(&m.logits(&dev, &f).unwrap()).unwrap();
    assert!(before == after, "zero-B adapters changed the Qwen logits (max diff {:.2e})", max_abs(&after, &before));
    // Frozen base: only adapters are listed, under PEFT names.
    m.zero_grads(&dev).unwrap();
    let names: Vec<String> = m.params_and_grads().into_iter().map(|(r, _, _)| r.name).collect();
    let lora = m.lora().unwrap();
    assert_eq!(names.len(), lora.entries().len());
    assert!(
        names
            .iter()
            .all(|n| n.starts_with("base_model.model.")
                && (n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight"))),
        "{names:?}"
    );
    println!(
        "qwen: {} adapter tensors, {} adapter values; base {} values",
        names.len(),
        lora.num_params(),
        m.param_entries().iter().map(|(r, _)| r.numel()).sum::<usize>()
    );

    // LLaVA-NeXT (text adapters; CLIP targets are refused).
    let mut l = LlavaNext::load(&dev, fixture_dir("llava_next_tiny")).unwrap();
    let (ids, cu) = llava_text_batch(&l);
    let b = LlavaBatch { ids: &ids, cu_seqlens: &cu, pixels: &[], image_sizes: &[] };
    let before = dev.to_vec(&l.logits(&dev, &l.forward(&dev, &b, &Recompute::default()).unwrap()).unwrap()).unwrap();
    assert!(
        l.enable_lora(&dev, &lora_cfg(4, 8.0, &["q_proj", "visual.qkv"])).is_err(),
        "LLaVA vision targets must be refused"
    );
    l.enable_lora(&dev, &lora_cfg(4, 8.0, &DEFAULT_TARGETS)).unwrap();
    let after = dev.to_vec(&l.logits(&dev, &l.forward(&dev, &b, &Recompute::default()).unwrap()).unwrap()).unwrap();
    assert!(before == after, "zero-B adapters changed the LLaVA logits (max diff {:.2e})", max_abs(&after, &before));
}

/// Two text-only sequences for the LLaVA fixture model.
fn llava_text_batch(l: &LlavaNext) -> (Vec<i32>, Vec<i32>) {
    let mut rng = Rng::new(31);
    let v = l.tdims.vocab.min(l.cfg.image_token_index as usize);
    let ids: Vec<i32> = (0..37).map(|_| rng.below(v) as i32).collect();
    (ids, vec![0, 20, 37])
}

#[test]
fn lora_qwen_grads_follow_the_merged_weight_grads() {
    let dev = Device::Cpu;
    let p = demo_batch(2);
    let cfg = lora_cfg(3, 7.5, QWEN_ALL);
    let mut m = qwen(&dev, DType::F32);
    m.enable_lora(&dev, &cfg).unwrap();
    m.zero_grads(&dev).unwrap();
    randomize_b(&dev, m.params_and_grads(), DType::F32);
    let (logits, lg) = qwen_run(&dev, &mut m, &p, &Recompute::default());
    // Activation checkpointing gives the same adapter gradients.
    let all = Recompute::all(m.tdims.n_layers);
    let (_, lg_rc) = qwen_run(&dev, &mut m, &p, &all);
    for (n, (_, g)) in &lg {
        assert!(g == &lg_rc[n].1, "{n}: recompute changed the gradient");
    }
    let lora_vals = assemble(&dev, m.lora().unwrap().entries()).unwrap();
    // The same network with W + s·B·A as plain weights, trained in full.
    let merged = m.merged_weights(&dev).unwrap();
    let mut full = QwenVl::build(tiny_cfg(), &mut |r| dev.upload(&piece(&merged, r), DType::F32)).unwrap();
    let (logits_m, g_m) = qwen_run(&dev, &mut full, &p, &Recompute::default());
    let e = rel_err(&logits, &logits_m);
    println!("qwen lora vs merged logits: rel err {e:.2e}");
    assert!(e <= 1e-5, "logits with adapters vs merged weights: {e:.2e}");
    check_chain_rule("qwen cpu", &lora_vals, &lg, &g_m, cfg.scale() as f64, 1e-4);
    assert_eq!(
        lg.len(),
        2 * 2 * 7 + 2 * (2 + 4 * 2),
        "2 text layers × 7 adapters (A, B); 2 vision blocks × (qkv: A + B, 4 others × 2)"
    );
}

#[test]
fn lora_llava_grads_follow_the_merged_weight_grads() {
    let dev = Device::Cpu;
    let dir = fixture_dir("llava_next_tiny");
    let mut l = LlavaNext::load(&dev, &dir).unwrap();
    let cfg = lora_cfg(2, 4.0, &["q_proj", "v_proj", "o_proj", "down_proj"]);
    l.enable_lora(&dev, &cfg).unwrap();
    l.zero_grads(&dev).unwrap();
    randomize_b(&dev, l.params_and_grads(), DType::F32);
    let (ids, cu) = llava_text_batch(&l);
    let run = |m: &mut LlavaNext| {
        let b = LlavaBatch { ids: &ids, cu_seqlens: &cu, pixels: &[], image_sizes: &[] };
        let f = m.forward(&dev, &b, &Recompute::default()).unwrap();
        let logits = dev.to_vec(&m.logits(&dev, &f).unwrap()).unwrap();
        let mut targets = ids[1..].to_vec();
        targets.push(0);
        let mask: Vec<f32> = (0..ids.len()).map(|t| if cu.contains(&(t as i32 + 1)) { 0.0 } else { 1.0 }).collect();
        let (tb, mb) = (dev.upload_i32(&targets).unwrap(), dev.upload(&mask, DType::F32).unwrap());
        let (_, lse) = m.logprobs(&dev, &f, &tb, Some(&mb)).unwrap();
        let mut rng = Rng::new(22);
        let dlogp: Vec<f32> = mask.iter().map(|&w| w * rng.normal() as f32).collect();
        m.zero_grads(&dev).unwrap();
        m.backward_logprobs(&dev, &f, &tb, &lse, &dev.upload(&dlogp, DType::F32).unwrap()).unwrap();
        (logits, m.grads_by_name(&dev).unwrap())
    };
    let (logits, lg) = run(&mut l);
    let lora_vals = assemble(&dev, l.lora().unwrap().entries()).unwrap();
    let merged = l.merged_weights(&dev).unwrap();
    let mut full = LlavaNext::build(l.cfg.clone(), &mut |r| dev.upload(&piece(&merged, r), DType::F32)).unwrap();
    let (logits_m, g_m) = run(&mut full);
    let e = rel_err(&logits, &logits_m);
    println!("llava lora vs merged logits: rel err {e:.2e}");
    assert!(e <= 1e-5, "logits with adapters vs merged weights: {e:.2e}");
    check_chain_rule("llava cpu", &lora_vals, &lg, &g_m, cfg.scale() as f64, 1e-4);
    assert_eq!(lg.len(), l.tdims.n_layers * 4 * 2);
}

#[test]
fn lora_sft_steps_lower_the_loss_and_keep_the_base() {
    let dev = Device::Cpu;
    let mut m = tiny::build(&dev, tiny_cfg(), 3).unwrap();
    m.enable_lora(&dev, &lora_cfg(8, 16.0, &DEFAULT_TARGETS)).unwrap();
    let snapshot = |m: &VlModel| m.param_entries().iter().map(|(_, b)| dev.to_vec(b).unwrap()).collect::<Vec<_>>();
    let n_lora = m.lora().unwrap().num_params();
    let mut vl = VlModel::from(m);
    let base = snapshot(&vl);
    let p = demo_batch(3);
    let rc = Recompute::default();
    let (nll0, n) = nll_micro_batch(&dev, &mut vl, &p, &rc, false).unwrap();
    let hp = AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.0 };
    let mut opt = Optimizer::new(&dev, hp, &vl.trainable_entries(), &|_| true).unwrap();
    assert_eq!(opt.num_params(), n_lora, "the optimizer holds exactly the adapters");
    let mut losses = Vec::new();
    for _ in 0..8 {
        vl.zero_grads(&dev).unwrap();
        let (nll, k) = nll_micro_batch(&dev, &mut vl, &p, &rc, true).unwrap();
        losses.push(nll / k);
        let pg = vl.params_and_grads();
        assert!(pg.iter().all(|(r, _, _)| r.name.contains(".lora_")), "a base tensor is being trained");
        opt.step(&dev, pg, 1e-2, 1.0 / k, 1.0).unwrap();
    }
    let (nll1, _) = nll_micro_batch(&dev, &mut vl, &p, &rc, false).unwrap();
    let (l0, l1) = (nll0 / n, nll1 / n);
    println!("lora sft: loss {l0:.4} -> {l1:.4} over 8 steps ({losses:?}); {n_lora} adapter values trained");
    assert!(l1 < 0.8 * l0, "the loss did not fall enough: {l0:.4} -> {l1:.4}");
    let after = snapshot(&vl);
    for (i, (a, b)) in base.iter().zip(&after).enumerate() {
        assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "base tensor {i} changed");
    }
}

/// KV-cached prefill and decoding run the adapters too: chunked `extend` over one dialogue
/// gives the full forward's logits.
#[test]
fn lora_kv_cache_matches_full_forward() {
    let dev = Device::Cpu;
    let p = demo_batch(1);
    let mut m = qwen(&dev, DType::F32);
    let base =
        dev.to_vec(&m.logits(&dev, &m.forward(&dev, &p.batch(), &Recompute::default()).unwrap()).unwrap()).unwrap();
    m.enable_lora(&dev, &lora_cfg(4, 8.0, QWEN_ALL)).unwrap();
    m.zero_grads(&dev).unwrap();
    randomize_b(&dev, m.params_and_grads(), DType::F32);
    let want =
        dev.to_vec(&m.logits(&dev, &m.forward(&dev, &p.batch(), &Recompute::default()).unwrap()).unwrap()).unwrap();
    assert!(rel_err(&want, &base) > 1e-4, "the adapters should change the logits");
    let s = p.ids.len();
    // The whole prompt (with its images) first, then the last 3 tokens one at a time.
    let split = s - 3;
    let mut sess = m.new_session(&dev, 1, s).unwrap();
    let rows = |a: usize, b: usize| (0..3).flat_map(|r| p.pos3[r * s + a..r * s + b].to_vec()).collect::<Vec<i32>>();
    let mut got = dev
        .to_vec(
            &m.extend(&dev, &mut sess, &p.ids[..split], &rows(0, split), split, &p.pixels, &p.grids, false).unwrap(),
        )
        .unwrap();
    for t in split..s {
        got.extend(
            dev.to_vec(&m.extend(&dev, &mut sess, &p.ids[t..t + 1], &rows(t, t + 1), 1, &[], &[], false).unwrap())
                .unwrap(),
        );
    }
    let e = rel_err(&got, &want);
    println!("lora kv cache vs full forward: logits rel err {e:.2e}");
    assert!(e <= 1e-5, "cached decoding with adapters: {e:.2e}");
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("am3-lora-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn lora_merged_save_reloads_with_the_same_logits() {
    let dev = Device::Cpu;
    let p = demo_batch(2);
    let mut m = qwen(&dev, DType::F32);
    m.enable_lora(&dev, &lora_cfg(4, 8.0, QWEN_ALL)).unwrap();
    m.zero_grads(&dev).unwrap();
    randomize_b(&dev, m.params_and_grads(), DType::F32);
    let vl = VlModel::from(m);
    let rc = Recompute::default();
    let want = dev.to_vec(&vl.logits(&dev, &vl.forward(&dev, &p, &rc).unwrap()).unwrap()).unwrap();
    let dir = tmp("merged");
    vl.save_merged(&dev, &dir, SaveDtype::F32).unwrap();
    let back = QwenVl::load(&dev, &dir).unwrap();
    assert!(back.lora().is_none());
    let got = dev.to_vec(&back.logits(&dev, &back.forward(&dev, &p.batch(), &rc).unwrap()).unwrap()).unwrap();
    let e = rel_err(&got, &want);
    println!("merged save reloaded: logits rel err {e:.2e} vs the LoRA model");
    assert!(e <= 1e-5, "merged checkpoint logits differ: {e:.2e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn lora_adapter_files_have_peft_names_and_config() {
    let dev = Device::Cpu;
    let mut m = qwen(&dev, DType::F32);
    let (nl, vd, d) = (m.tdims.n_layers, m.vdims.block.d, m.tdims.layer.d);
    let (q, kv, depth) = (m.tdims.layer.q_dim(), m.tdims.layer.kv_dim(), m.vdims.depth);
    m.enable_lora(&dev, &lora_cfg(4, 8.0, &["q_proj", "v_proj", "visual.qkv"])).unwrap();
    m.zero_grads(&dev).unwrap();
    randomize_b(&dev, m.params_and_grads(), DType::F32);
    let vals = assemble(&dev, m.lora().unwrap().entries()).unwrap();
    let vl = VlModel::from(m);
    let dir = tmp("adapter");
    vl.save_lora_adapter(&dev, &dir, "Qwen/Qwen2.5-VL-7B-Instruct", SaveDtype::F32).unwrap();
    let t = read_tensor_file(dir.join(ADAPTER_WEIGHTS)).unwrap();
    let mut want: Vec<(String, Vec<usize>)> = Vec::new();
    for i in 0..nl {
        for (m, out) in [("q_proj", q), ("v_proj", kv)] {
            want.push((
                format!("base_model.model.model.language_model.layers.{i}.self_attn.{m}.lora_A.weight"),
                vec![4, d],
            ));
            want.push((
                format!("base_model.model.model.language_model.layers.{i}.self_attn.{m}.lora_B.weight"),
                vec![out, 4],
            ));
        }
    }
    for i in 0..depth {
        want.push((format!("base_model.model.model.visual.blocks.{i}.attn.qkv.lora_A.weight"), vec![4, vd]));
        want.push((format!("base_model.model.model.visual.blocks.{i}.attn.qkv.lora_B.weight"), vec![3 * vd, 4]));
    }
    assert_eq!(t.len(), want.len(), "keys: {:?}", t.keys().collect::<Vec<_>>());
    for (name, shape) in &want {
        let (s, v) = t.get(name).unwrap_or_else(|| panic!("{name} missing from {ADAPTER_WEIGHTS}"));
        assert_eq!(s, shape, "{name}");
        let v32: Vec<f32> = v.iter().map(|&x| x as f32).collect();
        // In memory the module path is the canonical checkpoint name.
        let internal =
            name.replace("model.model.language_model.", "model.model.").replace("model.model.visual.", "model.visual.");
        assert_eq!(v32, vals[&internal].1, "{name}: saved values differ");
    }
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(ADAPTER_CONFIG)).unwrap()).unwrap();
    println!("adapter_config.json: {c}");
    assert_eq!(c["peft_type"], "LORA");
    assert_eq!(c["task_type"], "CAUSAL_LM");
    assert_eq!(c["r"], 4);
    assert_eq!(c["lora_alpha"].as_f64(), Some(8.0));
    assert_eq!(c["base_model_name_or_path"], "Qwen/Qwen2.5-VL-7B-Instruct");
    // transformers' module paths (Qwen2_5_VLForConditionalGeneration), which PEFT full-matches.
    assert_eq!(
        c["target_modules"],
        r"(?:model\.language_model\.layers\.\d+\.self_attn\.q_proj|model\.language_model\.layers\.\d+\.self_attn\.v_proj|model\.visual\.blocks\.\d+\.attn\.qkv)"
    );
    let hidden: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "staging files left behind: {hidden:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn sft_args(out: &Path, steps: u64, save_every: u64) -> SftArgs {
    SftArgs {
        out: Some(out.to_path_buf()),
        steps: Some(steps),
        save_every: Some(save_every),
        device: Some(DevicePref::Cpu),
        lora_rank: Some(4),
        lora_targets: Some("q_proj, k_proj,v_proj,o_proj".into()),
        lr: Some(1e-2),
        ..Default::default()
    }
}

#[test]
fn lora_sft_cli_adapter_resume_and_merged() {
    // Bad flag combinations are errors.
    let bad = SftArgs { lora_targets: Some("q_proj".into()), ..Default::default() };
    assert!(bad.resolve().is_err(), "--lora-targets without --lora-rank");
    let bad = SftArgs { lora_rank: Some(4), lora_targets: Some("qproj".into()), ..Default::default() };
    assert!(bad.resolve().unwrap_err().to_string().contains("qproj"));
    let bad = SftArgs { lora_rank: Some(4), lora_save: Some("both".into()), ..Default::default() };
    assert!(bad.resolve().is_err());
    let (_, plan) = SftArgs { lora_rank: Some(8), ..Default::default() }.resolve().unwrap();
    assert_eq!((plan.lora_alpha, plan.lora_targets.len(), plan.lora_save.as_str()), (16.0, 7, "merged"));

    // Adapter checkpoints, and a bit-for-bit resume.
    let a = tmp("cli-a");
    let adapter = |o: &Path| SftArgs { lora_save: Some("adapter".into()), ..sft_args(o, 4, 2) };
    let ck_a = sft::run(adapter(&a)).unwrap();
    for f in [ADAPTER_WEIGHTS, ADAPTER_CONFIG, "tokenizer.json", "trainer_state.json"] {
        assert!(ck_a.join(f).is_file(), "adapter checkpoint lacks {f}");
    }
    assert!(!ck_a.join("model.safetensors").exists(), "an adapter checkpoint has no full weights");
    // The tiny default exists nowhere else: its base is exported beside the run, by absolute path.
    let ac: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck_a.join(ADAPTER_CONFIG)).unwrap()).unwrap();
    let base = std::fs::canonicalize(a.join("base-model")).unwrap();
    assert_eq!(ac["base_model_name_or_path"], base.to_str().unwrap());
    assert!(base.join("model.safetensors").is_file() && base.join("tokenizer_config.json").is_file());
    let t = read_tensor_file(ck_a.join(ADAPTER_WEIGHTS)).unwrap();
    assert_eq!(t.len(), 2 * 4 * 2, "2 layers × 4 modules × (A, B)");
    let b_norm: f64 = t
        .iter()
        .filter(|(n, _)| n.ends_with("lora_B.weight"))
        .map(|(_, (_, v))| v.iter().map(|x| x * x).sum::<f64>())
        .sum();
    assert!(b_norm > 0.0, "training left every B at zero");
    let m = read_metrics(a.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = m.iter().filter_map(|v| v.get("loss").and_then(|x| x.as_f64())).collect();
    println!("lora sft (adapter) losses: {losses:?}");
    assert_eq!(losses.len(), 4);
    let b = tmp("cli-b");
    sft::run(SftArgs { stop_after: Some(3), ..adapter(&b) }).unwrap();
    assert!(latest_checkpoint(&b).unwrap().unwrap().ends_with("checkpoint-000002"));
    let ck_b = sft::run(SftArgs { resume: true, ..adapter(&b) }).unwrap();
    let bytes = |p: PathBuf| std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(bytes(ck_a.join(ADAPTER_WEIGHTS)) == bytes(ck_b.join(ADAPTER_WEIGHTS)), "adapters differ after resume");

    // Merged checkpoints load as plain Qwen2.5-VL models.
    let c = tmp("cli-c");
    let ck_c = sft::run(sft_args(&c, 2, 2)).unwrap();
    assert!(!ck_c.join(ADAPTER_WEIGHTS).exists());
    let back = QwenVl::load(&Device::Cpu, &ck_c).unwrap();
    assert!(back.lora().is_none());
    for d in [a, b, c] {
        let _ = std::fs::remove_dir_all(d);
    }
}

// ---------------------------------------------------------------------------------------------
// The GPU.

/// The tiny Qwen with adapters on every projection (text and vision) on CUDA, f32 and bf16,
/// against the CPU: logits and every adapter gradient.
#[test]
fn lora_cuda_model_matches_cpu() {
    let Some(gpu) = cuda_or_skip("lora_cuda_model_matches_cpu") else { return };
    let cpu_dev = Device::Cpu;
    let p = demo_batch(2);
    let cfg = lora_cfg(8, 16.0, QWEN_ALL);
    let make = |dev: &Device, dt: DType| {
        let mut m = qwen(dev, dt);
        m.enable_lora(dev, &cfg).unwrap();
        m.zero_grads(dev).unwrap();
        randomize_b(dev, m.params_and_grads(), dt);
        m
    };
    let (want_logits, want_g) = qwen_run(&cpu_dev, &mut make(&cpu_dev, DType::F32), &p, &Recompute::default());
    for (dt, tol_logits, tol_grads) in [(DType::F32, 1e-4, 1e-3), (DType::BF16, 3e-2, 6e-2)] {
        for rc in [Recompute::default(), Recompute::all(2)] {
            let tag = format!("lora cuda {} recompute={}", dt.suffix(), rc.vision);
            let (logits, g) = qwen_run(&gpu, &mut make(&gpu, dt), &p, &rc);
            let e = rel_err(&logits, &want_logits);
            println!("{tag} logits: rel err {e:.2e} (tol {tol_logits:.0e})");
            assert!(e <= tol_logits, "{tag} logits: {e:.2e}");
            assert_eq!(g.len(), want_g.len());
            let mut failed = Vec::new();
            for (name, (_, w)) in &want_g {
                let e = rel_err(&g[name].1, w);
                println!("{tag} grad {name}: rel err {e:.2e}");
                if e > tol_grads {
                    failed.push(format!("{name}: {e:.2e}"));
                }
            }
            assert!(failed.is_empty(), "{tag}: adapter gradients over {tol_grads:.0e}: {failed:?}");
        }
    }
}
