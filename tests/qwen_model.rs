//! Qwen2.5-VL model math against the transformers fixtures (../shared/fixtures/qwen2_5_vl_tiny,
//! or $AM3_FIXTURES/qwen2_5_vl_tiny): vision embeddings, logits, token log-probs, the objective
//! Σ_t loss_mask[t+1]·logp[t] and every parameter gradient, on the CPU in f32; activation
//! checkpointing; KV-cached prefill + appended turn + decode vs the full forward; and the same
//! checks on CUDA in bf16 (skipped without a GPU). Every size is read from the files.
mod common;
use am3safety::checkpoint::{read_tensor_file, Checkpoint};
use am3safety::models::qwen2_5_vl::config::QwenVlConfig;
use am3safety::models::qwen2_5_vl::model::{Batch, QwenVl, Recompute};
use am3safety::models::qwen2_5_vl::positions::{mrope_positions, MropeState};
use am3safety::models::qwen2_5_vl::vision::VisionLayout;
use am3safety::tensor::{DType, Device};
use common::*;
use am3safety::models::common::params::{GradStore, NamedTensors};
use am3safety::models::common::train_state::TrainState;
use std::collections::HashMap;
use std::path::PathBuf;

type Tensors = HashMap<String, (Vec<usize>, Vec<f64>)>;

/// $AM3_FIXTURES (the fixtures root, or the Qwen directory itself), else ../shared/fixtures.
fn fixture_dir() -> PathBuf {
    let base = std::env::var("AM3_FIXTURES").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"));
    if base.join("config.json").is_file() {
        base
    } else {
        base.join("qwen2_5_vl_tiny")
    }
}

struct Fixture {
    dir: PathBuf,
    cfg: QwenVlConfig,
    inputs: Tensors,
    reference: Tensors,
}

impl Fixture {
    fn load() -> Fixture {
        let dir = fixture_dir();
        let read = |f: &str| read_tensor_file(dir.join(f)).unwrap_or_else(|e| panic!("reading {f} in {}: {e:#}", dir.display()));
        Fixture { cfg: QwenVlConfig::load(&dir).unwrap(), inputs: read("inputs.safetensors"), reference: read("reference.safetensors"), dir }
    }
    fn ints(t: &Tensors, name: &str) -> Vec<i32> {
        t[name].1.iter().map(|&x| x as i32).collect()
    }
    fn ids(&self) -> Vec<i32> {
        Self::ints(&self.inputs, "input_ids")
    }
    fn grids(&self) -> Vec<[usize; 3]> {
        self.inputs["image_grid_thw"].1.chunks(3).map(|g| [g[0] as usize, g[1] as usize, g[2] as usize]).collect()
    }
    fn pixels(&self) -> Vec<f32> {
        self.inputs["pixel_values"].1.iter().map(|&x| x as f32).collect()
    }
    fn reference(&self, name: &str) -> Vec<f32> {
        self.reference[name].1.iter().map(|&x| x as f32).collect()
    }
    fn model(&self, dev: &Device, dt: DType) -> QwenVl {
        QwenVl::from_checkpoint_as(dev, self.cfg.clone(), &Checkpoint::open(&self.dir).unwrap(), dt).unwrap()
    }
}

/// Everything measured in one forward + backward.
struct Run {
    logits: Vec<f32>,
    logp: Vec<f32>, // [S - 1]
    objective: f64,
    grads: NamedTensors,
}

/// One sequence (or several packed) with its images and loss mask.
struct Inputs {
    ids: Vec<i32>,
    cu: Vec<i32>,
    pos3: Vec<i32>,
    pixels: Vec<f32>,
    grids: Vec<[usize; 3]>,
    loss_mask: Vec<i32>,
}

impl Fixture {
    fn inputs(&self) -> Inputs {
        let (ids, grids) = (self.ids(), self.grids());
        let (pos3, _) = mrope_positions(&ids, &grids, &self.cfg).unwrap();
        Inputs { cu: vec![0, ids.len() as i32], pos3, pixels: self.pixels(), loss_mask: Self::ints(&self.inputs, "loss_mask"), ids, grids }
    }
}

fn run(fx: &Fixture, dev: &Device, model: &mut QwenVl, rc: &Recompute) -> Run {
    run_inputs(&fx.inputs(), dev, model, rc)
}

