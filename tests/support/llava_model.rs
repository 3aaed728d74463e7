//! The LLaVA-NeXT model tests' shared part: the transformers fixture (inputs, references,
//! gradients under the checkpoint's own names), one forward/backward run, the gradient, image
//! embedding and KV-cache checks, and the random models (a tiny Llama, three images side by side)
//! the synthetic checkpoint is written from.
#![allow(dead_code)]

use super::common::*;
use super::fixture_variant;
use am3safety::checkpoint::{read_tensor_file, Checkpoint};
use am3safety::models::common::params::NamedTensors;
use am3safety::models::common::train_state::TrainState;
use am3safety::models::llava_next::config::{LlavaNextConfig, TextFamily};
use am3safety::models::llava_next::model::{strip_tile_padding, Batch, Extend, LlavaNext, Recompute};
use am3safety::stages::model::VlModel;
use am3safety::tensor::{DType, Device};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

pub type Tensors = HashMap<String, (Vec<usize>, Vec<f64>)>;

pub struct Fixture {
    pub dir: PathBuf,
    pub cfg: LlavaNextConfig,
    pub inputs: Tensors,
    pub reference: Tensors,
    /// Model (canonical) name → the name the checkpoint stores it under: the names `am3
    /// forward` writes gradients under (`VlModel::load`'s mapping).
    pub stored: BTreeMap<String, String>,
}

pub fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

