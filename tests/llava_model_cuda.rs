//! LLaVA-NeXT on CUDA (skipped without a GPU): the fixture checks in f32 and bf16 (and with the
//! bf16 gradient store), and a random Llama (MHA) model at the 7B head dims, CUDA bf16 against
//! the CPU (plus its CPU smoke run).
mod common;
#[path = "common/fixture_variant.rs"]
mod fixture_variant;
use am3safety::models::common::params::GradStore;
use am3safety::models::llava_next::config::TextFamily;
use am3safety::models::llava_next::model::Recompute;
use am3safety::tensor::{DType, Device};
use common::*;

#[path = "support/llava_model.rs"]
mod llava_model_support;
use llava_model_support::*;

/// The full check on CUDA in `dt`: tolerances (features / logits, grads, kv cache).
fn cuda_check(gpu: &Device, dt: DType, tol: (f64, f64, f64)) {
    let tag = format!("cuda {}", dt.suffix());
    let fx = Fixture::load();
    let mut model = fx.model(gpu, dt);
    check_image_embeds(&fx, gpu, &model, tol.0, &tag);
    let x = fx.inputs(&model);
    let r = run_inputs(&x, gpu, &mut model, &Recompute::default());
    report(&tag, "logits", rel_err(&r.logits, &fx.reference("logits")), tol.0);
    report(&tag, "token log-probs", rel_err(&r.logp, &fx.reference("token_logprobs")), tol.0);
    let want = fx.reference["objective"].1[0];
    report(&tag, &format!("objective ({:.6} vs {want:.6})", r.objective), ((r.objective - want) / want).abs(), tol.0);
    check_grads(&fx, &r.grads, tol.1, &tag);
    let mut model2 = fx.model(gpu, dt);
    let r2 = run_inputs(&x, gpu, &mut model2, &Recompute::all(fx.cfg.text.num_hidden_layers));
    check_grads(&fx, &r2.grads, tol.1, &format!("{tag} recompute-all"));
    fixture_kv_cache_check_in(&fx, gpu, dt, tol.2, &tag);
}

#[test]
fn llava_cuda_f32_matches_transformers() {
    let Some(gpu) = cuda_or_skip("llava_cuda_f32_matches_transformers") else { return };
    cuda_check(&gpu, DType::F32, (Tol::FixtureLogits.value(), Tol::FixtureGrads.value(), Tol::KvCache.value()));
}

#[test]
fn llava_cuda_bf16_matches_transformers() {
    let Some(gpu) = cuda_or_skip("llava_cuda_bf16_matches_transformers") else { return };
    cuda_check(
        &gpu,
        DType::BF16,
        (Tol::ModelBf16Logits.value(), Tol::ModelBf16Grads.value(), Tol::ModelBf16Logits.value()),
    );
}

/// GradStore::Bf16Linear: linear-weight gradients in bf16 (CLIP, projector and decoder), the
/// rest f32, still within the bf16 tolerance of transformers.
#[test]
fn llava_cuda_bf16_grad_store_matches_transformers() {
    let Some(gpu) = cuda_or_skip("llava_cuda_bf16_grad_store_matches_transformers") else { return };
    let fx = Fixture::load();
    let mut model = fx.model(&gpu, DType::BF16);
    model.grad_store = GradStore::Bf16Linear;
    let x = fx.inputs(&model);
    let r = run_inputs(&x, &gpu, &mut model, &Recompute::default());
    let n16 = model.params_and_grads().iter().filter(|(_, _, g)| g.dtype() == DType::BF16).count();
    println!("llava bf16 grad store: {n16} bf16 gradient buffers");
    assert!(n16 > 0);
    check_grads(&fx, &r.grads, Tol::ModelBf16Grads.value(), "cuda bf16, bf16 grad store");
}