/// Forward, logits, log-probs of the next token within each sequence, the objective
/// Σ loss_mask[t+1]·logp[t], and the backward of the objective.
fn run_inputs(x: &Inputs, dev: &Device, model: &mut QwenVl, rc: &Recompute) -> Run {
    let s = x.ids.len();
    let batch = Batch { ids: &x.ids, cu_seqlens: &x.cu, pos3: &x.pos3, pixels: &x.pixels, grids: &x.grids };
    let f = model.forward(dev, &batch, rc).unwrap();
    let logits = dev.to_vec(&model.logits(dev, &f).unwrap()).unwrap();
    // Position t predicts ids[t + 1]; the last position of each sequence has no target.
    let mut targets: Vec<i32> = x.ids[1..].to_vec();
    targets.push(0);
    let mut mask = vec![1f32; s];
    for &end in &x.cu[1..] {
        mask[end as usize - 1] = 0.0;
    }
    let (tb, mb) = (dev.upload_i32(&targets).unwrap(), dev.upload(&mask, DType::F32).unwrap());
    let (logp, lse) = model.logprobs(dev, &f, &tb, Some(&mb)).unwrap();
    let logp = dev.to_vec(&logp).unwrap();
    let dlogp: Vec<f32> = (0..s).map(|t| if mask[t] > 0.0 { x.loss_mask[t + 1] as f32 } else { 0.0 }).collect();
    let objective: f64 = (0..s).map(|t| dlogp[t] as f64 * logp[t] as f64).sum();
    model.zero_grads(dev).unwrap();
    model.backward_logprobs(dev, &f, &tb, &lse, &dev.upload(&dlogp, DType::F32).unwrap()).unwrap();
    Run { logits, logp: logp[..s - 1].to_vec(), objective, grads: model.grads_by_name(dev).unwrap() }
}

/// Compares every gradient with grads.safetensors; returns the worst relative error.
fn check_grads(fx: &Fixture, got: &NamedTensors, tol: f64, tag: &str) -> f64 {
    let want = read_tensor_file(fx.dir.join("grads.safetensors")).unwrap();
    let mut worst = 0f64;
    let mut failed = Vec::new();
    for (name, (shape, w)) in &want {
        let Some((gs, g)) = got.get(name) else {
            failed.push(format!("{name}: no gradient"));
            continue;
        };
        assert_eq!(gs, shape, "{tag} grad {name}: shape");
        let w32: Vec<f32> = w.iter().map(|&x| x as f32).collect();
        let e = rel_err(g, &w32);
        println!("{tag} grad {name} {shape:?}: rel err {e:.2e}");
        worst = worst.max(e);
        if e > tol {
            failed.push(format!("{name}: {e:.2e}"));
        }
    }
    // Parameters the reference gives no gradient must get none here either.
    for (name, (_, g)) in got {
        if !want.contains_key(name) {
            let n = g.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            println!("{tag} grad {name}: not in the reference, norm {n:.2e}");
            if n > 0.0 {
                failed.push(format!("{name}: nonzero gradient {n:.2e} where the reference has none"));
            }
        }
    }
    println!("{tag} grads: {} tensors, worst rel err {worst:.2e} (tol {tol:.0e})", want.len());
    assert!(failed.is_empty(), "{tag} gradients over {tol:.0e}: {failed:?}");
    worst
}

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
    let model = fx.model(&dev, DType::F32);
    let want: Vec<f32> = read_tensor_file(fx.dir.join("vision_reference.safetensors")).unwrap()["image_embeds"].1.iter().map(|&x| x as f32).collect();
    let got = dev.to_vec(&model.image_embeds(&dev, &fx.pixels(), &fx.grids()).unwrap()).unwrap();
    report("cpu f32", "vision image_embeds", rel_err(&got, &want), 1e-4);
}