impl Fixture {
    pub fn load() -> Fixture {
        Self::load_from(&fixture_dir("llava_next_tiny"))
    }
    pub fn load_from(dir: &Path) -> Fixture {
        let read = |f: &str| {
            read_tensor_file(dir.join(f)).unwrap_or_else(|e| panic!("reading {f} in {}: {e:#}", dir.display()))
        };
        let cfg = LlavaNextConfig::load(dir).unwrap_or_else(|e| panic!("{e:#}"));
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
    pub fn reference(&self, name: &str) -> Vec<f32> {
        f32s(&self.reference[name].1)
    }
    pub fn model(&self, dev: &Device, dt: DType) -> LlavaNext {
        LlavaNext::from_checkpoint_as(dev, self.cfg.clone(), &Checkpoint::open(&self.dir).unwrap(), dt)
            .unwrap_or_else(|e| panic!("{e:#}"))
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
    /// The fixture's images: compact pixels (padding tiles dropped) and original sizes.
    pub fn images(&self, model: &LlavaNext) -> (Vec<f32>, Vec<(usize, usize)>) {
        let Some((_, sv)) = self.inputs.get("image_sizes") else { return (Vec::new(), Vec::new()) };
        let sizes: Vec<(usize, usize)> = sv.chunks(2).map(|s| (s[0] as usize, s[1] as usize)).collect();
        let (shape, pv) = &self.inputs["pixel_values"];
        let tiles: Vec<usize> = model.geometries(&sizes).unwrap().iter().map(|g| g.num_tiles()).collect();
        println!("fixture: {} images, sizes {sizes:?}, tiles {tiles:?}, pixel_values {shape:?}", sizes.len());
        let tile_len = model.vdims.tile_len();
        let pixels = f32s(pv);
        let pixels = match shape.len() {
            // A processor batch [n, max_tiles, 3, S, S], padded along the tile axis.
            5 => strip_tile_padding(&pixels, shape[1], &tiles, tile_len).unwrap(),
            // Compact [Σ tiles, 3, S, S].
            _ => pixels,
        };
        assert_eq!(pixels.len(), tiles.iter().sum::<usize>() * tile_len, "pixel_values {shape:?} vs tiles {tiles:?}");
        (pixels, sizes)
    }
    pub fn inputs(&self, model: &LlavaNext) -> Inputs {
        let ids = Self::ints(&self.inputs, "input_ids");
        let (pixels, sizes) = self.images(model);
        let loss_mask = if self.inputs.contains_key("loss_mask") {
            Self::ints(&self.inputs, "loss_mask")
        } else {
            vec![1; ids.len()]
        };
        Inputs { cu: vec![0, ids.len() as i32], pixels, sizes, loss_mask, ids }
    }
}

/// One sequence (or several packed) with its images and loss mask.
pub struct Inputs {
    pub ids: Vec<i32>,
    pub cu: Vec<i32>,
    pub pixels: Vec<f32>,
    pub sizes: Vec<(usize, usize)>,
    pub loss_mask: Vec<i32>,
}

/// Everything measured in one forward + backward.
pub struct Run {
    pub logits: Vec<f32>,
    pub logp: Vec<f32>, // [S - 1]
    pub objective: f64,
    /// Keyed by the model's (canonical) names.
    pub grads: NamedTensors,
}

/// Forward, logits, log-probs of the next token within each sequence, the objective
/// Σ loss_mask[t+1]·logp[t], and the backward of the objective.
pub fn run_inputs(x: &Inputs, dev: &Device, model: &mut LlavaNext, rc: &Recompute) -> Run {
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
    model
        .backward_logprobs(dev, &f, &tb, &lse, &dev.upload(&dlogp, DType::F32).unwrap())
        .unwrap_or_else(|e| panic!("{e:#}"));
    Run { logits, logp: logp[..s - 1].to_vec(), objective, grads: model.grads_by_name(dev).unwrap() }
}

/// Compares every gradient with grads.safetensors under the checkpoint's own names (all
/// printed); tensors the reference leaves out must have no gradient here (or an all-zero one).
/// A gradient that is 0 in theory is judged against its sibling's scale (`cancelling_sibling`).
pub fn check_grads(fx: &Fixture, got: &NamedTensors, tol: f64, tag: &str) {
    let got = fx.under_stored_names(got);
    let want: NamedTensors = read_tensor_file(fx.dir.join("grads.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(n, (s, v))| (n, (s, f32s(&v))))
        .collect();
    let names: BTreeSet<&String> = fx.stored.values().collect();
    let (mut worst, mut failed) = (0f64, Vec::new());
    for (name, (shape, w)) in &want {
        if !names.contains(name) {
            failed.push(format!("{name}: the reference gradient is not keyed by a tensor name of the checkpoint"));
            continue;
        }
        let Some((gs, g)) = got.get(name) else {
            println!("{tag} grad {name}: MISSING");
            failed.push(format!("{name}: no gradient"));
            continue;
        };
        assert_eq!(gs, shape, "{tag} grad {name}: shape");
        let e = named_grad_err(name, g, &want, true);
        match cancelling_sibling(name).filter(|s| want.contains_key(s)) {
            // Exactly 0 in exact arithmetic: both sides are rounding noise.
            Some(s) => println!(
                "{tag} grad {name} {shape:?}: norm {:.2e} vs reference {:.2e}; error vs the {s} scale {:.2e}: {e:.2e}",
                norm2(g),
                norm2(w),
                norm2(&want[&s].1)
            ),
            None => println!("{tag} grad {name} {shape:?}: rel err {e:.2e}"),
        }
        worst = worst.max(e);
        if e > tol {
            failed.push(format!("{name}: {e:.2e}"));
        }
    }
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
}

/// Worst error of `got` against `want` (the same model, two runs), `cancelling_sibling` rule.
pub fn worst_grad_err(got: &NamedTensors, want: &NamedTensors, tag: &str) -> f64 {
    let mut worst = 0f64;
    for (n, (_, w)) in want {
        let (_, g) = got.get(n).unwrap_or_else(|| panic!("{tag}: no gradient for {n}"));
        assert_eq!(g.len(), w.len(), "{tag} grad {n}: size");
        worst = worst.max(named_grad_err(n, g, want, true));
    }
    assert_eq!(got.len(), want.len(), "{tag}: the two runs have different gradient sets");
    worst
}

/// Packed features of each image vs vision_reference.safetensors `imageK_embeds` (one per
/// image of the inputs, none more).
pub fn check_image_embeds(fx: &Fixture, dev: &Device, model: &LlavaNext, tol: f64, tag: &str) {
    let want = read_tensor_file(fx.dir.join("vision_reference.safetensors")).unwrap();
    let (pixels, sizes) = fx.images(model);
    let n_ref = (0..).take_while(|k| want.contains_key(&format!("image{k}_embeds"))).count();
    assert_eq!(n_ref, sizes.len(), "{tag}: vision_reference has {n_ref} images, the inputs {}", sizes.len());
    if sizes.is_empty() {
        return;
    }
    let got = dev.to_vec(&model.image_embeds(dev, &pixels, &sizes).unwrap_or_else(|e| panic!("{e:#}"))).unwrap();
    let geo = model.geometries(&sizes).unwrap();
    let d = model.tdims.layer.d;
    let mut row = 0;
    for k in 0..sizes.len() {
        let (shape, w) = &want[&format!("image{k}_embeds")];
        assert_eq!(shape[..], [geo[k].num_tokens(), d], "image{k}_embeds shape vs the image's anyres tokens");
        let g = &got[row * d..(row + shape[0]) * d];
        report(tag, &format!("image{k}_embeds {shape:?} (size {:?})", sizes[k]), rel_err(g, &f32s(w)), tol);
        row += shape[0];
    }
    assert_eq!(row * d, got.len(), "{tag}: packed rows beyond the reference images");
}

/// Logits, log-probs, objective and every gradient (under the checkpoint's names) against the
/// fixture's references, on the CPU in f32; recompute-all gives the same numbers.
pub fn cpu_matches_transformers(fx: &Fixture, tag: &str) {
    let dev = Device::Cpu;
    let mut model = fx.model(&dev, DType::F32);
    println!(
        "{tag}: text family {:?}, heads {} / kv {}; {} tensors, e.g. {:?}",
        fx.cfg.text.family,
        fx.cfg.text.num_attention_heads,
        fx.cfg.text.num_key_value_heads,
        fx.stored.len(),
        fx.stored
            .values()
            .filter(|n| n.contains("embeddings.class_embedding") || n.contains("embed_tokens"))
            .collect::<Vec<_>>()
    );
    let x = fx.inputs(&model);
    let r = run_inputs(&x, &dev, &mut model, &Recompute::default());
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
    let r2 = run_inputs(&x, &dev, &mut model2, &Recompute::all(fx.cfg.text.num_hidden_layers));
    report(
        tag,
        "recompute-all grads vs kept activations (worst tensor)",
        worst_grad_err(&r2.grads, &r.grads, tag),
        Tol::RecomputeGrads,
    );
    report(tag, "recompute-all logits vs kept", rel_err(&r2.logits, &r.logits), Tol::Recompute);

    // The optimizer view: every gradient paired with its parameter, frozen tensors left out.
    let n_pg = model.params_and_grads().len();
    let n_all = model.param_entries().len();
    println!("{tag}: {n_pg} trainable tensors of {n_all}");
    assert_eq!(n_pg, r.grads.len(), "params_and_grads pairs every gradient");
    for (r, p, g) in model.params_and_grads() {
        assert_eq!(p.len(), g.len(), "{}: parameter and gradient sizes", r.name);
    }
}

/// Feeds one sequence through a KV-cached session in chunks — [0, splits[0]), [splits[0],
/// splits[1]), …, then one token at a time — each chunk with the images whose placeholder
/// tokens it holds (image k has the next `num_tokens(k)` placeholders, so two images may share
/// one run); the cached logits must equal the full forward's rows.
pub fn kv_cache_check(dev: &Device, model: &LlavaNext, x: &Inputs, splits: &[usize], tol: f64, tag: &str) {
    let (ids, sizes, pixels) = (&x.ids, &x.sizes, &x.pixels);
    let s = ids.len();
    let f = model
        .forward(dev, &Batch { ids, cu_seqlens: &[0, s as i32], pixels, image_sizes: sizes }, &Recompute::default())
        .unwrap();
    let full = dev.to_vec(&model.logits(dev, &f).unwrap()).unwrap();
    let v = model.tdims.vocab;
    let geo = model.geometries(sizes).unwrap();
    let spans =
        image_spans(ids, model.cfg.image_token_index as i64, &geo.iter().map(|g| g.num_tokens()).collect::<Vec<_>>());
    let tiles: Vec<usize> = geo.iter().map(|g| g.num_tiles()).collect();
    let tile_len = model.vdims.tile_len();
    println!(
        "{tag} kv-cache: {s} tokens, images at {spans:?} in {} placeholder runs, splits {splits:?}",
        placeholder_run_count(ids, model.cfg.image_token_index as i64)
    );
    let mut bounds = vec![0];
    bounds.extend_from_slice(splits);
    bounds.extend(splits.last().copied().unwrap_or(0) + 1..=s);
    let mut sess = model.new_session(dev, 1, s + 4).unwrap();
    let mut got = Vec::new();
    for w in bounds.windows(2) {
        let (a, b) = (w[0], w[1]);
        let imgs = images_in_chunk(&spans, a, b);
        let sz: Vec<(usize, usize)> = imgs.iter().map(|&k| sizes[k]).collect();
        let px: Vec<f32> = imgs
            .iter()
            .flat_map(|&k| {
                let off: usize = tiles[..k].iter().sum();
                pixels[off * tile_len..(off + tiles[k]) * tile_len].to_vec()
            })
            .collect();
        let x = Extend { ids: &ids[a..b], n_new: b - a, pixels: &px, image_sizes: &sz };
        let logits = dev.to_vec(&model.extend(dev, &mut sess, x, false).unwrap_or_else(|e| panic!("{e:#}"))).unwrap();
        let e = rel_err(&logits, &full[a * v..b * v]);
        if b - a > 1 || !imgs.is_empty() || b == s {
            println!("{tag} kv-cache chunk {a}..{b} (images {imgs:?}): logits rel err {e:.2e}");
        }
        got.extend(logits);
    }
    report(tag, "kv-cache prefill + append + decode logits vs full forward", rel_err(&got, &full), tol);
    let mut sess2 = model.new_session(dev, 1, s).unwrap();
    let x = Extend { ids, n_new: s, pixels, image_sizes: sizes };
    let last = dev.to_vec(&model.extend(dev, &mut sess2, x, true).unwrap()).unwrap();
    report(tag, "last_only logits vs full forward's last row", rel_err(&last, &full[(s - 1) * v..]), tol);
}

/// The fixture dialogue (`kv_splits`): prefill through the first image and two more tokens,
/// append a chunk holding the other images, decode the last tokens.
pub fn fixture_kv_cache_check_in(fx: &Fixture, dev: &Device, dt: DType, tol: f64, tag: &str) {
    let model = fx.model(dev, dt);
    let x = fx.inputs(&model);
    let counts: Vec<usize> = model.geometries(&x.sizes).unwrap().iter().map(|g| g.num_tokens()).collect();
    let spans = image_spans(&x.ids, fx.cfg.image_token_index as i64, &counts);
    kv_cache_check(dev, &model, &x, &kv_splits(&spans, x.ids.len()), tol, tag);
}

pub fn fixture_kv_cache_check(dev: &Device, dt: DType, tol: f64, tag: &str) {
    fixture_kv_cache_check_in(&Fixture::load(), dev, dt, tol, tag);
}

/// A tiny LLaVA-NeXT config written here: CLIP (3 layers, 56-px tiles of 14-px patches) and a
/// Llama decoder with MHA; the placeholder id lies past the vocabulary (as 7B's may).
pub fn tiny_llama_config() -> LlavaNextConfig {
    let (vocab, img) = (300usize, 300u32);
    let json = format!(
        r#"{{"architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next", "dtype": "float32",
            "image_token_index": {img}, "image_grid_pinpoints": [[56, 112], [112, 56], [112, 112], [56, 168], [168, 56]],
            "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
            "text_config": {{"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16, "vocab_size": {vocab},
                "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
                "hidden_act": "silu", "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2}},
            "vision_config": {{"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 3, "num_attention_heads": 2, "num_channels": 3, "image_size": 56, "patch_size": 14,
                "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu", "projection_dim": 32}}}}"#
    );
    let cfg = LlavaNextConfig::from_json(&serde_json::from_str(&json).unwrap(), Path::new("<test config>"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!((cfg.text.family, cfg.text.num_key_value_heads), (TextFamily::Llama, cfg.text.num_attention_heads));
    cfg
}

/// A dialogue with three images for `model`: text, images 0 and 1 side by side in one
/// placeholder run (one turn showing two images), text, image 2, text; random pixels. The loss
/// mask covers the text after the images. Returns the inputs and each image's tokens.
pub fn three_image_inputs(model: &LlavaNext) -> (Inputs, Vec<std::ops::Range<usize>>) {
    let (vocab, img) = (model.tdims.vocab, model.cfg.image_token_index);
    let sizes = vec![(40usize, 100usize), (90, 50), (56, 56)];
    let geo = model.geometries(&sizes).unwrap();
    let mut rng = Rng::new(5);
    let reserved = [img as i64];
    let mut ids = text_ids(&mut rng, 6, vocab, &reserved);
    let mut starts = Vec::new();
    let mut loss_mask = vec![0; ids.len()];
    for (k, g) in geo.iter().enumerate() {
        if k == 2 {
            ids.extend(text_ids(&mut rng, 9, vocab, &reserved));
            loss_mask.resize(ids.len(), 1);
        }
        starts.push(ids.len());
        ids.extend(std::iter::repeat_n(img as i32, g.num_tokens()));
        loss_mask.resize(ids.len(), 0);
    }
    ids.extend(text_ids(&mut rng, 7, vocab, &reserved));
    loss_mask.resize(ids.len(), 1);
    let s = ids.len();
    let image = img as i64;
    assert_eq!(placeholder_run_count(&ids, image), 2, "images 0 and 1 share one run");
    let spans = image_spans(&ids, image, &geo.iter().map(|g| g.num_tokens()).collect::<Vec<_>>());
    assert_eq!(spans.iter().map(|r| r.start).collect::<Vec<_>>(), starts);
    assert_eq!(spans[0].end, spans[1].start, "images 0 and 1 are adjacent");
    let n_tiles: usize = geo.iter().map(|g| g.num_tiles()).sum();
    let pixels = bf16_round(&rng.normal_vec(n_tiles * model.vdims.tile_len(), 1.0));
    println!(
        "three images: sizes {sizes:?} → tokens {:?}, tiles {:?}; {s} tokens",
        geo.iter().map(|g| g.num_tokens()).collect::<Vec<_>>(),
        geo.iter().map(|g| g.num_tiles()).collect::<Vec<_>>()
    );
    (Inputs { cu: vec![0, s as i32], ids, pixels, sizes, loss_mask }, spans)
}

/// Writes a directory in the fixtures' format (`../shared/fixtures/README.md`) for a random
/// tiny LLaVA-NeXT laid out like the checkpoint of issue #16: a Llama (MHA) decoder, the vision
/// tower saved as `vision_tower.*`, and a dialogue with three images, two of them in one
/// placeholder run. The references are this model's own CPU numbers, so the fixture checks run
/// on it test the tests (layout, names, image placement), not the math against transformers.
pub fn write_synthetic_fixture(dir: &Path) {
    use am3safety::checkpoint::safetensors_io::SaveDtype;
    use am3safety::stages::forward::{write_tensors, OutData};
    use am3safety::stages::model::save_weights;
    let keys = fixture_variant::LlavaKeys::VisionTowerFlat;
    let dev = Device::Cpu;
    let mut model = random_llava(&tiny_llama_config(), &dev, DType::F32, 0.3);
    std::fs::create_dir_all(dir).unwrap();
    save_weights(&dev, model.param_entries(), &|n| keys.spell(n), dir, SaveDtype::F32).unwrap();
    model.cfg.save(dir).unwrap();
    let (x, _) = three_image_inputs(&model);
    let s = x.ids.len();
    let geo = model.geometries(&x.sizes).unwrap();
    // A processor batch: [n, max_tiles, 3, S, S], padded with zero tiles.
    let tile_len = model.vdims.tile_len();
    let max_tiles = geo.iter().map(|g| g.num_tiles()).max().unwrap();
    let mut padded = vec![0f32; geo.len() * max_tiles * tile_len];
    let mut off = 0;
    for (k, g) in geo.iter().enumerate() {
        let n = g.num_tiles() * tile_len;
        padded[k * max_tiles * tile_len..][..n].copy_from_slice(&x.pixels[off..off + n]);
        off += n;
    }
    let side = model.cfg.vision.image_size;
    let i64s = |v: &[i32]| OutData::I64(v.iter().map(|&x| x as i64).collect());
    let sizes: Vec<i32> = x.sizes.iter().flat_map(|&(h, w)| [h as i32, w as i32]).collect();
    write_tensors(
        &dir.join("inputs.safetensors"),
        &[
            ("input_ids".into(), vec![1, s], i64s(&x.ids)),
            ("loss_mask".into(), vec![1, s], i64s(&x.loss_mask)),
            ("pixel_values".into(), vec![geo.len(), max_tiles, 3, side, side], OutData::F32(padded)),
            ("image_sizes".into(), vec![geo.len(), 2], i64s(&sizes)),
        ],
    )
    .unwrap();
    let r = run_inputs(&x, &dev, &mut model, &Recompute::default());
    let v = model.tdims.vocab;
    write_tensors(
        &dir.join("reference.safetensors"),
        &[
            ("logits".into(), vec![s, v], OutData::F32(r.logits)),
            ("token_logprobs".into(), vec![s - 1], OutData::F32(r.logp)),
            ("objective".into(), vec![1], OutData::F32(vec![r.objective as f32])),
        ],
    )
    .unwrap();
    let grads: Vec<(String, Vec<usize>, OutData)> =
        r.grads.into_iter().map(|(n, (sh, g))| (keys.spell(&n), sh, OutData::F32(g))).collect();
    write_tensors(&dir.join("grads.safetensors"), &grads).unwrap();
    let embeds = dev.to_vec(&model.image_embeds(&dev, &x.pixels, &x.sizes).unwrap()).unwrap();
    let d = model.tdims.layer.d;
    let mut row = 0;
    let mut vision = Vec::new();
    for (k, g) in geo.iter().enumerate() {
        let n = g.num_tokens();
        vision.push((format!("image{k}_embeds"), vec![n, d], OutData::F32(embeds[row * d..(row + n) * d].to_vec())));
        row += n;
    }
    write_tensors(&dir.join("vision_reference.safetensors"), &vision).unwrap();
}

/// A LLaVA-NeXT of `cfg` with seeded random weights (the same on every device, bf16-rounded):
/// norms around 1, biases and embeddings N(0, `bias_scale`), matrices N(0, 1/fan-in).
pub fn random_llava(cfg: &LlavaNextConfig, dev: &Device, dt: DType, bias_scale: f64) -> LlavaNext {
    LlavaNext::build(cfg.clone(), &mut |r| {
        let seed = r.name.bytes().fold(r.row0 as u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
        let mut rng = Rng::new(seed);
        let n = r.numel();
        let v: Vec<f32> = if r.name.contains("norm") && r.name.ends_with("weight") {
            rng.uniform_vec(n, 0.8, 1.2)
        } else if r.name.ends_with("bias") || r.name.contains("class_embedding") || r.name.contains("newline") {
            rng.normal_vec(n, bias_scale)
        } else if r.name.contains("position_embedding") {
            rng.normal_vec(n, 0.5)
        } else {
            rng.normal_vec(n, 1.0 / (r.row_len() as f64).sqrt())
        };
        dev.upload(&bf16_round(&v), dt)
    })
    .unwrap_or_else(|e| panic!("{e:#}"))
}

pub fn feature_layers_and_input_errors(fx: &Fixture) {
    let dev = Device::Cpu;
    let n_layers = fx.cfg.vision.num_hidden_layers;
    for (layer, trained) in [(-1i64, n_layers), (0, 0)] {
        let mut cfg = fx.cfg.clone();
        // As many selected layers as the checkpoint's (the projector's input width).
        cfg.vision_feature_layer = vec![layer; fx.cfg.vision_feature_layer.len()];
        let mut model =
            LlavaNext::from_checkpoint_as(&dev, cfg, &Checkpoint::open(&fx.dir).unwrap(), DType::F32).unwrap();
        let x = fx.inputs(&model);
        let r = run_inputs(&x, &dev, &mut model, &Recompute::default());
        let vis_layers =
            (0..n_layers).filter(|l| r.grads.keys().any(|k| k.contains(&format!("encoder.layers.{l}.")))).count();
        println!(
            "feature layer {layer}: objective {:.6}, {vis_layers} vision layers with gradients, {} tensors",
            r.objective,
            r.grads.len()
        );
        let want = if x.sizes.is_empty() { 0 } else { trained };
        assert_eq!(vis_layers, want, "feature layer {layer}: vision layers with gradients");
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
    let n = x.sizes.len();
    if n > 0 {
        let e1 = err(&x.ids, &x.pixels, &x.sizes[..n - 1]);
        println!("{} image(s) for the placeholders of {n}: {e1}", n - 1);
        assert!(e1.contains("<image> tokens"), "{e1}");
        let e2 = err(&x.ids, &x.pixels[..x.pixels.len() - 1], &x.sizes);
        println!("short pixel_values: {e2}");
        assert!(e2.contains("pixel_values"), "{e2}");
    }
    let bad_cu = model.forward(
        &dev,
        &Batch { ids: &x.ids, cu_seqlens: &[0, s - 1], pixels: &x.pixels, image_sizes: &x.sizes },
        &Recompute::default(),
    );
    assert!(bad_cu.is_err(), "cu_seqlens not covering the ids must be rejected");
}
