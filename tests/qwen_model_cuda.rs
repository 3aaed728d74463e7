//! Qwen2.5-VL on CUDA (skipped without a GPU): the fixture checks in f32 and bf16 (and with the
//! bf16 gradient store), and a random model at the 7B head dims, CUDA bf16 against the CPU (plus
//! its CPU smoke run).
mod common;
#[path = "common/fixture_variant.rs"]
mod fixture_variant;
use am3safety::models::common::params::GradStore;
use am3safety::models::qwen2_5_vl::model::Recompute;
use am3safety::models::qwen2_5_vl::positions::mrope_positions;
use am3safety::tensor::{DType, Device};
use common::*;

#[path = "support/qwen_model.rs"]
mod qwen_model_support;
use qwen_model_support::*;

/// The full check on CUDA in `dt`: fixture tolerances `tol` = (logits, grads, kv cache).
fn cuda_check(gpu: &Device, dt: DType, tol: (f64, f64, f64)) {
    let tag = format!("cuda {}", dt.suffix());
    let fx = Fixture::load();
    let mut model = fx.model(gpu, dt);
    check_vision_embeds(&fx, gpu, &model, tol.0, &tag);
    let r = run(&fx, gpu, &mut model, &Recompute::default());
    report(&tag, "logits", rel_err(&r.logits, &fx.reference("logits")), tol.0);
    report(&tag, "token log-probs", rel_err(&r.logp, &fx.reference("token_logprobs")), tol.0);
    let want = fx.reference["objective"].1[0];
    report(&tag, &format!("objective ({:.6} vs {want:.6})", r.objective), ((r.objective - want) / want).abs(), tol.0);
    check_grads(&fx, &r.grads, tol.1, &tag);
    let mut model2 = fx.model(gpu, dt);
    let r2 = run(&fx, gpu, &mut model2, &Recompute::all(fx.cfg.text.num_hidden_layers));
    check_grads(&fx, &r2.grads, tol.1, &format!("{tag} recompute-all"));
    fixture_kv_cache_check_in(&fx, gpu, dt, tol.2, &tag);
}

#[test]
fn qwen_cuda_f32_matches_transformers() {
    let Some(gpu) = cuda_or_skip("qwen_cuda_f32_matches_transformers") else { return };
    cuda_check(&gpu, DType::F32, (Tol::FixtureLogits.value(), Tol::FixtureGrads.value(), Tol::KvCache.value()));
}

#[test]
fn qwen_cuda_bf16_matches_transformers() {
    let Some(gpu) = cuda_or_skip("qwen_cuda_bf16_matches_transformers") else { return };
    cuda_check(
        &gpu,
        DType::BF16,
        (Tol::ModelBf16Logits.value(), Tol::ModelBf16Grads.value(), Tol::ModelBf16Logits.value()),
    );
}

/// GradStore::Bf16Linear (what lets a 7B full fine-tune fit): the linear weights' gradients
/// live in bf16, the rest in f32, and all still match transformers within the bf16 tolerance.
#[test]
fn qwen_cuda_bf16_grad_store_matches_transformers() {
    let Some(gpu) = cuda_or_skip("qwen_cuda_bf16_grad_store_matches_transformers") else { return };
    let fx = Fixture::load();
    let mut model = fx.model(&gpu, DType::BF16);
    model.grad_store = GradStore::Bf16Linear;
    let r = run(&fx, &gpu, &mut model, &Recompute::default());
    let (mut n16, mut n32) = (0, 0);
    for (pr, _, g) in model.params_and_grads() {
        let want = GradStore::Bf16Linear.dtype(&gpu, &pr);
        assert_eq!(g.dtype(), want, "gradient of {} is {}, want {}", pr.name, g.dtype().suffix(), want.suffix());
        if want == DType::BF16 {
            n16 += 1
        } else {
            n32 += 1
        }
    }
    println!("bf16 grad store: {n16} bf16 gradient buffers, {n32} f32");
    assert!(n16 > 0 && n32 > 0);
    check_grads(&fx, &r.grads, Tol::ModelBf16Grads.value(), "cuda bf16, bf16 grad store");
}

