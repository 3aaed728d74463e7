//! Issue #14's two memory savings, on the CPU:
//! - LoRA: the frozen lm_head gets no gradient. `logprob::bwd` with `dlm_head` None skips the dW
//!   GEMM and gives the same d hidden bit for bit; the LoRA state allocates no [V, D] sink; the
//!   adapters' gradients of the SFT path (`backward_logprobs`) and of the GRPO path
//!   (`backward_logprobs_scaled`, 1/T) equal those of the old path (the head's dW still run into
//!   a sink) bit for bit, on a tiny Qwen2.5-VL (images, vision adapters) and a tiny LLaVA-NeXT.
//! - `--optim-step per-layer`: N SFT steps give checkpoints (weights and AdamW state) that are
//!   byte-identical to N whole-model steps, on the tiny Qwen and a tiny LLaVA, resume included;
//!   the flag is refused with clipping, accumulation or LoRA; the per-layer gradient layout holds
//!   no decoder layer, and the memory plan's gradient bytes drop by n_layers − 1 layers. The same
//!   for `am3 grpo` (2 steps × 2 epochs × 3 mini-batches = 12 AdamW steps, resume included), and
//!   its refusal of a mini-batch that spans several micro-batches.
//! - `--freeze-vision`: the backward skips the tower; every other gradient is bit-identical to the
//!   full backward's (tiny Qwen and tiny LLaVA, with images).
mod common;
#[path = "support/tiny_llava.rs"]
mod tiny_llava;
use am3safety::bench::plan::{Plan, PlanInput};
use am3safety::grpo::memory::{MemoryInput, MemoryPlan};
use am3safety::models::common::decoder::LayerParams;
use am3safety::models::common::lora::LoraConfig;
use am3safety::models::common::params::{GradStore, NamedTensors};
use am3safety::models::common::train_state::TrainState;
use am3safety::models::llava_next::model::{Batch as LlavaBatch, LlavaNext};
use am3safety::models::qwen2_5_vl::model::{QwenVl, Recompute};
use am3safety::models::tiny;
use am3safety::ops::{elementwise, logprob};
use am3safety::rng::Rng;
use am3safety::stages::examples::{pack, Packed};
use am3safety::stages::grpo::{self, GrpoArgs};
use am3safety::stages::model::VlModel;
use am3safety::stages::sft::{self, load_examples, SftArgs};
use am3safety::tensor::{Buf, DType, Device, DevicePref};
use am3safety::train::metrics::read_metrics;
use common::*;
use std::path::{Path, PathBuf};

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn same_grads(tag: &str, a: &NamedTensors, b: &NamedTensors) {
    assert_eq!(a.len(), b.len(), "{tag}: gradient sets differ in size");
    assert!(!a.is_empty(), "{tag}: no gradients");
    let mut nonzero = 0;
    for (name, (shape, va)) in a {
        let (sb, vb) = b.get(name).unwrap_or_else(|| panic!("{tag}: `{name}` missing"));
        assert_eq!(shape, sb, "{tag}: `{name}` shape");
        assert_eq!(bits(va), bits(vb), "{tag}: `{name}` differs");
        nonzero += va.iter().any(|&x| x != 0.0) as usize;
    }
    assert!(nonzero > 0, "{tag}: every gradient is zero");
    println!("{tag}: {} adapter gradients bit-identical ({nonzero} non-zero)", a.len());
}

// ---------------------------------------------------------------------------------------------
// 1. LoRA: no lm_head gradient.