/// A random LLaVA-NeXT with a Llama (MHA) decoder at the 7B head dims (CLIP 64, text 128: the
/// tensor-core attention kernels), same bf16-rounded weights on both devices.
#[test]
fn llava_cuda_bf16_llama_at_7b_head_dims_matches_cpu() {
    let Some(gpu) = cuda_or_skip("llava_cuda_bf16_llama_at_7b_head_dims_matches_cpu") else { return };
    head_dims_check(
        &gpu,
        DType::BF16,
        (Tol::ModelBf16Logits.value(), Tol::ModelBf16Grads.value()),
        "cuda bf16 (llama, 7B head dims)",
    );
}

/// The same set-up with the CPU on both sides (exercises the Llama path; the errors are 0).
#[test]
fn llava_cpu_llama_at_7b_head_dims_smoke() {
    head_dims_check(
        &Device::Cpu,
        DType::F32,
        (Tol::CpuSelf.value(), Tol::CpuSelf.value()),
        "cpu f32 (llama, 7B head dims)",
    );
}

fn head_dims_check(dev: &Device, dt: DType, tol: (f64, f64), tag: &str) {
    let fx = Fixture::load();
    let mut cfg = fx.cfg.clone();
    cfg.text.family = TextFamily::Llama;
    (cfg.text.hidden_size, cfg.text.num_attention_heads, cfg.text.num_key_value_heads, cfg.text.head_dim) =
        (256, 2, 2, 128);
    (cfg.text.intermediate_size, cfg.text.num_hidden_layers, cfg.text.sliding_window, cfg.text.rope_theta) =
        (192, 2, None, 10000.0);
    (cfg.vision.hidden_size, cfg.vision.num_attention_heads, cfg.vision.intermediate_size) = (128, 2, 96);
    let cpu_model = random_llava(&cfg, &Device::Cpu, DType::F32, 0.3);
    // One wide image (two tiles side by side, then unpadded), text around it.
    let sizes = vec![(40usize, 100usize)];
    let geo = &cpu_model.geometries(&sizes).unwrap()[0];
    let mut rng = Rng::new(77);
    let reserved = [cfg.image_token_index as i64];
    let vocab = cfg.text.vocab_size;
    let mut ids = text_ids(&mut rng, 5, vocab, &reserved);
    ids.extend(std::iter::repeat_n(cfg.image_token_index as i32, geo.num_tokens()));
    ids.extend(text_ids(&mut rng, 40, vocab, &reserved));
    let s = ids.len();
    println!("{tag}: image {sizes:?} → {} tiles, {} tokens; sequence {s}", geo.num_tiles(), geo.num_tokens());
    let pixels = bf16_round(&rng.normal_vec(geo.num_tiles() * cpu_model.vdims.tile_len(), 1.0));
    let loss_mask: Vec<i32> = (0..s).map(|t| (t + 30 >= s) as i32).collect();
    let x = Inputs { cu: vec![0, s as i32], ids, pixels, sizes, loss_mask };
    let want =
        run_inputs(&x, &Device::Cpu, &mut random_llava(&cfg, &Device::Cpu, DType::F32, 0.3), &Recompute::default());
    let model = random_llava(&cfg, dev, dt, 0.3);
    kv_cache_check(dev, &model, &x, &[5 + geo.num_tokens() + 2, s - 4], tol.0, tag);
    let got = run_inputs(&x, dev, &mut random_llava(&cfg, dev, dt, 0.3), &Recompute::default());
    report(tag, "logits vs cpu", rel_err(&got.logits, &want.logits), tol.0);
    report(tag, "token log-probs vs cpu", rel_err(&got.logp, &want.logp), tol.0);
    let mut failed = Vec::new();
    for (name, (_, g)) in &got.grads {
        assert!(want.grads.contains_key(name), "{tag}: gradient {name} only on one device");
        let e = named_grad_err(name, g, &want.grads, true);
        println!("{tag} grad {name}: rel err {e:.2e}");
        if e > tol.1 {
            failed.push(format!("{name}: {e:.2e}"));
        }
    }
    assert_eq!(got.grads.len(), want.grads.len(), "{tag}: gradient sets");
    assert!(failed.is_empty(), "{tag}: gradients over {:.0e}: {failed:?}", tol.1);
}
