//! Qwen2.5-VL model math against the transformers fixtures (`fixture_dir("qwen2_5_vl_tiny")`):
//! vision embeddings, logits, token log-probs, the objective Σ_t loss_mask[t+1]·logp[t] and
//! every parameter gradient, on the CPU in f32; activation checkpointing; KV-cached prefill +
//! appended turn + decode vs the full forward; and the same checks on CUDA in bf16 (skipped
//! without a GPU).
//!
//! Nothing is taken from the shared fixture's particulars: the number of images and their grids,
//! the config layout (flat, or nested `text_config`), the key layout (`visual.*`/`model.*` or
//! `model.visual.*`/`model.language_model.*`: gradients are compared under the checkpoint's own
//! names, as `am3 forward` writes them) are read from the files.
//! `qwen_cpu_layout_variants_match_transformers` reruns the fixture checks on copies of the
//! fixture in the other layouts (`common/fixture_variant.rs`), and
//! `qwen_cpu_kv_cache_three_images` runs the KV cache on a random model with three images, two
//! of them back to back in one turn.
//!
//! No Qwen2.5-VL gradient is zero in theory: (M-)RoPE rotates the key biases (text `k_proj.bias`,
//! the key third of the vision `qkv.bias`) before the dot product, so they do not cancel in the
//! softmax as CLIP's do (`common::cancelling_sibling`), and every gradient is compared plainly.
mod common;
#[path = "common/fixture_variant.rs"]
mod fixture_variant;
use am3safety::checkpoint::{read_tensor_file, Checkpoint};
use am3safety::models::common::params::{GradStore, NamedTensors};
use am3safety::models::common::train_state::TrainState;
use am3safety::models::qwen2_5_vl::config::QwenVlConfig;
use am3safety::models::qwen2_5_vl::model::{Batch, QwenVl, Recompute};
use am3safety::models::qwen2_5_vl::positions::{mrope_positions, MropeState};
use am3safety::models::qwen2_5_vl::vision::VisionLayout;
use am3safety::stages::model::VlModel;
use am3safety::tensor::{DType, Device};
use common::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

type Tensors = HashMap<String, (Vec<usize>, Vec<f64>)>;

struct Fixture {
    dir: PathBuf,
    cfg: QwenVlConfig,
    inputs: Tensors,
    reference: Tensors,
    /// Model (canonical) name → the name the checkpoint stores it under: the names `am3
    /// forward` writes gradients under (`VlModel::load`'s mapping).
    stored: BTreeMap<String, String>,
}