/// A random Qwen2.5-VL at the 7B head dims (vision 80, text 128: the tensor-core attention
/// kernels), same weights on both devices (bf16-rounded), CUDA bf16 vs the CPU in f32.
#[test]
fn qwen_cuda_bf16_at_7b_head_dims_matches_cpu() {
    let Some(gpu) = cuda_or_skip("qwen_cuda_bf16_at_7b_head_dims_matches_cpu") else { return };
    head_dims_check(
        &gpu,
        DType::BF16,
        (Tol::ModelBf16Logits.value(), Tol::ModelBf16Grads.value()),
        "cuda bf16 (7B head dims)",
    );
}

/// The same check with the CPU on both sides (exercises the set-up; the errors are 0).
#[test]
fn qwen_cpu_at_7b_head_dims_smoke() {
    head_dims_check(&Device::Cpu, DType::F32, (Tol::CpuSelf.value(), Tol::CpuSelf.value()), "cpu f32 (7B head dims)");
}

fn head_dims_check(dev: &Device, dt: DType, tol: (f64, f64), tag: &str) {
    let fx = Fixture::load();
    let mut cfg = fx.cfg.clone();
    (cfg.vision.hidden_size, cfg.vision.num_heads, cfg.vision.intermediate_size, cfg.vision.depth) = (160, 2, 96, 3);
    (cfg.vision.window_size, cfg.vision.fullatt_block_indexes) = (112, vec![1]);
    (cfg.vision.patch_size, cfg.vision.spatial_merge_size, cfg.vision.temporal_patch_size) = (14, 2, 2);
    (cfg.text.hidden_size, cfg.text.num_attention_heads, cfg.text.num_key_value_heads, cfg.text.head_dim) =
        (256, 2, 1, 128);
    (cfg.text.intermediate_size, cfg.text.num_hidden_layers, cfg.text.mrope_section) = (192, 2, vec![16, 24, 24]);
    cfg.vision.out_hidden_size = 256;
    // One image of 8×12 patches (24 tokens; windows of 4×4 merged tokens, one partial), text around it.
    let grids = vec![[1usize, 8, 12]];
    let n_img = 24;
    let mut rng = Rng::new(77);
    let reserved =
        [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id].map(|t| t as i64);
    let vocab = cfg.text.vocab_size;
    let mut ids = text_ids(&mut rng, 5, vocab, &reserved);
    ids.push(cfg.vision_start_token_id as i32);
    ids.extend(std::iter::repeat_n(cfg.image_token_id as i32, n_img));
    ids.push(cfg.vision_end_token_id as i32);
    ids.extend(text_ids(&mut rng, 40, vocab, &reserved));
    let s = ids.len();
    let (pos3, _) = mrope_positions(&ids, &grids, &cfg).unwrap();
    let pixels = bf16_round(&rng.normal_vec(8 * 12 * cfg.vision.patch_dim(), 1.0));
    let loss_mask: Vec<i32> = (0..s).map(|t| (t >= 40) as i32).collect();
    let x = Inputs { cu: vec![0, s as i32], ids, pos3, pixels, grids, loss_mask };
    let want = run_inputs(&x, &Device::Cpu, &mut random_qwen(&cfg, &Device::Cpu, DType::F32), &Recompute::default());
    let model = random_qwen(&cfg, dev, dt);
    kv_cache_check(dev, &model, &cfg, &x, &[35, 50], tol.0, tag);
    let got = run_inputs(&x, dev, &mut random_qwen(&cfg, dev, dt), &Recompute::default());
    report(tag, "logits vs cpu", rel_err(&got.logits, &want.logits), tol.0);
    report(tag, "token log-probs vs cpu", rel_err(&got.logp, &want.logp), tol.0);
    let mut failed = Vec::new();
    assert_eq!(got.grads.len(), want.grads.len(), "{tag}: gradient sets");
    for (name, (_, g)) in &got.grads {
        assert!(want.grads.contains_key(name), "{tag}: gradient {name} only on one device");
        let e = named_grad_err(name, g, &want.grads, false);
        println!("{tag} grad {name}: rel err {e:.2e}");
        if e > tol.1 {
            failed.push(format!("{name}: {e:.2e}"));
        }
    }
    assert!(failed.is_empty(), "{tag}: gradients over {:.0e}: {failed:?}", tol.1);
}