#[test]
fn logprob_bwd_without_dw_gives_the_same_dhidden() {
    let dev = Device::Cpu;
    let (t, h, v) = (13, 24, 57);
    let mut rng = Rng::new(5);
    let x = dev.upload(&rng.normal_vec(t * h, 1.0), DType::F32).unwrap();
    let w = dev.upload(&rng.normal_vec(v * h, 0.3), DType::F32).unwrap();
    let tg: Vec<i32> = (0..t).map(|i| ((i * 7 + 3) % v) as i32).collect();
    let tg = dev.upload_i32(&tg).unwrap();
    let g: Vec<f32> = (0..t).map(|i| if i % 4 == 1 { 0.0 } else { rng.normal() as f32 }).collect();
    let g = dev.upload(&g, DType::F32).unwrap();
    let (mut lp, mut ls) = (dev.zeros_f32(t).unwrap(), dev.zeros_f32(t).unwrap());
    logprob::fwd(
        &dev,
        logprob::FwdOut { logp: &mut lp, lse: &mut ls, entropy: None },
        logprob::Inputs { hidden: &x, lm_head: &w, targets: &tg, dims: logprob::Dims { t, h, v } },
        None,
    )
    .unwrap();
    let (mut dh1, mut dh2) = (dev.zeros_f32(t * h).unwrap(), dev.zeros_f32(t * h).unwrap());
    let mut dw = dev.zeros_f32(v * h).unwrap();
    logprob::bwd(
        &dev,
        logprob::BwdOut { dhidden: &mut dh1, dlm_head: Some(&mut dw) },
        logprob::Inputs { hidden: &x, lm_head: &w, targets: &tg, dims: logprob::Dims { t, h, v } },
        &g,
        &ls,
    )
    .unwrap();
    logprob::bwd(
        &dev,
        logprob::BwdOut { dhidden: &mut dh2, dlm_head: None },
        logprob::Inputs { hidden: &x, lm_head: &w, targets: &tg, dims: logprob::Dims { t, h, v } },
        &g,
        &ls,
    )
    .unwrap();
    assert_eq!(bits(dh1.host().unwrap()), bits(dh2.host().unwrap()), "d hidden depends on the dW path");
    assert!(dw.host().unwrap().iter().any(|&x| x != 0.0), "the Some path should still write dW");
    // A dW of the wrong size is still an error, not a panic.
    let mut bad = dev.zeros_f32(v * h - 1).unwrap();
    let e = logprob::bwd(
        &dev,
        logprob::BwdOut { dhidden: &mut dh1, dlm_head: Some(&mut bad) },
        logprob::Inputs { hidden: &x, lm_head: &w, targets: &tg, dims: logprob::Dims { t, h, v } },
        &g,
        &ls,
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("dlm_head"), "{e:#}");
}

fn demo_batch(n: usize) -> Packed {
    let tok = tiny::tokenizer().unwrap();
    let cfg = tiny::config(&tok).unwrap();
    let ex = load_examples(&sft::demo_data(), &tok, &cfg, &tiny::preprocessor().unwrap()).unwrap();
    let refs: Vec<_> = ex.iter().filter(|e| !e.grids.is_empty()).take(n).collect();
    assert_eq!(refs.len(), n, "the demo set should have {n} examples with images");
    pack(&refs)
}

/// Random B (A is random already), so that every adapter gradient is non-zero.
fn randomize_adapters(dev: &Device, pg: Vec<(am3safety::models::common::params::ParamRef, &mut Buf, &Buf)>) {
    let mut rng = Rng::new(99);
    for (r, p, _) in pg {
        if r.name.contains("lora_B") {
            *p = dev.upload(&rng.normal_vec(r.numel(), 0.05), p.dtype()).unwrap();
        }
    }
}

/// The pre-change head backward: d hidden through `logprob::bwd` with the head's dW run into a
/// [V, D] sink, then the model's backward from d hidden.
fn old_head_path(
    dev: &Device, m: &mut QwenVl, f: &am3safety::models::qwen2_5_vl::model::QwenFwd, tb: &Buf, lse: &Buf, d: &Buf,
    scale: f32,
) {
    let (s, dm, v) = (f.tokens(), m.tdims.layer.d, m.tdims.vocab);
    let mut sink = dev.zeros_f32(v * dm).unwrap();
    let mut dxf = dev.zeros(m.dtype(), s * dm).unwrap();
    logprob::bwd(
        dev,
        logprob::BwdOut { dhidden: &mut dxf, dlm_head: Some(&mut sink) },
        logprob::Inputs {
            hidden: f.final_hidden(),
            lm_head: m.params.text.head(),
            targets: tb,
            dims: logprob::Dims { t: s, h: dm, v },
        },
        d,
        lse,
    )
    .unwrap();
    if scale != 1.0 {
        elementwise::scale_inplace(dev, &mut dxf, scale, s * dm).unwrap();
    }
    m.backward(dev, f, &dxf).unwrap();
}