#[test]
fn qwen_cpu_matches_transformers() {
    let fx = Fixture::load();
    let dev = Device::Cpu;
    let (pos3, _) = mrope_positions(&fx.ids(), &fx.grids(), &fx.cfg).unwrap();
    assert_eq!(pos3, Fixture::ints(&fx.reference, "position_ids"), "M-RoPE positions differ from the reference");
    let mut model = fx.model(&dev, DType::F32);
    let r = run(&fx, &dev, &mut model, &Recompute::default());
    report("cpu f32", "logits", rel_err(&r.logits, &fx.reference("logits")), 1e-4);
    report("cpu f32", "token log-probs", rel_err(&r.logp, &fx.reference("token_logprobs")), 1e-4);
    let want = fx.reference["objective"].1[0];
    report("cpu f32", &format!("objective ({:.6} vs {want:.6})", r.objective), ((r.objective - want) / want).abs(), 1e-5);
    check_grads(&fx, &r.grads, 1e-3, "cpu f32");

    // Activation checkpointing recomputes the same numbers.
    let mut model2 = fx.model(&dev, DType::F32);
    let r2 = run(&fx, &dev, &mut model2, &Recompute::all(fx.cfg.text.num_hidden_layers));
    let mut worst = 0f64;
    for (name, (_, g)) in &r.grads {
        worst = worst.max(rel_err(&r2.grads[name].1, g));
    }
    report("cpu f32", "recompute-all grads vs kept activations (worst tensor)", worst, 1e-6);
    report("cpu f32", "recompute-all logits vs kept", rel_err(&r2.logits, &r.logits), 1e-7);
}

/// Feeds a single sequence through a KV-cached session in chunks — [0, splits[0]),
/// [splits[0], splits[1]), …, then one token at a time from the last split — each chunk with the
/// images whose placeholder runs it holds; the cached logits must equal the full forward's rows.
fn kv_cache_check(dev: &Device, model: &QwenVl, cfg: &QwenVlConfig, x: &Inputs, splits: &[usize], tol: f64, tag: &str) {
    let (ids, grids, pixels, pos_full) = (&x.ids, &x.grids, &x.pixels, &x.pos3);
    let s = ids.len();
    let f = model.forward(dev, &Batch { ids, cu_seqlens: &[0, s as i32], pos3: pos_full, pixels, grids }, &Recompute::default()).unwrap();
    let full = dev.to_vec(&model.logits(dev, &f).unwrap()).unwrap();
    let v = cfg.text.vocab_size;
    // Start of each image's placeholder run (image k is the k-th run).
    let img = cfg.image_token_id as i32;
    let run_starts: Vec<usize> = (0..s).filter(|&i| ids[i] == img && (i == 0 || ids[i - 1] != img)).collect();
    assert_eq!(run_starts.len(), grids.len(), "one placeholder run per image");
    let per_img: Vec<usize> = grids.iter().map(|g| g[0] * g[1] * g[2]).collect();
    let patch_dim = pixels.len() / per_img.iter().sum::<usize>();
    let mut bounds = vec![0];
    bounds.extend_from_slice(splits);
    bounds.extend(splits.last().copied().unwrap_or(0) + 1..=s);
    let mut sess = model.new_session(dev, 1, s + 4).unwrap();
    let mut st = MropeState::new(cfg);
    let mut got = Vec::new();
    for w in bounds.windows(2) {
        let (a, b) = (w[0], w[1]);
        let imgs: Vec<usize> = (0..grids.len()).filter(|&k| (a..b).contains(&run_starts[k])).collect();
        let g: Vec<[usize; 3]> = imgs.iter().map(|&k| grids[k]).collect();
        let px: Vec<f32> = imgs
            .iter()
            .flat_map(|&k| {
                let off: usize = per_img[..k].iter().sum();
                pixels[off * patch_dim..(off + per_img[k]) * patch_dim].to_vec()
            })
            .collect();
        let pos = st.append(&ids[a..b], &g).unwrap();
        let n = b - a;
        for r in 0..3 {
            assert_eq!(&pos[r * n..(r + 1) * n], &pos_full[r * s + a..r * s + b], "chunk {a}..{b}: positions row {r}");
        }
        let logits = dev.to_vec(&model.extend(dev, &mut sess, &ids[a..b], &pos, n, &px, &g, false).unwrap()).unwrap();
        let e = rel_err(&logits, &full[a * v..b * v]);
        if n > 1 || b == s {
            println!("{tag} kv-cache chunk {a}..{b} ({} image): logits rel err {e:.2e}", g.len());
        }
        got.extend(logits);
    }
    report(tag, "kv-cache prefill + append + decode logits vs full forward", rel_err(&got, &full), tol);
    // Sampling path: only the last row.
    let mut sess2 = model.new_session(dev, 1, s).unwrap();
    let last = dev.to_vec(&model.extend(dev, &mut sess2, ids, pos_full, s, pixels, grids, true).unwrap()).unwrap();
    report(tag, "last_only logits vs full forward's last row", rel_err(&last, &full[(s - 1) * v..]), tol);
}

