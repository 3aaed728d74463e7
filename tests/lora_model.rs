//! LoRA in the models: zero B keeps the logits, adapter gradients follow the merged weight's
//! (Qwen2.5-VL and LLaVA-NeXT), the KV cache with adapters, CUDA against the CPU.
mod common;
use am3safety::models::common::lora::DEFAULT_TARGETS;
use am3safety::models::common::params::assemble;
use am3safety::models::common::train_state::TrainState;
use am3safety::models::llava_next::model::{Batch as LlavaBatch, LlavaNext};
use am3safety::models::qwen2_5_vl::model::{Extend, QwenVl, Recompute};
use am3safety::tensor::{DType, Device};
use common::*;

#[path = "support/lora_model.rs"]
mod lora_support;
use lora_support::*;

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
    assert_err("logits with adapters vs merged weights", e, Tol::LoraMerged);
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
    assert_err("logits with adapters vs merged weights", e, Tol::LoraMerged);
    check_chain_rule("llava cpu", &lora_vals, &lg, &g_m, cfg.scale() as f64, 1e-4);
    assert_eq!(lg.len(), l.tdims.n_layers * 4 * 2);
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
            &m.extend(
                &dev,
                &mut sess,
                Extend {
                    ids: &p.ids[..split],
                    pos3: &rows(0, split),
                    n_new: split,
                    pixels: &p.pixels,
                    grids: &p.grids,
                },
                false,
            )
            .unwrap(),
        )
        .unwrap();
    for t in split..s {
        got.extend(
            dev.to_vec(
                &m.extend(
                    &dev,
                    &mut sess,
                    Extend { ids: &p.ids[t..t + 1], pos3: &rows(t, t + 1), n_new: 1, pixels: &[], grids: &[] },
                    false,
                )
                .unwrap(),
            )
            .unwrap(),
        );
    }
    let e = rel_err(&got, &want);
    println!("lora kv cache vs full forward: logits rel err {e:.2e}");
    assert_err("cached decoding with adapters", e, Tol::KvCache);
}

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