#[test]
fn lora_qwen_frozen_head_grads_match_the_sink_path() {
    let dev = Device::Cpu;
    let p = demo_batch(2);
    let mut m = tiny::build(&dev, tiny::config(&tiny::tokenizer().unwrap()).unwrap(), 3).unwrap();
    let targets = ["q_proj", "v_proj", "down_proj", "visual.qkv", "visual.up_proj"];
    m.enable_lora(&dev, &LoraConfig::new(4, 8.0, &targets, 5).unwrap()).unwrap();
    m.zero_grads(&dev).unwrap();
    randomize_adapters(&dev, m.params_and_grads());
    // No sink: the LoRA gradients are the adapters' f32 values and nothing else.
    let l = m.lora().unwrap();
    assert_eq!(l.grad_bytes(), l.num_params() * 4, "the LoRA state holds more than the adapters' gradients");
    assert!(m.lm_head_grad(&dev).unwrap().is_none(), "a frozen head has no gradient buffer");
    let f = m.forward(&dev, &p.batch(), &Recompute::default()).unwrap();
    let (tb, wb) = (dev.upload_i32(&p.targets).unwrap(), dev.upload(&p.weights, DType::F32).unwrap());
    let (_, lse) = m.logprobs(&dev, &f, &tb, Some(&wb)).unwrap();
    // SFT: dlogp = −weight.
    let neg: Vec<f32> = p.weights.iter().map(|&w| -w).collect();
    let d = dev.upload(&neg, DType::F32).unwrap();
    m.zero_grads(&dev).unwrap();
    m.backward_logprobs(&dev, &f, &tb, &lse, &d).unwrap();
    let new = m.grads_by_name(&dev).unwrap();
    m.zero_grads(&dev).unwrap();
    old_head_path(&dev, &mut m, &f, &tb, &lse, &d, 1.0);
    same_grads("qwen lora sft", &new, &m.grads_by_name(&dev).unwrap());
    // GRPO: arbitrary per-token dlogp on hidden states scaled by 1/T.
    let mut rng = Rng::new(7);
    let dl: Vec<f32> = p.weights.iter().map(|&w| w * rng.normal() as f32).collect();
    let d = dev.upload(&dl, DType::F32).unwrap();
    m.zero_grads(&dev).unwrap();
    m.backward_logprobs_scaled(&dev, &f, &tb, &lse, &d, 1.0 / 0.7).unwrap();
    let new = m.grads_by_name(&dev).unwrap();
    m.zero_grads(&dev).unwrap();
    old_head_path(&dev, &mut m, &f, &tb, &lse, &d, 1.0 / 0.7);
    same_grads("qwen lora grpo (T = 0.7)", &new, &m.grads_by_name(&dev).unwrap());
    assert_eq!(m.lora().unwrap().grad_bytes(), m.lora().unwrap().num_params() * 4);
}

