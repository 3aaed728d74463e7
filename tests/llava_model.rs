//! LLaVA-NeXT model math against the transformers fixtures (`fixture_dir("llava_next_tiny")`):
//! packed image features per image (CLIP → projector → anyres packing with image_newline),
//! logits, token log-probs, the objective Σ_t loss_mask[t+1]·logp[t] and every parameter
//! gradient, on the CPU in f32; activation checkpointing; packed batches; KV-cached prefill +
//! appended turn + decode vs the full forward; the same on CUDA (skipped without a GPU); and a
//! random Llama (MHA) model at the 7B head dims, CUDA bf16 vs the CPU. Every size is read from
//! the files.
mod common;
use am3safety::checkpoint::{read_tensor_file, Checkpoint};
use am3safety::models::llava_next::config::{LlavaNextConfig, TextFamily};
use am3safety::models::llava_next::model::{strip_tile_padding, Batch, LlavaNext, Recompute};
use am3safety::models::common::params::GradStore;
use am3safety::models::common::train_state::TrainState;
use am3safety::tensor::{DType, Device};
use common::*;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

type Tensors = HashMap<String, (Vec<usize>, Vec<f64>)>;

struct Fixture {
    dir: PathBuf,
    cfg: LlavaNextConfig,
    inputs: Tensors,
    reference: Tensors,
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

impl Fixture {
    fn load() -> Fixture {
        let dir = fixture_dir("llava_next_tiny");
        let read = |f: &str| read_tensor_file(dir.join(f)).unwrap_or_else(|e| panic!("reading {f} in {}: {e:#}", dir.display()));
        let cfg = LlavaNextConfig::load(&dir).unwrap_or_else(|e| panic!("{e:#}"));
        Fixture { cfg, inputs: read("inputs.safetensors"), reference: read("reference.safetensors"), dir }
    }
    fn ints(t: &Tensors, name: &str) -> Vec<i32> {
        t[name].1.iter().map(|&x| x as i32).collect()
    }
    fn reference(&self, name: &str) -> Vec<f32> {
        f32s(&self.reference[name].1)
    }
    fn model(&self, dev: &Device, dt: DType) -> LlavaNext {
        LlavaNext::from_checkpoint_as(dev, self.cfg.clone(), &Checkpoint::open(&self.dir).unwrap(), dt).unwrap_or_else(|e| panic!("{e:#}"))
    }
    /// The fixture's images: compact pixels (padding tiles dropped) and original sizes.
    fn images(&self, model: &LlavaNext) -> (Vec<f32>, Vec<(usize, usize)>) {
        let sizes: Vec<(usize, usize)> = self.inputs["image_sizes"].1.chunks(2).map(|s| (s[0] as usize, s[1] as usize)).collect();
        let (shape, pv) = &self.inputs["pixel_values"];
        let tiles: Vec<usize> = model.geometries(&sizes).unwrap().iter().map(|g| g.num_tiles()).collect();
        println!("fixture: {} images, sizes {sizes:?}, tiles {tiles:?}, pixel_values {shape:?}", sizes.len());
        let tile_len: usize = shape[2..].iter().product();
        (strip_tile_padding(&f32s(pv), shape[1], &tiles, tile_len).unwrap(), sizes)
    }
    fn inputs(&self, model: &LlavaNext) -> Inputs {
        let ids = Self::ints(&self.inputs, "input_ids");
        let (pixels, sizes) = self.images(model);
        Inputs { cu: vec![0, ids.len() as i32], pixels, sizes, loss_mask: Self::ints(&self.inputs, "loss_mask"), ids }
    }
}

/// One sequence (or several packed) with its images and loss mask.
struct Inputs {
    ids: Vec<i32>,
    cu: Vec<i32>,
    pixels: Vec<f32>,
    sizes: Vec<(usize, usize)>,
    loss_mask: Vec<i32>,
}

/// Everything measured in one forward + backward.
struct Run {
    logits: Vec<f32>,
    logp: Vec<f32>, // [S - 1]
    objective: f64,
    grads: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

/// Forward, logits, log-probs of the next token within each sequence, the objective
/// Σ loss_mask[t+1]·logp[t], and the backward of the objective.
fn run_inputs(x: &Inputs, dev: &Device, model: &mut LlavaNext, rc: &Recompute) -> Run {
    let s = x.ids.len();
    let batch = Batch { ids: &x.ids, cu_seqlens: &x.cu, pixels: &x.pixels, image_sizes: &x.sizes };
    let f = model.forward(dev, &batch, rc).unwrap_or_else(|e| panic!("{e:#}"));
    let logits = dev.to_vec(&model.logits(dev, &f).unwrap()).unwrap();
    let mut targets: Vec<i32> = x.ids[1..].to_vec();
    targets.push(0);
    // The placeholder id may lie past the vocabulary; it is never a target with weight, but it
    // must still be a valid index for the head.
    let v = model.tdims.vocab as i32;
    for t in targets.iter_mut() {
        if *t >= v {
            *t = 0;
        }
    }
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
    model.backward_logprobs(dev, &f, &tb, &lse, &dev.upload(&dlogp, DType::F32).unwrap()).unwrap_or_else(|e| panic!("{e:#}"));
    Run { logits, logp: logp[..s - 1].to_vec(), objective, grads: model.grads_by_name(dev).unwrap() }
}

/// Compares every gradient with grads.safetensors (all printed); tensors the reference leaves
/// out must have no gradient here (or an all-zero one).
fn check_grads(fx: &Fixture, got: &BTreeMap<String, (Vec<usize>, Vec<f32>)>, tol: f64, tag: &str) {
    let want = read_tensor_file(fx.dir.join("grads.safetensors")).unwrap();
    let (mut worst, mut failed) = (0f64, Vec::new());
    let mut names: Vec<&String> = want.keys().collect();
    names.sort();
    for name in names {
        let (shape, w) = &want[name];
        let Some((gs, g)) = got.get(name) else {
            println!("{tag} grad {name}: MISSING");
            failed.push(format!("{name}: no gradient"));
            continue;
        };
        assert_eq!(gs, shape, "{tag} grad {name}: shape");
        let e = match cancelling_scale(name, &want) {
            // Exactly 0 in exact arithmetic: both sides are rounding noise, judged against the
            // size of the terms that cancelled.
            Some(scale) => {
                let e = rel_err_scaled(g, &f32s(w), scale);
                println!("{tag} grad {name} {shape:?}: norm {:.2e} vs reference {:.2e}; error vs the q_proj.bias scale {scale:.2e}: {e:.2e}", norm2(g), norm2(&f32s(w)));
                e
            }
            None => {
                let e = rel_err(g, &f32s(w));
                println!("{tag} grad {name} {shape:?}: rel err {e:.2e}");
                e
            }
        };
        worst = worst.max(e);
        if e > tol {
            failed.push(format!("{name}: {e:.2e}"));
        }
    }
    for (name, (_, g)) in got {
        if !want.contains_key(name) {
            let n = norm2(g);
            println!("{tag} grad {name}: not in the reference, norm {n:.2e}");
            if n > 0.0 {
                failed.push(format!("{name}: nonzero gradient {n:.2e} where the reference has none"));
            }
        }
    }
    println!("{tag} grads: {} tensors, worst rel err {worst:.2e} (tol {tol:.0e})", want.len());
    assert!(failed.is_empty(), "{tag} gradients over {tol:.0e}: {failed:?}");
}

/// The k_proj bias of a softmax attention gets no gradient: adding b to every key adds q·b to
/// a whole softmax row. Its reference is rounding noise, so it is judged against the norm of
/// the same layer's q_proj.bias gradient (the same kind of sum, without the cancellation).
fn cancelling_scale(name: &str, want: &Tensors) -> Option<f64> {
    let sibling = name.strip_suffix("self_attn.k_proj.bias")?.to_string() + "self_attn.q_proj.bias";
    want.get(&sibling).map(|(_, w)| norm2(&f32s(w)))
}

/// Packed features of each image vs vision_reference.safetensors `imageK_embeds`.
fn check_image_embeds(fx: &Fixture, dev: &Device, model: &LlavaNext, tol: f64, tag: &str) {
    let want = read_tensor_file(fx.dir.join("vision_reference.safetensors")).unwrap();
    let (pixels, sizes) = fx.images(model);
    let got = dev.to_vec(&model.image_embeds(dev, &pixels, &sizes).unwrap_or_else(|e| panic!("{e:#}"))).unwrap();
    let d = model.tdims.layer.d;
    let mut row = 0;
    for k in 0..sizes.len() {
        let (shape, w) = &want[&format!("image{k}_embeds")];
        assert_eq!(shape[1], d, "image{k}_embeds width");
        let g = &got[row * d..(row + shape[0]) * d];
        report(tag, &format!("image{k}_embeds {shape:?} (size {:?})", sizes[k]), rel_err(g, &f32s(w)), tol);
        row += shape[0];
    }
    assert_eq!(row * d, got.len(), "{tag}: packed rows beyond the reference images");
}

#[test]
fn llava_cpu_image_embeds() {
    let fx = Fixture::load();
    let dev = Device::Cpu;
    check_image_embeds(&fx, &dev, &fx.model(&dev, DType::F32), 1e-4, "cpu f32");
}

#[test]
fn llava_cpu_matches_transformers() {
    let fx = Fixture::load();
    let dev = Device::Cpu;
    let mut model = fx.model(&dev, DType::F32);
    println!("text family {:?}, heads {} / kv {}", fx.cfg.text.family, fx.cfg.text.num_attention_heads, fx.cfg.text.num_key_value_heads);
    let x = fx.inputs(&model);
    let r = run_inputs(&x, &dev, &mut model, &Recompute::default());
    report("cpu f32", "logits", rel_err(&r.logits, &fx.reference("logits")), 1e-4);
    report("cpu f32", "token log-probs", rel_err(&r.logp, &fx.reference("token_logprobs")), 1e-4);
    let want = fx.reference["objective"].1[0];
    report("cpu f32", &format!("objective ({:.6} vs {want:.6})", r.objective), ((r.objective - want) / want).abs(), 1e-5);
    check_grads(&fx, &r.grads, 1e-3, "cpu f32");

    // Activation checkpointing recomputes the same numbers.
    let mut model2 = fx.model(&dev, DType::F32);
    let r2 = run_inputs(&x, &dev, &mut model2, &Recompute::all(fx.cfg.text.num_hidden_layers));
    let worst = r.grads.iter().map(|(n, (_, g))| rel_err(&r2.grads[n].1, g)).fold(0f64, f64::max);
    report("cpu f32", "recompute-all grads vs kept activations (worst tensor)", worst, 1e-6);
    report("cpu f32", "recompute-all logits vs kept", rel_err(&r2.logits, &r.logits), 1e-7);

    // The optimizer view: every gradient paired with its parameter, frozen tensors left out.
    let n_pg = model.params_and_grads().len();
    let n_all = model.param_entries().len();
    println!("cpu f32: {n_pg} trainable tensors of {n_all}");
    assert_eq!(n_pg, r.grads.len(), "params_and_grads pairs every gradient");
    for (r, p, g) in model.params_and_grads() {
        assert_eq!(p.len(), g.len(), "{}: parameter and gradient sizes", r.name);
    }
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
    report("cpu f32", "packed logits, sequence 0", rel_err(&r2.logits[..s * v], &r1.logits), 1e-6);
    report("cpu f32", "packed logits, sequence 1", rel_err(&r2.logits[s * v..], &r1.logits), 1e-6);
    report("cpu f32", "packed objective vs 2x single", (r2.objective / (2.0 * r1.objective) - 1.0).abs(), 1e-6);
    let mut worst = 0f64;
    for (n, (_, g1)) in &r1.grads {
        let doubled: Vec<f32> = g1.iter().map(|x| 2.0 * x).collect();
        let e = match n.strip_suffix("self_attn.k_proj.bias") {
            // Rounding noise on both sides (see cancelling_scale).
            Some(p) => rel_err_scaled(&r2.grads[n].1, &doubled, 2.0 * norm2(&r1.grads[&format!("{p}self_attn.q_proj.bias")].1)),
            None => rel_err(&r2.grads[n].1, &doubled),
        };
        println!("cpu f32 packed grad {n}: rel err vs 2x single {e:.2e}");
        worst = worst.max(e);
    }
    report("cpu f32", "packed grads vs 2x single (worst tensor)", worst, 1e-5);
}

/// Feeds one sequence through a KV-cached session in chunks — [0, splits[0]), [splits[0],
/// splits[1]), …, then one token at a time — each chunk with the images whose placeholder runs
/// it holds; the cached logits must equal the full forward's rows.
fn kv_cache_check(dev: &Device, model: &LlavaNext, x: &Inputs, splits: &[usize], tol: f64, tag: &str) {
    let (ids, sizes, pixels) = (&x.ids, &x.sizes, &x.pixels);
    let s = ids.len();
    let f = model.forward(dev, &Batch { ids, cu_seqlens: &[0, s as i32], pixels, image_sizes: sizes }, &Recompute::default()).unwrap();
    let full = dev.to_vec(&model.logits(dev, &f).unwrap()).unwrap();
    let v = model.tdims.vocab;
    let img = model.cfg.image_token_index as i32;
    let run_starts: Vec<usize> = (0..s).filter(|&i| ids[i] == img && (i == 0 || ids[i - 1] != img)).collect();
    assert_eq!(run_starts.len(), sizes.len(), "one placeholder run per image");
    let tiles: Vec<usize> = model.geometries(sizes).unwrap().iter().map(|g| g.num_tiles()).collect();
    let tile_len = model.vdims.tile_len();
    let mut bounds = vec![0];
    bounds.extend_from_slice(splits);
    bounds.extend(splits.last().copied().unwrap_or(0) + 1..=s);
    let mut sess = model.new_session(dev, 1, s + 4).unwrap();
    let mut got = Vec::new();
    for w in bounds.windows(2) {
        let (a, b) = (w[0], w[1]);
        let imgs: Vec<usize> = (0..sizes.len()).filter(|&k| (a..b).contains(&run_starts[k])).collect();
        let sz: Vec<(usize, usize)> = imgs.iter().map(|&k| sizes[k]).collect();
        let px: Vec<f32> = imgs
            .iter()
            .flat_map(|&k| {
                let off: usize = tiles[..k].iter().sum();
                pixels[off * tile_len..(off + tiles[k]) * tile_len].to_vec()
            })
            .collect();
        let logits = dev.to_vec(&model.extend(dev, &mut sess, &ids[a..b], b - a, &px, &sz, false).unwrap_or_else(|e| panic!("{e:#}"))).unwrap();
        let e = rel_err(&logits, &full[a * v..b * v]);
        println!("{tag} kv-cache chunk {a}..{b} ({} image): logits rel err {e:.2e}", sz.len());
        got.extend(logits);
    }
    report(tag, "kv-cache prefill + append + decode logits vs full forward", rel_err(&got, &full), tol);
    let mut sess2 = model.new_session(dev, 1, s).unwrap();
    let last = dev.to_vec(&model.extend(dev, &mut sess2, ids, s, pixels, sizes, true).unwrap()).unwrap();
    report(tag, "last_only logits vs full forward's last row", rel_err(&last, &full[(s - 1) * v..]), tol);
}

/// The fixture dialogue: prefill through the first image and two more tokens, append a chunk
/// holding the second image, decode the last 3 tokens.
fn fixture_kv_cache_check(dev: &Device, dt: DType, tol: f64, tag: &str) {
    let fx = Fixture::load();
    let model = fx.model(dev, dt);
    let x = fx.inputs(&model);
    let img = fx.cfg.image_token_index as i32;
    let ends: Vec<usize> = (1..x.ids.len()).filter(|&i| x.ids[i - 1] == img && x.ids[i] != img).collect();
    assert!(ends.len() >= 2, "the fixture should have two images");
    kv_cache_check(dev, &model, &x, &[ends[0] + 2, x.ids.len() - 3], tol, tag);
}

#[test]
fn llava_cpu_kv_cache_matches_full_forward() {
    fixture_kv_cache_check(&Device::Cpu, DType::F32, 1e-5, "cpu f32");
}

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
    fixture_kv_cache_check(gpu, dt, tol.2, &tag);
}

#[test]
fn llava_cuda_f32_matches_transformers() {
    let Some(gpu) = cuda_or_skip("llava_cuda_f32_matches_transformers") else { return };
    cuda_check(&gpu, DType::F32, (1e-4, 1e-3, 1e-5));
}

#[test]
fn llava_cuda_bf16_matches_transformers() {
    let Some(gpu) = cuda_or_skip("llava_cuda_bf16_matches_transformers") else { return };
    cuda_check(&gpu, DType::BF16, (3e-2, 5e-2, 3e-2));
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
    check_grads(&fx, &r.grads, 5e-2, "cuda bf16, bf16 grad store");
}

/// A random LLaVA-NeXT with a Llama (MHA) decoder at the 7B head dims (CLIP 64, text 128: the
/// tensor-core attention kernels), same bf16-rounded weights on both devices.
#[test]
fn llava_cuda_bf16_llama_at_7b_head_dims_matches_cpu() {
    let Some(gpu) = cuda_or_skip("llava_cuda_bf16_llama_at_7b_head_dims_matches_cpu") else { return };
    head_dims_check(&gpu, DType::BF16, (3e-2, 5e-2), "cuda bf16 (llama, 7B head dims)");
}

/// The same set-up with the CPU on both sides (exercises the Llama path; the errors are 0).
#[test]
fn llava_cpu_llama_at_7b_head_dims_smoke() {
    head_dims_check(&Device::Cpu, DType::F32, (1e-6, 1e-6), "cpu f32 (llama, 7B head dims)");
}

fn head_dims_check(dev: &Device, dt: DType, tol: (f64, f64), tag: &str) {
    let fx = Fixture::load();
    let mut cfg = fx.cfg.clone();
    cfg.text.family = TextFamily::Llama;
    (cfg.text.hidden_size, cfg.text.num_attention_heads, cfg.text.num_key_value_heads, cfg.text.head_dim) = (256, 2, 2, 128);
    (cfg.text.intermediate_size, cfg.text.num_hidden_layers, cfg.text.sliding_window, cfg.text.rope_theta) = (192, 2, None, 10000.0);
    (cfg.vision.hidden_size, cfg.vision.num_attention_heads, cfg.vision.intermediate_size) = (128, 2, 96);
    let make_model = |dev: &Device, dt: DType| {
        LlavaNext::build(cfg.clone(), &mut |r| {
            let seed = r.name.bytes().fold(r.row0 as u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
            let mut rng = Rng::new(seed);
            let n = r.numel();
            let v: Vec<f32> = if r.name.contains("norm") && r.name.ends_with("weight") {
                rng.uniform_vec(n, 0.8, 1.2)
            } else if r.name.ends_with("bias") || r.name.contains("class_embedding") || r.name.contains("newline") {
                rng.normal_vec(n, 0.3)
            } else if r.name.contains("position_embedding") {
                rng.normal_vec(n, 0.5)
            } else {
                rng.normal_vec(n, 1.0 / (r.row_len() as f64).sqrt())
            };
            dev.upload(&bf16_round(&v), dt)
        })
        .unwrap_or_else(|e| panic!("{e:#}"))
    };
    let cpu_model = make_model(&Device::Cpu, DType::F32);
    // One wide image (two tiles side by side, then unpadded), text around it.
    let sizes = vec![(40usize, 100usize)];
    let geo = &cpu_model.geometries(&sizes).unwrap()[0];
    let mut rng = Rng::new(77);
    let mut ids: Vec<i32> = (0..5).map(|_| rng.below(500) as i32).collect();
    ids.extend(std::iter::repeat_n(cfg.image_token_index as i32, geo.num_tokens()));
    ids.extend((0..40).map(|_| rng.below(500) as i32));
    let s = ids.len();
    println!("{tag}: image {sizes:?} → {} tiles, {} tokens; sequence {s}", geo.num_tiles(), geo.num_tokens());
    let pixels = bf16_round(&rng.normal_vec(geo.num_tiles() * cpu_model.vdims.tile_len(), 1.0));
    let loss_mask: Vec<i32> = (0..s).map(|t| (t + 30 >= s) as i32).collect();
    let x = Inputs { cu: vec![0, s as i32], ids, pixels, sizes, loss_mask };
    let want = run_inputs(&x, &Device::Cpu, &mut make_model(&Device::Cpu, DType::F32), &Recompute::default());
    let model = make_model(dev, dt);
    kv_cache_check(dev, &model, &x, &[5 + geo.num_tokens() + 2, s - 4], tol.0, tag);
    let got = run_inputs(&x, dev, &mut make_model(dev, dt), &Recompute::default());
    report(tag, "logits vs cpu", rel_err(&got.logits, &want.logits), tol.0);
    report(tag, "token log-probs vs cpu", rel_err(&got.logp, &want.logp), tol.0);
    let mut failed = Vec::new();
    for (name, (_, g)) in &want.grads {
        let e = match name.strip_suffix("self_attn.k_proj.bias") {
            // Rounding noise on both sides (see cancelling_scale).
            Some(p) => rel_err_scaled(&got.grads[name].1, g, norm2(&want.grads[&format!("{p}self_attn.q_proj.bias")].1)),
            None => rel_err(&got.grads[name].1, g),
        };
        println!("{tag} grad {name}: rel err {e:.2e}");
        if e > tol.1 {
            failed.push(format!("{name}: {e:.2e}"));
        }
    }
    assert!(failed.is_empty(), "{tag}: gradients over {:.0e}: {failed:?}", tol.1);
}

/// Edge cases on the fixture weights: other feature layers (the last one: every layer gets a
/// gradient; the embeddings: none does), padding tiles dropped, and bad inputs rejected with
/// errors instead of panics.
#[test]
fn llava_cpu_feature_layers_and_input_errors() {
    let fx = Fixture::load();
    let dev = Device::Cpu;
    let n_layers = fx.cfg.vision.num_hidden_layers;
    for (layer, trained) in [(-1i64, n_layers), (0, 0)] {
        let mut cfg = fx.cfg.clone();
        cfg.vision_feature_layer = vec![layer];
        let mut model = LlavaNext::from_checkpoint_as(&dev, cfg, &Checkpoint::open(&fx.dir).unwrap(), DType::F32).unwrap();
        let x = fx.inputs(&model);
        let r = run_inputs(&x, &dev, &mut model, &Recompute::default());
        let vis_layers = (0..n_layers).filter(|l| r.grads.keys().any(|k| k.contains(&format!("encoder.layers.{l}.")))).count();
        println!("feature layer {layer}: objective {:.6}, {vis_layers} vision layers with gradients, {} tensors", r.objective, r.grads.len());
        assert_eq!(vis_layers, trained, "feature layer {layer}: vision layers with gradients");
        assert!(!r.grads.keys().any(|k| k.contains("post_layernorm")), "post_layernorm never gets a gradient");
        assert!(r.objective.is_finite());
    }

    let model = fx.model(&dev, DType::F32);
    // Padding tiles: image 0 keeps 2 of 3 tiles, image 1 all 3.
    let px: Vec<f32> = (0..2 * 3 * 4).map(|i| i as f32).collect();
    assert_eq!(strip_tile_padding(&px, 3, &[2, 3], 4).unwrap(), [&px[..8], &px[12..]].concat());
    assert!(strip_tile_padding(&px, 3, &[4, 3], 4).is_err());

    let x = fx.inputs(&model);
    let s = x.ids.len() as i32;
    let err = |ids: &[i32], pixels: &[f32], sizes: &[(usize, usize)]| {
        let cu = [0, ids.len() as i32];
        match model.forward(&dev, &Batch { ids, cu_seqlens: &cu, pixels, image_sizes: sizes }, &Recompute::default()) {
            Ok(_) => panic!("expected an error"),
            Err(e) => format!("{e:#}"),
        }
    };
    let e1 = err(&x.ids, &x.pixels, &x.sizes[..1]);
    println!("one image for two placeholder runs: {e1}");
    assert!(e1.contains("<image> tokens"), "{e1}");
    let e2 = err(&x.ids, &x.pixels[..x.pixels.len() - 1], &x.sizes);
    println!("short pixel_values: {e2}");
    assert!(e2.contains("pixel_values"), "{e2}");
    let bad_cu = model.forward(&dev, &Batch { ids: &x.ids, cu_seqlens: &[0, s - 1], pixels: &x.pixels, image_sizes: &x.sizes }, &Recompute::default());
    assert!(bad_cu.is_err(), "cu_seqlens not covering the ids must be rejected");
}