impl Fixture {
    fn load() -> Fixture {
        Self::load_from(&fixture_dir("qwen2_5_vl_tiny"))
    }
    fn load_from(dir: &Path) -> Fixture {
        let read = |f: &str| {
            read_tensor_file(dir.join(f)).unwrap_or_else(|e| panic!("reading {f} in {}: {e:#}", dir.display()))
        };
        let cfg = QwenVlConfig::load(dir).unwrap_or_else(|e| panic!("{e:#}"));
        let vl = VlModel::load(&Device::Cpu, dir).unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()));
        let stored: BTreeMap<String, String> =
            vl.param_entries().iter().map(|(r, _)| (r.name.clone(), vl.stored_name(&r.name).to_string())).collect();
        let ckpt = Checkpoint::open(dir).unwrap();
        for s in stored.values() {
            assert!(ckpt.has(s), "{}: `{s}` is not a tensor of the checkpoint", dir.display());
        }
        Fixture {
            cfg,
            inputs: read("inputs.safetensors"),
            reference: read("reference.safetensors"),
            dir: dir.to_path_buf(),
            stored,
        }
    }
    fn ints(t: &Tensors, name: &str) -> Vec<i32> {
        t[name].1.iter().map(|&x| x as i32).collect()
    }
    fn ids(&self) -> Vec<i32> {
        Self::ints(&self.inputs, "input_ids")
    }
    fn grids(&self) -> Vec<[usize; 3]> {
        match self.inputs.get("image_grid_thw") {
            Some((_, g)) => g.chunks(3).map(|g| [g[0] as usize, g[1] as usize, g[2] as usize]).collect(),
            None => Vec::new(),
        }
    }
    fn pixels(&self) -> Vec<f32> {
        match self.inputs.get("pixel_values") {
            Some((_, p)) => p.iter().map(|&x| x as f32).collect(),
            None => Vec::new(),
        }
    }
    fn reference(&self, name: &str) -> Vec<f32> {
        self.reference[name].1.iter().map(|&x| x as f32).collect()
    }
    fn model(&self, dev: &Device, dt: DType) -> QwenVl {
        QwenVl::from_checkpoint_as(dev, self.cfg.clone(), &Checkpoint::open(&self.dir).unwrap(), dt).unwrap()
    }
    /// Gradients keyed by model name → keyed by the checkpoint's own names.
    fn under_stored_names(&self, got: &NamedTensors) -> NamedTensors {
        got.iter()
            .map(|(n, v)| {
                (
                    self.stored.get(n).unwrap_or_else(|| panic!("gradient of `{n}`, which is no parameter")).clone(),
                    v.clone(),
                )
            })
            .collect()
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
        let loss_mask = if self.inputs.contains_key("loss_mask") {
            Self::ints(&self.inputs, "loss_mask")
        } else {
            vec![1; ids.len()]
        };
        Inputs { cu: vec![0, ids.len() as i32], pos3, pixels: self.pixels(), loss_mask, ids, grids }
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

/// Compares every gradient with grads.safetensors under the checkpoint's own names; returns
/// the worst relative error. Parameters the reference leaves out must get none (or zero) here.
fn check_grads(fx: &Fixture, got: &NamedTensors, tol: f64, tag: &str) -> f64 {
    let got = fx.under_stored_names(got);
    let want: NamedTensors = read_tensor_file(fx.dir.join("grads.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(n, (s, v))| (n, (s, v.iter().map(|&x| x as f32).collect())))
        .collect();
    let names: BTreeSet<&String> = fx.stored.values().collect();
    let mut worst = 0f64;
    let mut failed = Vec::new();
    for (name, (shape, _)) in &want {
        if !names.contains(name) {
            failed.push(format!("{name}: the reference gradient is not keyed by a tensor name of the checkpoint"));
            continue;
        }
        let Some((gs, g)) = got.get(name) else {
            failed.push(format!("{name}: no gradient"));
            continue;
        };
        assert_eq!(gs, shape, "{tag} grad {name}: shape");
        let e = named_grad_err(name, g, &want, false);
        println!("{tag} grad {name} {shape:?}: rel err {e:.2e}");
        worst = worst.max(e);
        if e > tol {
            failed.push(format!("{name}: {e:.2e}"));
        }
    }
    // Parameters the reference gives no gradient must get none here either.
    for (name, (_, g)) in &got {
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
    worst
}

/// Worst error of `got` against `want` (the same model, two runs).
fn worst_grad_err(got: &NamedTensors, want: &NamedTensors, tag: &str) -> f64 {
    assert_eq!(got.len(), want.len(), "{tag}: the two runs have different gradient sets");
    want.iter()
        .map(|(n, (_, w))| {
            let (_, g) = got.get(n).unwrap_or_else(|| panic!("{tag}: no gradient for {n}"));
            assert_eq!(g.len(), w.len(), "{tag} grad {n}: size");
            named_grad_err(n, g, want, false)
        })
        .fold(0f64, f64::max)
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

/// The vision tower + merger output of every image vs vision_reference.safetensors
/// `image_embeds` (all images' tokens in order).
fn check_vision_embeds(fx: &Fixture, dev: &Device, model: &QwenVl, tol: f64, tag: &str) {
    let grids = fx.grids();
    if grids.is_empty() {
        println!("{tag}: no images in the inputs");
        return;
    }
    let (shape, want) = &read_tensor_file(fx.dir.join("vision_reference.safetensors")).unwrap()["image_embeds"];
    let merge = fx.cfg.vision.spatial_merge_size;
    let tokens: usize = grids.iter().map(|g| g[0] * g[1] * g[2] / (merge * merge)).sum();
    assert_eq!(shape[..], [tokens, fx.cfg.text.hidden_size], "{tag}: image_embeds shape for grids {grids:?}");
    let want: Vec<f32> = want.iter().map(|&x| x as f32).collect();
    let got = dev.to_vec(&model.image_embeds(dev, &fx.pixels(), &grids).unwrap()).unwrap();
    report(tag, &format!("vision image_embeds ({} images, grids {grids:?})", grids.len()), rel_err(&got, &want), tol);
}

#[test]
fn qwen_cpu_vision_embeds() {
    let fx = Fixture::load();
    let dev = Device::Cpu;
    check_vision_embeds(&fx, &dev, &fx.model(&dev, DType::F32), 1e-4, "cpu f32");
}

/// Positions, logits, log-probs, objective and every gradient (under the checkpoint's names)
/// against the fixture's references, on the CPU in f32; recompute-all gives the same numbers.
fn cpu_matches_transformers(fx: &Fixture, tag: &str) {
    let dev = Device::Cpu;
    let (pos3, _) = mrope_positions(&fx.ids(), &fx.grids(), &fx.cfg).unwrap();
    assert_eq!(pos3, Fixture::ints(&fx.reference, "position_ids"), "{tag}: M-RoPE positions differ from the reference");
    println!(
        "{tag}: {} images, grids {:?}; {} tensors, e.g. {:?}",
        fx.grids().len(),
        fx.grids(),
        fx.stored.len(),
        fx.stored.values().filter(|n| n.contains("patch_embed") || n.contains("embed_tokens")).collect::<Vec<_>>()
    );
    let mut model = fx.model(&dev, DType::F32);
    let r = run(fx, &dev, &mut model, &Recompute::default());
    report(tag, "logits", rel_err(&r.logits, &fx.reference("logits")), 1e-4);
    report(tag, "token log-probs", rel_err(&r.logp, &fx.reference("token_logprobs")), 1e-4);
    let want = fx.reference["objective"].1[0];
    report(tag, &format!("objective ({:.6} vs {want:.6})", r.objective), ((r.objective - want) / want).abs(), 1e-5);
    check_grads(fx, &r.grads, 1e-3, tag);

    // Activation checkpointing recomputes the same numbers.
    let mut model2 = fx.model(&dev, DType::F32);
    let r2 = run(fx, &dev, &mut model2, &Recompute::all(fx.cfg.text.num_hidden_layers));
    report(
        tag,
        "recompute-all grads vs kept activations (worst tensor)",
        worst_grad_err(&r2.grads, &r.grads, tag),
        1e-6,
    );
    report(tag, "recompute-all logits vs kept", rel_err(&r2.logits, &r.logits), 1e-7);
}

#[test]
fn qwen_cpu_matches_transformers() {
    cpu_matches_transformers(&Fixture::load(), "cpu f32");
}

/// The fixture in the other layouts transformers writes (`fixture_variant`: config.json flat ⇄
/// nested `text_config`/`rope_parameters`; keys published ⇄ `model.visual.*` +
/// `model.language_model.*` in two shards), written to a temporary directory: the same config,
/// vision embeddings, positions, logits, log-probs and objective, and every gradient under the
/// variant's own names.
#[test]
fn qwen_cpu_layout_variants_match_transformers() {
    let src = fixture_dir("qwen2_5_vl_tiny");
    let base = Fixture::load_from(&src);
    let root = fresh_tmp_dir("qwen-layouts");
    for v in fixture_variant::qwen_variants(&src, &root) {
        let tag = format!("variant {}", v.name);
        println!("{tag}: {}", v.what);
        let fx = Fixture::load_from(&v.dir);
        assert_eq!(fx.cfg, base.cfg, "{tag}: the rewritten config means another model");
        for (canon, stored) in &base.stored {
            assert_eq!(&fx.stored[canon], &v.renamed[stored], "{tag}: {canon}");
        }
        let changed = base.stored.values().filter(|n| &v.renamed[*n] != *n).count();
        let config_changed =
            std::fs::read(v.dir.join("config.json")).unwrap() != std::fs::read(src.join("config.json")).unwrap();
        assert!(changed > 0 || config_changed, "{tag}: the variant is the source");
        println!(
            "{tag}: {changed} of {} tensor names differ from the source's; config.json rewritten: {config_changed}",
            base.stored.len()
        );
        check_vision_embeds(&fx, &Device::Cpu, &fx.model(&Device::Cpu, DType::F32), 1e-4, &tag);
        cpu_matches_transformers(&fx, &tag);
        fixture_kv_cache_check_in(&fx, &Device::Cpu, DType::F32, 1e-5, &tag);
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// With `AM3_WRITE_FIXTURE_VARIANTS=DIR`, writes the layout variants to `DIR/<variant>/` for
/// running every test on one of them (`AM3_FIXTURES=DIR/<variant> cargo test --release ...`).
#[test]
fn qwen_write_fixture_variants() {
    let Ok(root) = std::env::var("AM3_WRITE_FIXTURE_VARIANTS") else {
        println!("qwen_write_fixture_variants: skipped: AM3_WRITE_FIXTURE_VARIANTS is not set");
        return;
    };
    for v in fixture_variant::qwen_variants(&fixture_dir("qwen2_5_vl_tiny"), Path::new(&root)) {
        println!("{}: {} ({})", v.name, v.dir.display(), v.what);
    }
    let synthetic = Path::new(&root).join("qwen-synthetic").join("qwen2_5_vl_tiny");
    write_synthetic_fixture(&synthetic);
    println!(
        "qwen-synthetic: {} (random model, nested config, model.* keys, 3 images; its own references)",
        synthetic.display()
    );
}

/// Feeds a single sequence through a KV-cached session in chunks — [0, splits[0]),
/// [splits[0], splits[1]), …, then one token at a time from the last split — each chunk with the
/// images whose placeholder tokens it holds (image k has the next t·h·w/merge² placeholders,
/// wherever the runs start and end); the cached logits must equal the full forward's rows.
fn kv_cache_check(dev: &Device, model: &QwenVl, cfg: &QwenVlConfig, x: &Inputs, splits: &[usize], tol: f64, tag: &str) {
    let (ids, grids, pixels, pos_full) = (&x.ids, &x.grids, &x.pixels, &x.pos3);
    let s = ids.len();
    let f = model
        .forward(dev, &Batch { ids, cu_seqlens: &[0, s as i32], pos3: pos_full, pixels, grids }, &Recompute::default())
        .unwrap();
    let full = dev.to_vec(&model.logits(dev, &f).unwrap()).unwrap();
    let v = cfg.text.vocab_size;
    let merge = cfg.vision.spatial_merge_size;
    let per_img: Vec<usize> = grids.iter().map(|g| g[0] * g[1] * g[2]).collect();
    let spans =
        image_spans(ids, cfg.image_token_id as i64, &per_img.iter().map(|n| n / (merge * merge)).collect::<Vec<_>>());
    let patch_dim = cfg.vision.patch_dim();
    assert_eq!(pixels.len(), per_img.iter().sum::<usize>() * patch_dim, "pixel_values rows vs the grids {grids:?}");
    println!("{tag} kv-cache: {s} tokens, images at {spans:?}, splits {splits:?}");
    let mut bounds = vec![0];
    bounds.extend_from_slice(splits);
    bounds.extend(splits.last().copied().unwrap_or(0) + 1..=s);
    let mut sess = model.new_session(dev, 1, s + 4).unwrap();
    let mut st = MropeState::new(cfg);
    let mut got = Vec::new();
    for w in bounds.windows(2) {
        let (a, b) = (w[0], w[1]);
        let imgs = images_in_chunk(&spans, a, b);
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
        if n > 1 || !imgs.is_empty() || b == s {
            println!("{tag} kv-cache chunk {a}..{b} (images {imgs:?}): logits rel err {e:.2e}");
        }
        got.extend(logits);
    }
    report(tag, "kv-cache prefill + append + decode logits vs full forward", rel_err(&got, &full), tol);
    // Sampling path: only the last row.
    let mut sess2 = model.new_session(dev, 1, s).unwrap();
    let last = dev.to_vec(&model.extend(dev, &mut sess2, ids, pos_full, s, pixels, grids, true).unwrap()).unwrap();
    report(tag, "last_only logits vs full forward's last row", rel_err(&last, &full[(s - 1) * v..]), tol);
}

/// The fixture dialogue (`kv_splits`): prefill through the first image and two more tokens,
/// append a chunk holding the other images, decode the last tokens.
fn fixture_kv_cache_check_in(fx: &Fixture, dev: &Device, dt: DType, tol: f64, tag: &str) {
    let x = fx.inputs();
    let merge = fx.cfg.vision.spatial_merge_size;
    let counts: Vec<usize> = x.grids.iter().map(|g| g[0] * g[1] * g[2] / (merge * merge)).collect();
    let splits = kv_splits(&image_spans(&x.ids, fx.cfg.image_token_id as i64, &counts), x.ids.len());
    kv_cache_check(dev, &fx.model(dev, dt), &fx.cfg, &x, &splits, tol, tag);
}

fn fixture_kv_cache_check(dev: &Device, dt: DType, tol: f64, tag: &str) {
    fixture_kv_cache_check_in(&Fixture::load(), dev, dt, tol, tag);
}

#[test]
fn qwen_cpu_kv_cache_matches_full_forward() {
    fixture_kv_cache_check(&Device::Cpu, DType::F32, 1e-5, "cpu f32");
}

/// A dialogue with three images for a model of `cfg`: text, images 0 and 1 back to back in one
/// turn (`<|vision_start|>…<|vision_end|><|vision_start|>…<|vision_end|>`), text, image 2,
/// text; random pixels; the loss mask on the text after the images. Returns the inputs and each
/// image's placeholder tokens.
fn three_image_inputs(cfg: &QwenVlConfig) -> (Inputs, Vec<std::ops::Range<usize>>) {
    let m = cfg.vision.spatial_merge_size;
    let grids = vec![[1usize, 2 * m, 2 * m], [1, 2 * m, 3 * m], [1, 3 * m, 2 * m]];
    let mut rng = Rng::new(9);
    let reserved =
        [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id].map(|t| t as i64);
    let vocab = cfg.text.vocab_size;
    let mut ids = text_ids(&mut rng, 6, vocab, &reserved);
    let mut loss_mask = vec![0; ids.len()];
    for (k, g) in grids.iter().enumerate() {
        if k == 2 {
            ids.extend(text_ids(&mut rng, 8, vocab, &reserved));
            loss_mask.resize(ids.len(), 1);
        }
        ids.push(cfg.vision_start_token_id as i32);
        ids.extend(std::iter::repeat_n(cfg.image_token_id as i32, g[0] * g[1] * g[2] / (m * m)));
        ids.push(cfg.vision_end_token_id as i32);
        loss_mask.resize(ids.len(), 0);
    }
    ids.extend(text_ids(&mut rng, 7, vocab, &reserved));
    loss_mask.resize(ids.len(), 1);
    let s = ids.len();
    let (pos3, _) = mrope_positions(&ids, &grids, cfg).unwrap();
    let n_patches: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
    let pixels = bf16_round(&rng.normal_vec(n_patches * cfg.vision.patch_dim(), 1.0));
    let spans = image_spans(
        &ids,
        cfg.image_token_id as i64,
        &grids.iter().map(|g| g[0] * g[1] * g[2] / (m * m)).collect::<Vec<_>>(),
    );
    assert_eq!(spans[0].end + 2, spans[1].start, "images 0 and 1 are back to back");
    (Inputs { cu: vec![0, s as i32], pos3, pixels, grids, loss_mask, ids }, spans)
}

/// A random model of the fixture's config with three images, two of them back to back in one
/// turn, the third in a later turn. The KV-cached logits and M-RoPE positions equal the full
/// forward's for several chunkings (between the two images, both in one chunk, a text-only
/// prefill).
#[test]
fn qwen_cpu_kv_cache_three_images() {
    let cfg = Fixture::load().cfg;
    let dev = Device::Cpu;
    let model = random_qwen(&cfg, &dev, DType::F32);
    let (x, spans) = three_image_inputs(&cfg);
    let s = x.ids.len();
    let tag = "cpu f32 (three images)";
    kv_cache_check(&dev, &model, &cfg, &x, &kv_splits(&spans, s), 1e-5, tag);
    kv_cache_check(
        &dev,
        &model,
        &cfg,
        &x,
        &[spans[0].end + 1, s - 2],
        1e-5,
        &format!("{tag}, split between images 0 and 1"),
    );
    kv_cache_check(
        &dev,
        &model,
        &cfg,
        &x,
        &[spans[0].start - 3, spans[1].end + 1, spans[2].end + 1],
        1e-5,
        &format!("{tag}, two images in one chunk"),
    );
}

/// Writes a directory in the fixtures' format (`../shared/fixtures/README.md`) for a random
/// model of the fixture's config in the other layouts: config.json nested (`text_config`,
/// `rope_parameters`, as transformers 5 writes it), keys `model.visual.*` /
/// `model.language_model.*`, and a dialogue with three images, two back to back. The references
/// are this model's own CPU numbers, so the fixture checks run on it test the tests (layout,
/// names, image placement), not the math against transformers.
fn write_synthetic_fixture(dir: &Path) {
    use am3safety::checkpoint::safetensors_io::SaveDtype;
    use am3safety::stages::forward::{write_tensors, OutData};
    use am3safety::stages::model::save_weights;
    let keys = fixture_variant::QwenKeys::Modules;
    let cfg = Fixture::load().cfg;
    let dev = Device::Cpu;
    let mut model = random_qwen(&cfg, &dev, DType::F32);
    std::fs::create_dir_all(dir).unwrap();
    save_weights(&dev, model.param_entries(), &|n| keys.spell(n), dir, SaveDtype::F32).unwrap();
    let (nested, _) = fixture_variant::qwen_other_config(&cfg.to_json());
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&nested).unwrap()).unwrap();
    let (x, _) = three_image_inputs(&cfg);
    let s = x.ids.len();
    let i64s = |v: &[i32]| OutData::I64(v.iter().map(|&x| x as i64).collect());
    let grids: Vec<i32> = x.grids.iter().flat_map(|g| g.map(|v| v as i32)).collect();
    let patch_dim = cfg.vision.patch_dim();
    write_tensors(
        &dir.join("inputs.safetensors"),
        &[
            ("input_ids".into(), vec![1, s], i64s(&x.ids)),
            ("loss_mask".into(), vec![1, s], i64s(&x.loss_mask)),
            ("pixel_values".into(), vec![x.pixels.len() / patch_dim, patch_dim], OutData::F32(x.pixels.clone())),
            ("image_grid_thw".into(), vec![x.grids.len(), 3], i64s(&grids)),
        ],
    )
    .unwrap();
    let r = run_inputs(&x, &dev, &mut model, &Recompute::default());
    write_tensors(
        &dir.join("reference.safetensors"),
        &[
            ("logits".into(), vec![s, cfg.text.vocab_size], OutData::F32(r.logits)),
            ("token_logprobs".into(), vec![s - 1], OutData::F32(r.logp)),
            ("objective".into(), vec![1], OutData::F32(vec![r.objective as f32])),
            ("position_ids".into(), vec![3, s], i64s(&x.pos3)),
        ],
    )
    .unwrap();
    let grads: Vec<(String, Vec<usize>, OutData)> =
        r.grads.into_iter().map(|(n, (sh, g))| (keys.spell(&n), sh, OutData::F32(g))).collect();
    write_tensors(&dir.join("grads.safetensors"), &grads).unwrap();
    let embeds = dev.to_vec(&model.image_embeds(&dev, &x.pixels, &x.grids).unwrap()).unwrap();
    let d = cfg.text.hidden_size;
    write_tensors(
        &dir.join("vision_reference.safetensors"),
        &[("image_embeds".into(), vec![embeds.len() / d, d], OutData::F32(embeds))],
    )
    .unwrap();
}

/// Every fixture check on a checkpoint in the other layouts (`write_synthetic_fixture`: nested
/// config, `model.visual.*` / `model.language_model.*` keys, three images): the checks read all
/// of that from the files, and the gradients are found under the checkpoint's names.
#[test]
fn qwen_cpu_fixture_checks_on_a_synthetic_checkpoint() {
    let root = fresh_tmp_dir("qwen-synthetic");
    let dir = root.join("qwen2_5_vl_tiny");
    write_synthetic_fixture(&dir);
    let fx = Fixture::load_from(&dir);
    let tag = "synthetic (nested config, model.* keys, three images)";
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert!(config.get("text_config").is_some() && config.get("hidden_size").is_none(), "{tag}: nested config");
    assert!(fx.stored.values().all(|n| n.starts_with("model.") || n == "lm_head.weight"), "{tag}: key layout");
    assert_eq!(fx.grids().len(), 3, "{tag}: images");
    check_vision_embeds(&fx, &Device::Cpu, &fx.model(&Device::Cpu, DType::F32), 1e-6, tag);
    cpu_matches_transformers(&fx, tag);
    fixture_kv_cache_check_in(&fx, &Device::Cpu, DType::F32, 1e-5, tag);
    let _ = std::fs::remove_dir_all(&root);
}

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
        if want == DType::BF16 {
            n16 += 1
        } else {
            n32 += 1
        }
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
    let doubled: NamedTensors =
        r1.grads.iter().map(|(n, (sh, g))| (n.clone(), (sh.clone(), g.iter().map(|x| 2.0 * x).collect()))).collect();
    report("cpu f32", "packed grads vs 2x single (worst tensor)", worst_grad_err(&r2.grads, &doubled, "packed"), 1e-5);
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

/// A Qwen2.5-VL of `cfg` with seeded random weights (the same on every device, bf16-rounded):
/// norms around 1, biases N(0, 0.05), matrices N(0, 1/fan-in).
fn random_qwen(cfg: &QwenVlConfig, dev: &Device, dt: DType) -> QwenVl {
    QwenVl::build(cfg.clone(), &mut |r| {
        let seed = r.name.bytes().fold(r.row0 as u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
        let mut rng = Rng::new(seed);
        let n = r.numel();
        let v: Vec<f32> = if r.name.ends_with("norm.weight")
            || r.name.contains("layernorm")
            || r.name.contains(".norm")
            || r.name.contains("ln_q")
        {
            rng.uniform_vec(n, 0.8, 1.2)
        } else if r.name.ends_with("bias") {
            rng.normal_vec(n, 0.05)
        } else {
            rng.normal_vec(n, 1.0 / (r.row_len() as f64).sqrt())
        };
        dev.upload(&bf16_round(&v), dt)
    })
    .unwrap()
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