/// The fixture dialogue: prefill through the first image and two more tokens, append a chunk
/// holding the second image, decode the last 3 tokens.
fn fixture_kv_cache_check(dev: &Device, dt: DType, tol: f64, tag: &str) {
    let fx = Fixture::load();
    let x = fx.inputs();
    let img = fx.cfg.image_token_id as i32;
    let ends: Vec<usize> = (1..x.ids.len()).filter(|&i| x.ids[i - 1] == img && x.ids[i] != img).collect();
    assert!(ends.len() >= 2, "the fixture should have two images");
    let splits = [ends[0] + 2, x.ids.len() - 3];
    kv_cache_check(dev, &fx.model(dev, dt), &fx.cfg, &x, &splits, tol, tag);
}

#[test]
fn qwen_cpu_kv_cache_matches_full_forward() {
    fixture_kv_cache_check(&Device::Cpu, DType::F32, 1e-5, "cpu f32");
}

/// The full check on CUDA in `dt`: fixture tolerances `tol` = (logits, grads, kv cache).
fn cuda_check(gpu: &Device, dt: DType, tol: (f64, f64, f64)) {
    let tag = format!("cuda {}", dt.suffix());
    let fx = Fixture::load();
    let mut model = fx.model(gpu, dt);
    let want_v: Vec<f32> = read_tensor_file(fx.dir.join("vision_reference.safetensors")).unwrap()["image_embeds"].1.iter().map(|&x| x as f32).collect();
    let got_v = gpu.to_vec(&model.image_embeds(gpu, &fx.pixels(), &fx.grids()).unwrap()).unwrap();
    report(&tag, "vision image_embeds", rel_err(&got_v, &want_v), tol.0);
    let r = run(&fx, gpu, &mut model, &Recompute::default());
    report(&tag, "logits", rel_err(&r.logits, &fx.reference("logits")), tol.0);
    report(&tag, "token log-probs", rel_err(&r.logp, &fx.reference("token_logprobs")), tol.0);
    let want = fx.reference["objective"].1[0];
    report(&tag, &format!("objective ({:.6} vs {want:.6})", r.objective), ((r.objective - want) / want).abs(), tol.0);
    check_grads(&fx, &r.grads, tol.1, &tag);
    let mut model2 = fx.model(gpu, dt);
    let r2 = run(&fx, gpu, &mut model2, &Recompute::all(fx.cfg.text.num_hidden_layers));
    check_grads(&fx, &r2.grads, tol.1, &format!("{tag} recompute-all"));
    fixture_kv_cache_check(gpu, dt, tol.2, &tag);
}

#[test]
fn qwen_cuda_f32_matches_transformers() {
    let Some(gpu) = cuda_or_skip("qwen_cuda_f32_matches_transformers") else { return };
    cuda_check(&gpu, DType::F32, (1e-4, 1e-3, 1e-5));
}

#[test]
fn qwen_cuda_bf16_matches_transformers() {
    let Some(gpu) = cuda_or_skip("qwen_cuda_bf16_matches_transformers") else { return };
    cuda_check(&gpu, DType::BF16, (3e-2, 5e-2, 3e-2));
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
        if want == DType::BF16 { n16 += 1 } else { n32 += 1 }
    }
    println!("bf16 grad store: {n16} bf16 gradient buffers, {n32} f32");
    assert!(n16 > 0 && n32 > 0);
    check_grads(&fx, &r.grads, 5e-2, "cuda bf16, bf16 grad store");
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
    report("cpu f32", "packed logits, sequence 0", rel_err(&r2.logits[..s * v], &r1.logits), 1e-6);
    report("cpu f32", "packed logits, sequence 1", rel_err(&r2.logits[s * v..], &r1.logits), 1e-6);
    report("cpu f32", "packed objective vs 2x single", (r2.objective / (2.0 * r1.objective) - 1.0).abs(), 1e-6);
    let mut worst = 0f64;
    for (name, (_, g1)) in &r1.grads {
        let doubled: Vec<f32> = g1.iter().map(|x| 2.0 * x).collect();
        worst = worst.max(rel_err(&r2.grads[name].1, &doubled));
    }
    report("cpu f32", "packed grads vs 2x single (worst tensor)", worst, 1e-5);
}

