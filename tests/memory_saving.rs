//! Issue #14's memory savings, on the CPU:
//! - LoRA: the frozen lm_head gets no gradient. `logprob::bwd` with `dlm_head` None skips the dW
//!   GEMM and gives the same d hidden bit for bit; the LoRA state allocates no [V, D] sink; the
//!   adapters' gradients of the SFT path (`backward_logprobs`) and of the GRPO path
//!   (`backward_logprobs_scaled`, 1/T) equal those of the old path (the head's dW still run into
//!   a sink) bit for bit, on a tiny Qwen2.5-VL (images, vision adapters) and a tiny LLaVA-NeXT.
mod common;
#[path = "support/tiny_llava.rs"]
mod tiny_llava;
use am3safety::models::common::lora::LoraConfig;
use am3safety::models::common::params::NamedTensors;
use am3safety::models::common::train_state::TrainState;
use am3safety::models::llava_next::model::{Batch as LlavaBatch, LlavaNext};
use am3safety::models::qwen2_5_vl::model::{QwenVl, Recompute};
use am3safety::models::tiny;
use am3safety::ops::{elementwise, logprob};
use am3safety::rng::Rng;
use am3safety::stages::examples::{pack, Packed};
use am3safety::stages::sft::{self, load_examples};
use am3safety::tensor::{Buf, DType, Device};

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
    logprob::fwd(&dev, &mut lp, &mut ls, None, &x, &w, &tg, None, t, h, v).unwrap();
    let (mut dh1, mut dh2) = (dev.zeros_f32(t * h).unwrap(), dev.zeros_f32(t * h).unwrap());
    let mut dw = dev.zeros_f32(v * h).unwrap();
    logprob::bwd(&dev, &mut dh1, Some(&mut dw), &g, &x, &w, &tg, &ls, t, h, v).unwrap();
    logprob::bwd(&dev, &mut dh2, None, &g, &x, &w, &tg, &ls, t, h, v).unwrap();
    assert_eq!(bits(dh1.host().unwrap()), bits(dh2.host().unwrap()), "d hidden depends on the dW path");
    assert!(dw.host().unwrap().iter().any(|&x| x != 0.0), "the Some path should still write dW");
    // A dW of the wrong size is still an error, not a panic.
    let mut bad = dev.zeros_f32(v * h - 1).unwrap();
    let e = logprob::bwd(&dev, &mut dh1, Some(&mut bad), &g, &x, &w, &tg, &ls, t, h, v).unwrap_err();
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
    logprob::bwd(dev, &mut dxf, Some(&mut sink), d, f.final_hidden(), m.params.text.head(), tb, lse, s, dm, v).unwrap();
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
        logprob::bwd(&dev, &mut dxf, Some(&mut sink), &d, f.final_hidden(), m.params.text.head(), &tb, &lse, s, dm, v)
            .unwrap();
        if scale != 1.0 {
            elementwise::scale_inplace(&dev, &mut dxf, scale, s * dm).unwrap();
        }
        m.backward(&dev, &f, &dxf).unwrap();
        same_grads(&format!("llava lora, hidden scale {scale}"), &new, &m.grads_by_name(&dev).unwrap());
    }
}