#[test]
fn lora_llava_frozen_head_grads_match_the_sink_path() {
    let dev = Device::Cpu;
    let tok = tiny_llava::llava_tokenizer();
    let mut m: LlavaNext = tiny_llava::tiny_model(tiny_llava::tiny_config(&tok, "mistral"), 4);
    m.enable_lora(&dev, &LoraConfig::new(4, 8.0, &["q_proj", "o_proj", "gate_proj"], 5).unwrap()).unwrap();
    m.zero_grads(&dev).unwrap();
    randomize_adapters(&dev, m.params_and_grads());
    let l = m.lora().unwrap();
    assert_eq!(l.grad_bytes(), l.num_params() * 4, "the LoRA state holds more than the adapters' gradients");
    let v = m.tdims.vocab;
    let mut rng = Rng::new(3);
    let ids: Vec<i32> = (0..21).map(|_| (rng.next_u64() % (v as u64 - 8)) as i32).collect();
    let cu = [0, 9, 21];
    let f =
        m.forward(&dev, &LlavaBatch { ids: &ids, cu_seqlens: &cu, pixels: &[], image_sizes: &[] }, &Default::default());
    let f = f.unwrap();
    let targets: Vec<i32> = ids.iter().skip(1).copied().chain([0]).collect();
    let mask: Vec<f32> = (0..ids.len()).map(|i| if i % 3 == 0 { 0.0 } else { 1.0 }).collect();
    let (tb, mb) = (dev.upload_i32(&targets).unwrap(), dev.upload(&mask, DType::F32).unwrap());
    let (_, lse) = m.logprobs(&dev, &f, &tb, Some(&mb)).unwrap();
    let dl: Vec<f32> = mask.iter().map(|&w| w * rng.normal() as f32).collect();
    let d = dev.upload(&dl, DType::F32).unwrap();
    for scale in [1.0f32, 1.0 / 0.7] {
        m.zero_grads(&dev).unwrap();
        m.backward_logprobs_scaled(&dev, &f, &tb, &lse, &d, scale).unwrap();
        let new = m.grads_by_name(&dev).unwrap();
        // The old path: dW into a sink, then the backward from d hidden.
        m.zero_grads(&dev).unwrap();
        let (s, dm) = (f.tokens(), m.tdims.layer.d);
        let mut sink = dev.zeros_f32(v * dm).unwrap();
        let mut dxf = dev.zeros(m.dtype(), s * dm).unwrap();
        logprob::bwd(
            &dev,
            logprob::BwdOut { dhidden: &mut dxf, dlm_head: Some(&mut sink) },
            logprob::Inputs {
                hidden: f.final_hidden(),
                lm_head: m.params.text.head(),
                targets: &tb,
                dims: logprob::Dims { t: s, h: dm, v },
            },
            &d,
            &lse,
        )
        .unwrap();
        if scale != 1.0 {
            elementwise::scale_inplace(&dev, &mut dxf, scale, s * dm).unwrap();
        }
        m.backward(&dev, &f, &dxf).unwrap();
        same_grads(&format!("llava lora, hidden scale {scale}"), &new, &m.grads_by_name(&dev).unwrap());
    }
}

// ---------------------------------------------------------------------------------------------
// 2. The per-layer optimizer step.

fn sft_args(model: Option<&Path>, out: &Path, steps: u64, per_layer: bool) -> SftArgs {
    SftArgs {
        model: model.map(Path::to_path_buf),
        out: Some(out.to_path_buf()),
        steps: Some(steps),
        save_every: Some(2),
        warmup: Some(1),
        weight_decay: Some(0.05),
        lr: Some(2e-3),
        clip: Some(0.0),
        batch_tokens: model.map(|_| 640),
        device: Some(DevicePref::Cpu),
        optim_step: Some(if per_layer { "per-layer" } else { "whole" }.into()),
        ..Default::default()
    }
}