/// A random Qwen2.5-VL at the 7B head dims (vision 80, text 128: the tensor-core attention
/// kernels), same weights on both devices (bf16-rounded), CUDA bf16 vs the CPU in f32.
#[test]
fn qwen_cuda_bf16_at_7b_head_dims_matches_cpu() {
    let Some(gpu) = cuda_or_skip("qwen_cuda_bf16_at_7b_head_dims_matches_cpu") else { return };
    head_dims_check(&gpu, DType::BF16, (3e-2, 5e-2), "cuda bf16 (7B head dims)");
}

/// The same check with the CPU on both sides (exercises the set-up; the errors are 0).
#[test]
fn qwen_cpu_at_7b_head_dims_smoke() {
    head_dims_check(&Device::Cpu, DType::F32, (1e-6, 1e-6), "cpu f32 (7B head dims)");
}

fn head_dims_check(dev: &Device, dt: DType, tol: (f64, f64), tag: &str) {
    let fx = Fixture::load();
    let mut cfg = fx.cfg.clone();
    (cfg.vision.hidden_size, cfg.vision.num_heads, cfg.vision.intermediate_size, cfg.vision.depth) = (160, 2, 96, 3);
    (cfg.vision.window_size, cfg.vision.fullatt_block_indexes) = (112, vec![1]);
    (cfg.text.hidden_size, cfg.text.num_attention_heads, cfg.text.num_key_value_heads, cfg.text.head_dim) = (256, 2, 1, 128);
    (cfg.text.intermediate_size, cfg.text.num_hidden_layers, cfg.text.mrope_section) = (192, 2, vec![16, 24, 24]);
    cfg.vision.out_hidden_size = 256;
    let make_model = |dev: &Device, dt: DType| {
        QwenVl::build(cfg.clone(), &mut |r| {
            let seed = r.name.bytes().fold(r.row0 as u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
            let mut rng = Rng::new(seed);
            let n = r.numel();
            let v: Vec<f32> = if r.name.ends_with("norm.weight") || r.name.contains("layernorm") || r.name.contains(".norm") || r.name.contains("ln_q") {
                rng.uniform_vec(n, 0.8, 1.2)
            } else if r.name.ends_with("bias") {
                rng.normal_vec(n, 0.05)
            } else {
                rng.normal_vec(n, 1.0 / (r.row_len() as f64).sqrt())
            };
            dev.upload(&bf16_round(&v), dt)
        })
        .unwrap()
    };
    // One image of 8×12 patches (24 tokens; windows of 4×4 merged tokens, one partial), text around it.
    let grids = vec![[1usize, 8, 12]];
    let n_img = 24;
    let mut rng = Rng::new(77);
    let mut ids: Vec<i32> = (0..5).map(|_| rng.below(500) as i32).collect();
    ids.push(cfg.vision_start_token_id as i32);
    ids.extend(std::iter::repeat_n(cfg.image_token_id as i32, n_img));
    ids.push(cfg.vision_end_token_id as i32);
    ids.extend((0..40).map(|_| rng.below(500) as i32));
    let s = ids.len();
    let (pos3, _) = mrope_positions(&ids, &grids, &cfg).unwrap();
    let pixels = bf16_round(&rng.normal_vec(8 * 12 * cfg.vision.patch_dim(), 1.0));
    let loss_mask: Vec<i32> = (0..s).map(|t| (t >= 40) as i32).collect();
    let x = Inputs { cu: vec![0, s as i32], ids, pos3, pixels, grids, loss_mask };
    let want = run_inputs(&x, &Device::Cpu, &mut make_model(&Device::Cpu, DType::F32), &Recompute::default());
    let model = make_model(dev, dt);
    kv_cache_check(dev, &model, &cfg, &x, &[35, 50], tol.0, tag);
    let got = run_inputs(&x, dev, &mut make_model(dev, dt), &Recompute::default());
    report(tag, "logits vs cpu", rel_err(&got.logits, &want.logits), tol.0);
    report(tag, "token log-probs vs cpu", rel_err(&got.logp, &want.logp), tol.0);
    let mut failed = Vec::new();
    for (name, (_, g)) in &want.grads {
        let e = rel_err(&got.grads[name].1, g);
        println!("{tag} grad {name}: rel err {e:.2e}");
        if e > tol.1 {
            failed.push(format!("{name}: {e:.2e}"));
        }
    }
    assert!(failed.is_empty(), "{tag}: gradients over {:.0e}: {failed:?}", tol.1);
}
