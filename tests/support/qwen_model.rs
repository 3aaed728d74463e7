//! The Qwen2.5-VL model tests' shared part: the transformers fixture (inputs, references,
//! gradients), one forward/backward run, the gradient, vision embedding and KV-cache checks, and
//! the random model (three images) the synthetic checkpoint is written from.
#![allow(dead_code)]

use super::common::*;
use super::fixture_variant;
use am3safety::checkpoint::{read_tensor_file, Checkpoint};
use am3safety::models::common::params::NamedTensors;
use am3safety::models::common::train_state::TrainState;
use am3safety::models::qwen2_5_vl::config::QwenVlConfig;
use am3safety::models::qwen2_5_vl::model::{Batch, Extend, QwenVl, Recompute};
use am3safety::models::qwen2_5_vl::positions::{mrope_positions, MropeState};
use am3safety::stages::model::VlModel;
use am3safety::tensor::{DType, Device};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

pub type Tensors = HashMap<String, (Vec<usize>, Vec<f64>)>;

pub struct Fixture {
    pub dir: PathBuf,
    pub cfg: QwenVlConfig,
    pub inputs: Tensors,
    pub reference: Tensors,
    /// Model (canonical) name → the name the checkpoint stores it under: the names `am3
    /// forward` writes gradients under (`VlModel::load`'s mapping).
    pub stored: BTreeMap<String, String>,
}