/// Every file of a checkpoint's weights and optimizer state, as bytes.
fn checkpoint_bytes(ck: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut dirs = vec![ck.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "safetensors") {
                out.push((p.strip_prefix(ck).unwrap().display().to_string(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    assert!(out.iter().any(|(n, _)| n.starts_with("train_state")), "{}: no optimizer state", ck.display());
    out
}

fn losses(out: &Path) -> Vec<u64> {
    let m = read_metrics(out.join("metrics.jsonl")).unwrap();
    m.iter().filter_map(|v| v.get("loss").and_then(|x| x.as_f64())).map(f64::to_bits).collect()
}

fn same_checkpoints(tag: &str, a: &Path, b: &Path) {
    let (x, y) = (checkpoint_bytes(a), checkpoint_bytes(b));
    assert_eq!(x.iter().map(|f| &f.0).collect::<Vec<_>>(), y.iter().map(|f| &f.0).collect::<Vec<_>>(), "{tag}");
    for ((n, p), (_, q)) in x.iter().zip(&y) {
        assert!(p == q, "{tag}: {n} differs between the whole-model and the per-layer step");
    }
    println!("{tag}: {} safetensors files byte-identical", x.len());
}

/// Whole vs per-layer SFT for 4 steps, and per-layer stopped after 2 and resumed.
fn per_layer_matches_whole(tag: &str, model: Option<&Path>, root: &Path) {
    let (w, p, r) = (root.join("whole"), root.join("per-layer"), root.join("resumed"));
    let run = |a: SftArgs| sft::run(a).unwrap_or_else(|e| panic!("{tag}: {e:#}"));
    let ck_w = run(sft_args(model, &w, 4, false));
    let ck_p = run(sft_args(model, &p, 4, true));
    same_checkpoints(tag, &ck_w, &ck_p);
    assert_eq!(losses(&w), losses(&p), "{tag}: the step losses differ");
    run(SftArgs { stop_after: Some(2), ..sft_args(model, &r, 4, true) });
    let ck_r = run(SftArgs { resume: true, ..sft_args(model, &r, 4, true) });
    same_checkpoints(&format!("{tag}, resumed at step 2"), &ck_w, &ck_r);
}

#[test]
fn per_layer_step_is_bit_identical_qwen() {
    let root = fresh_tmp_dir("memsave-qwen");
    per_layer_matches_whole("tiny qwen sft", None, &root);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn per_layer_step_is_bit_identical_llava() {
    let root = fresh_tmp_dir("memsave-llava");
    let src = root.join("src");
    tiny_llava::write_tiny_dir(&src, "mistral", 11);
    per_layer_matches_whole("tiny llava sft", Some(&src), &root);
    let _ = std::fs::remove_dir_all(&root);
}

/// `--freeze-vision`: the backward skips the tower. Every other gradient is bit-identical to the
/// full backward's, and the tower's are zero (the full backward's are not).
fn frozen_vision_skips_only_the_tower(tag: &str, model: Option<&Path>) {
    let dev = Device::Cpu;
    let mut l = sft::load_model(&dev, model, 0).unwrap();
    let ex = sft::load_examples_for(&sft::demo_data(), &l).unwrap();
    let refs: Vec<_> = ex.iter().filter(|e| !e.pixels.is_empty()).take(2).collect();
    assert_eq!(refs.len(), 2, "{tag}: the demo set should have examples with images");
    let p = pack(&refs);
    let f = l.model.forward(&dev, &p, &Recompute::default()).unwrap();
    let (tb, wb) = (dev.upload_i32(&p.targets).unwrap(), dev.upload(&p.weights, DType::F32).unwrap());
    let (_, lse) = l.model.logprobs(&dev, &f, &tb, Some(&wb)).unwrap();
    let neg: Vec<f32> = p.weights.iter().map(|&w| -w).collect();
    let d = dev.upload(&neg, DType::F32).unwrap();
    let mut grads = |frozen: bool| {
        l.model.set_frozen_vision(frozen);
        l.model.zero_grads(&dev).unwrap();
        l.model.backward_logprobs(&dev, &f, &tb, &lse, &d).unwrap();
        l.model.grads_by_name(&dev).unwrap()
    };
    let (full, frozen) = (grads(false), grads(true));
    // grads_by_name uses the checkpoint's names; is_vision the canonical ones.
    let m = &l.model;
    let vision: std::collections::BTreeSet<String> = m
        .param_entries()
        .iter()
        .filter(|(r, _)| m.is_vision(&r.name))
        .map(|(r, _)| m.stored_name(&r.name).to_string())
        .collect();
    let (mut tower, mut rest) = (0, 0);
    for (name, (_, g)) in &full {
        let h = &frozen[name].1;
        if vision.contains(name) {
            tower += 1;
            assert!(h.iter().all(|&x| x == 0.0), "{tag}: frozen tower gradient {name} is not zero");
        } else {
            rest += 1;
            assert!(bits(g) == bits(h), "{tag}: {name} differs with the tower frozen");
        }
    }
    let moved = full.iter().any(|(n, (_, g))| vision.contains(n) && g.iter().any(|&x| x != 0.0));
    assert!(tower > 0 && rest > 0 && moved, "{tag}: {tower} tower and {rest} other gradients (tower moved: {moved})");
}

#[test]
fn frozen_vision_skips_only_the_tower_qwen() {
    frozen_vision_skips_only_the_tower("tiny qwen", None);
}

#[test]
fn frozen_vision_skips_only_the_tower_llava() {
    let root = fresh_tmp_dir("memsave-frozen-llava");
    tiny_llava::write_tiny_dir(&root, "mistral", 11);
    frozen_vision_skips_only_the_tower("tiny llava", Some(&root));
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn per_layer_step_is_refused_with_clip_accumulation_or_lora() {
    let out = PathBuf::from("unused");
    let base = || sft_args(None, &out, 4, true);
    let err = |a: SftArgs| format!("{:#}", a.resolve().unwrap_err());
    assert!(err(SftArgs { clip: None, ..base() }).contains("--clip 0"), "the default clip of 1.0");
    assert!(err(SftArgs { clip: Some(0.5), ..base() }).contains("--clip 0"));
    assert!(err(SftArgs { grad_accum: Some(2), ..base() }).contains("--grad-accum 1"));
    assert!(err(SftArgs { lora_rank: Some(4), ..base() }).contains("full fine-tune"));
    assert!(err(SftArgs { optim_step: Some("layer".into()), ..base() }).contains("whole or per-layer"));
    let (_, plan) = base().resolve().unwrap();
    assert!(plan.per_layer());
    // The default stays the whole-model step, and is not written into trainer_state.json's plan
    // (so runs saved before the flag existed still resume).
    let (_, plan) = SftArgs::default().resolve().unwrap();
    assert!(!plan.per_layer());
    assert!(serde_json::to_value(&plan).unwrap().get("optim_step").is_none());
}

#[test]
fn per_layer_gradients_hold_no_layer_and_the_plan_counts_one() {
    let dev = Device::Cpu;
    let mut m = VlModel::from(tiny::build(&dev, tiny::config(&tiny::tokenizer().unwrap()).unwrap(), 1).unwrap());
    let td = m.tdims().clone();
    let layer_f32: usize =
        LayerParams::shapes(&td.layer, td.flags).iter().map(|(_, s)| s.iter().product::<usize>() * 4).sum();
    m.zero_grads(&dev).unwrap();
    let whole: usize = m.params_and_grads().iter().map(|(_, _, g)| g.len() * 4).sum();
    m.set_per_layer_grads(true);
    m.zero_grads(&dev).unwrap();
    let pg = m.params_and_grads();
    assert!(pg.iter().all(|(r, _, _)| !r.name.starts_with("model.layers.")), "a decoder layer's gradient is stored");
    let outer: usize = pg.iter().map(|(_, _, g)| g.len() * 4).sum();
    drop(pg);
    assert_eq!(outer, whole - td.n_layers * layer_f32, "the per-layer layout drops exactly the decoder layers");
    let plan = Plan::new(&m, PlanInput { seq: 256, kv_slots: 4, kv_len: 256 });
    for (tag, c, cuda) in [("cpu", &plan.cpu, false), ("cuda", &plan.cuda, true)] {
        assert!(c.grads_per_layer(cuda) < c.grads(cuda), "{tag}: the per-layer plan should need less");
        assert!(c.sft_step_per_layer(cuda) < c.sft_step(cuda, true), "{tag}");
    }
    // CPU: every gradient f32; the plan counts the rest plus one live layer.
    assert_eq!(plan.cpu.grads_f32, whole);
    assert_eq!(plan.cpu.grads_per_layer_f32, outer + layer_f32);
    assert_eq!(plan.cpu.grads_f32 - plan.cpu.grads_per_layer_f32, (td.n_layers - 1) * layer_f32);
    // The GRPO stage's plan (grpo::memory) likewise.
    let n_train: usize = m.trainable_entries().iter().map(|(r, _)| r.numel()).sum();
    let input = MemoryInput {
        trainable: n_train,
        reference: true,
        kv_cache: 0,
        batch_tokens: 256,
        recompute: true,
        store: GradStore::F32,
    };
    let mp = MemoryPlan::new(&dev, &m, input);
    assert_eq!(mp.grads, whole);
    let mp_l = mp.clone().per_layer(&dev, &m);
    assert_eq!(mp_l.grads, outer + layer_f32, "the GRPO plan with the per-layer step");
    assert_eq!(mp.peak() - mp_l.peak(), (td.n_layers - 1) * layer_f32);
    let j = plan.to_json();
    assert_eq!(j["cpu_f32"]["grads_per_layer_f32"].as_u64(), Some((outer + layer_f32) as u64));
    println!(
        "tiny qwen: gradients {whole} B whole, {} B per-layer ({} layers of {layer_f32} B)",
        outer + layer_f32,
        td.n_layers
    );
}

fn grpo_args(model: &Path, out: &Path, per_layer: bool) -> GrpoArgs {
    GrpoArgs {
        model: Some(model.to_path_buf()),
        out: Some(out.to_path_buf()),
        steps: Some(2),
        dialogues_per_step: Some(3),
        n: Some(3),
        max_new_tokens: Some(12),
        mini_batch: Some(4),
        ppo_epochs: Some(2),
        save_every: Some(1),
        lr: Some(1e-3),
        clip: Some(0.0),
        batch_tokens: Some(1 << 16),
        optim_step: Some(if per_layer { "per-layer" } else { "whole" }.into()),
        ..Default::default()
    }
}

#[test]
fn per_layer_step_is_bit_identical_grpo() {
    let root = fresh_tmp_dir("memsave-grpo");
    let sft_out = root.join("sft");
    let ck = sft::run(SftArgs {
        out: Some(sft_out),
        steps: Some(10),
        save_every: Some(10),
        device: Some(DevicePref::Cpu),
        ..Default::default()
    })
    .unwrap();
    let run = |a: GrpoArgs| grpo::run(a).unwrap_or_else(|e| panic!("{e:#}"));
    let ck_w = run(grpo_args(&ck, &root.join("whole"), false));
    let ck_p = run(grpo_args(&ck, &root.join("per-layer"), true));
    same_checkpoints("tiny qwen grpo", &ck_w, &ck_p);
    let r = root.join("resumed");
    run(GrpoArgs { stop_after: Some(1), ..grpo_args(&ck, &r, true) });
    let ck_r = run(GrpoArgs { resume: true, ..grpo_args(&ck, &r, true) });
    same_checkpoints("tiny qwen grpo, resumed at step 1", &ck_w, &ck_r);
    // LoRA GRPO (whole step, as before): a resumed run restores the adapters' masters too.
    let lora = |out: &Path| GrpoArgs { lora_rank: Some(4), optim_step: None, ..grpo_args(&ck, out, false) };
    let ck_a = run(lora(&root.join("lora")));
    let lr_dir = root.join("lora-resumed");
    run(GrpoArgs { stop_after: Some(1), ..lora(&lr_dir) });
    let ck_b = run(GrpoArgs { resume: true, ..lora(&lr_dir) });
    same_checkpoints("tiny qwen lora grpo, resumed at step 1", &ck_a, &ck_b);
    // Refusals: clipping, LoRA, and a mini-batch split into micro-batches (found at the update).
    let err = |a: GrpoArgs| format!("{:#}", a.resolve().unwrap_err());
    assert!(err(GrpoArgs { clip: None, ..grpo_args(&ck, &r, true) }).contains("--clip 0"));
    assert!(err(GrpoArgs { lora_rank: Some(4), ..grpo_args(&ck, &r, true) }).contains("full fine-tune"));
    let small = GrpoArgs { batch_tokens: Some(64), ..grpo_args(&ck, &root.join("small"), true) };
    let e = format!("{:#}", grpo::run(small).unwrap_err());
    assert!(e.contains("one micro-batch"), "{e}");
    let _ = std::fs::remove_dir_all(&root);
}