impl Fixture {
    pub fn load() -> Fixture {
        Self::load_from(&fixture_dir("qwen2_5_vl_tiny"))
    }
    pub fn load_from(dir: &Path) -> Fixture {
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
    pub fn ints(t: &Tensors, name: &str) -> Vec<i32> {
        t[name].1.iter().map(|&x| x as i32).collect()
    }
    pub fn ids(&self) -> Vec<i32> {
        Self::ints(&self.inputs, "input_ids")
    }
    pub fn grids(&self) -> Vec<[usize; 3]> {
        match self.inputs.get("image_grid_thw") {
            Some((_, g)) => g.chunks(3).map(|g| [g[0] as usize, g[1] as usize, g[2] as usize]).collect(),
            None => Vec::new(),
        }
    }
    pub fn pixels(&self) -> Vec<f32> {
        match self.inputs.get("pixel_values") {
            Some((_, p)) => p.iter().map(|&x| x as f32).collect(),
            None => Vec::new(),
        }
    }
    pub fn reference(&self, name: &str) -> Vec<f32> {
        self.reference[name].1.iter().map(|&x| x as f32).collect()
    }
    pub fn model(&self, dev: &Device, dt: DType) -> QwenVl {
        QwenVl::from_checkpoint_as(dev, self.cfg.clone(), &Checkpoint::open(&self.dir).unwrap(), dt).unwrap()
    }
    /// Gradients keyed by model name → keyed by the checkpoint's own names.
    pub fn under_stored_names(&self, got: &NamedTensors) -> NamedTensors {
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
pub struct Run {
    pub logits: Vec<f32>,
    pub logp: Vec<f32>, // [S - 1]
    pub objective: f64,
    pub grads: NamedTensors,
}

/// One sequence (or several packed) with its images and loss mask.
pub struct Inputs {
    pub ids: Vec<i32>,
    pub cu: Vec<i32>,
    pub pos3: Vec<i32>,
    pub pixels: Vec<f32>,
    pub grids: Vec<[usize; 3]>,
    pub loss_mask: Vec<i32>,
}

impl Fixture {
    pub fn inputs(&self) -> Inputs {
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

pub fn run(fx: &Fixture, dev: &Device, model: &mut QwenVl, rc: &Recompute) -> Run {
    run_inputs(&fx.inputs(), dev, model, rc)
}

/// Forward, logits, log-probs of the next token within each sequence, the objective
/// Σ loss_mask[t+1]·logp[t], and the backward of the objective.
pub fn run_inputs(x: &Inputs, dev: &Device, model: &mut QwenVl, rc: &Recompute) -> Run {
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
pub fn check_grads(fx: &Fixture, got: &NamedTensors, tol: f64, tag: &str) -> f64 {
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
pub fn worst_grad_err(got: &NamedTensors, want: &NamedTensors, tag: &str) -> f64 {
    assert_eq!(got.len(), want.len(), "{tag}: the two runs have different gradient sets");
    want.iter()
        .map(|(n, (_, w))| {
            let (_, g) = got.get(n).unwrap_or_else(|| panic!("{tag}: no gradient for {n}"));
            assert_eq!(g.len(), w.len(), "{tag} grad {n}: size");
            named_grad_err(n, g, want, false)
        })
        .fold(0f64, f64::max)
}

/// The vision tower + merger output of every image vs vision_reference.safetensors
/// `image_embeds` (all images' tokens in order).
pub fn check_vision_embeds(fx: &Fixture, dev: &Device, model: &QwenVl, tol: f64, tag: &str) {
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

/// Positions, logits, log-probs, objective and every gradient (under the checkpoint's names)
/// against the fixture's references, on the CPU in f32; recompute-all gives the same numbers.
pub fn cpu_matches_transformers(fx: &Fixture, tag: &str) {
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
    report(tag, "logits", rel_err(&r.logits, &fx.reference("logits")), Tol::FixtureLogits);
    report(tag, "token log-probs", rel_err(&r.logp, &fx.reference("token_logprobs")), Tol::FixtureLogits);
    let want = fx.reference["objective"].1[0];
    report(
        tag,
        &format!("objective ({:.6} vs {want:.6})", r.objective),
        ((r.objective - want) / want).abs(),
        Tol::FixtureObjective,
    );
    check_grads(fx, &r.grads, Tol::FixtureGrads.value(), tag);

    // Activation checkpointing recomputes the same numbers.
    let mut model2 = fx.model(&dev, DType::F32);
    let r2 = run(fx, &dev, &mut model2, &Recompute::all(fx.cfg.text.num_hidden_layers));
    report(
        tag,
        "recompute-all grads vs kept activations (worst tensor)",
        worst_grad_err(&r2.grads, &r.grads, tag),
        Tol::RecomputeGrads,
    );
    report(tag, "recompute-all logits vs kept", rel_err(&r2.logits, &r.logits), Tol::Recompute);
}

/// Feeds a single sequence through a KV-cached session in chunks — [0, splits[0]),
/// [splits[0], splits[1]), …, then one token at a time from the last split — each chunk with the
/// images whose placeholder tokens it holds (image k has the next t·h·w/merge² placeholders,
/// wherever the runs start and end); the cached logits must equal the full forward's rows.
pub fn kv_cache_check(
    dev: &Device, model: &QwenVl, cfg: &QwenVlConfig, x: &Inputs, splits: &[usize], tol: f64, tag: &str,
) {
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
        let x = Extend { ids: &ids[a..b], pos3: &pos, n_new: n, pixels: &px, grids: &g };
        let logits = dev.to_vec(&model.extend(dev, &mut sess, x, false).unwrap()).unwrap();
        let e = rel_err(&logits, &full[a * v..b * v]);
        if n > 1 || !imgs.is_empty() || b == s {
            println!("{tag} kv-cache chunk {a}..{b} (images {imgs:?}): logits rel err {e:.2e}");
        }
        got.extend(logits);
    }
    report(tag, "kv-cache prefill + append + decode logits vs full forward", rel_err(&got, &full), tol);
    // Sampling path: only the last row.
    let mut sess2 = model.new_session(dev, 1, s).unwrap();
    let x = Extend { ids, pos3: pos_full, n_new: s, pixels, grids };
    let last = dev.to_vec(&model.extend(dev, &mut sess2, x, true).unwrap()).unwrap();
    report(tag, "last_only logits vs full forward's last row", rel_err(&last, &full[(s - 1) * v..]), tol);
}

/// The fixture dialogue (`kv_splits`): prefill through the first image and two more tokens,
/// append a chunk holding the other images, decode the last tokens.
pub fn fixture_kv_cache_check_in(fx: &Fixture, dev: &Device, dt: DType, tol: f64, tag: &str) {
    let x = fx.inputs();
    let merge = fx.cfg.vision.spatial_merge_size;
    let counts: Vec<usize> = x.grids.iter().map(|g| g[0] * g[1] * g[2] / (merge * merge)).collect();
    let splits = kv_splits(&image_spans(&x.ids, fx.cfg.image_token_id as i64, &counts), x.ids.len());
    kv_cache_check(dev, &fx.model(dev, dt), &fx.cfg, &x, &splits, tol, tag);
}

pub fn fixture_kv_cache_check(dev: &Device, dt: DType, tol: f64, tag: &str) {
    fixture_kv_cache_check_in(&Fixture::load(), dev, dt, tol, tag);
}

/// A dialogue with three images for a model of `cfg`: text, images 0 and 1 back to back in one
/// turn (`<|vision_start|>…<|vision_end|><|vision_start|>…<|vision_end|>`), text, image 2,
/// text; random pixels; the loss mask on the text after the images. Returns the inputs and each
/// image's placeholder tokens.
pub fn three_image_inputs(cfg: &QwenVlConfig) -> (Inputs, Vec<std::ops::Range<usize>>) {
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

/// Writes a directory in the fixtures' format (`../shared/fixtures/README.md`) for a random
/// model of the fixture's config in the other layouts: config.json nested (`text_config`,
/// `rope_parameters`, as transformers 5 writes it), keys `model.visual.*` /
/// `model.language_model.*`, and a dialogue with three images, two back to back. The references
/// are this model's own CPU numbers, so the fixture checks run on it test the tests (layout,
/// names, image placement), not the math against transformers.
pub fn write_synthetic_fixture(dir: &Path) {
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

/// A Qwen2.5-VL of `cfg` with seeded random weights (the same on every device, bf16-rounded):
/// norms around 1, biases N(0, 0.05), matrices N(0, 1/fan-in).
pub fn random_qwen(cfg: &QwenVlConfig, dev: &Device, dt: DType) -> QwenVl {
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
