//! LLaVA-NeXT model math against the transformers fixtures (`fixture_dir("llava_next_tiny")`):
//! packed image features per image (CLIP → projector → anyres packing with image_newline),
//! logits, token log-probs, the objective Σ_t loss_mask[t+1]·logp[t] and every parameter
//! gradient, on the CPU in f32; activation checkpointing; packed batches; KV-cached prefill +
//! appended turn + decode vs the full forward; the same on CUDA (skipped without a GPU); and a
//! random Llama (MHA) model at the 7B head dims, CUDA bf16 vs the CPU.
//!
//! Nothing is taken from the shared fixture's particulars: image counts, sizes and tiles, the
//! key layout (`vision_tower.vision_model.*`, `vision_tower.*`, `model.*`: gradients are compared
//! under the checkpoint's own names, as `am3 forward` writes them), the decoder family (Mistral
//! GQA or Llama MHA) and where the images sit (several may share one placeholder run) are all
//! read from the files. `llava_cpu_layout_variants_match_transformers` reruns the fixture checks
//! on copies of the fixture in the other layouts transformers writes (`common/fixture_variant.rs`),
//! and `llava_cpu_kv_cache_adjacent_images` runs the KV cache on a random model with two images
//! side by side in one run.
mod common;
#[path = "common/fixture_variant.rs"]
mod fixture_variant;
use am3safety::checkpoint::{read_tensor_file, Checkpoint};
use am3safety::models::common::params::{GradStore, NamedTensors};
use am3safety::models::common::train_state::TrainState;
use am3safety::models::llava_next::config::{LlavaNextConfig, TextFamily};
use am3safety::models::llava_next::model::{strip_tile_padding, Batch, LlavaNext, Recompute};
use am3safety::stages::model::VlModel;
use am3safety::tensor::{DType, Device};
use common::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

type Tensors = HashMap<String, (Vec<usize>, Vec<f64>)>;

struct Fixture {
    dir: PathBuf,
    cfg: LlavaNextConfig,
    inputs: Tensors,
    reference: Tensors,
    /// Model (canonical) name → the name the checkpoint stores it under: the names `am3
    /// forward` writes gradients under (`VlModel::load`'s mapping).
    stored: BTreeMap<String, String>,
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

impl Fixture {
    fn load() -> Fixture {
        Self::load_from(&fixture_dir("llava_next_tiny"))
    }
    fn load_from(dir: &Path) -> Fixture {
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
    fn ints(t: &Tensors, name: &str) -> Vec<i32> {
        t[name].1.iter().map(|&x| x as i32).collect()
    }
    fn reference(&self, name: &str) -> Vec<f32> {
        f32s(&self.reference[name].1)
    }
    fn model(&self, dev: &Device, dt: DType) -> LlavaNext {
        LlavaNext::from_checkpoint_as(dev, self.cfg.clone(), &Checkpoint::open(&self.dir).unwrap(), dt)
            .unwrap_or_else(|e| panic!("{e:#}"))
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
    /// The fixture's images: compact pixels (padding tiles dropped) and original sizes.
    fn images(&self, model: &LlavaNext) -> (Vec<f32>, Vec<(usize, usize)>) {
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
    fn inputs(&self, model: &LlavaNext) -> Inputs {
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
    /// Keyed by the model's (canonical) names.
    grads: NamedTensors,
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
    model
        .backward_logprobs(dev, &f, &tb, &lse, &dev.upload(&dlogp, DType::F32).unwrap())
        .unwrap_or_else(|e| panic!("{e:#}"));
    Run { logits, logp: logp[..s - 1].to_vec(), objective, grads: model.grads_by_name(dev).unwrap() }
}

/// Compares every gradient with grads.safetensors under the checkpoint's own names (all
/// printed); tensors the reference leaves out must have no gradient here (or an all-zero one).
/// A gradient that is 0 in theory is judged against its sibling's scale (`cancelling_sibling`).
fn check_grads(fx: &Fixture, got: &NamedTensors, tol: f64, tag: &str) {
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
fn worst_grad_err(got: &NamedTensors, want: &NamedTensors, tag: &str) -> f64 {
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
fn check_image_embeds(fx: &Fixture, dev: &Device, model: &LlavaNext, tol: f64, tag: &str) {
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

#[test]
fn llava_cpu_image_embeds() {
    let fx = Fixture::load();
    let dev = Device::Cpu;
    check_image_embeds(&fx, &dev, &fx.model(&dev, DType::F32), 1e-4, "cpu f32");
}

/// Logits, log-probs, objective and every gradient (under the checkpoint's names) against the
/// fixture's references, on the CPU in f32; recompute-all gives the same numbers.
fn cpu_matches_transformers(fx: &Fixture, tag: &str) {
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
    report(tag, "logits", rel_err(&r.logits, &fx.reference("logits")), 1e-4);
    report(tag, "token log-probs", rel_err(&r.logp, &fx.reference("token_logprobs")), 1e-4);
    let want = fx.reference["objective"].1[0];
    report(tag, &format!("objective ({:.6} vs {want:.6})", r.objective), ((r.objective - want) / want).abs(), 1e-5);
    check_grads(fx, &r.grads, 1e-3, tag);

    // Activation checkpointing recomputes the same numbers.
    let mut model2 = fx.model(&dev, DType::F32);
    let r2 = run_inputs(&x, &dev, &mut model2, &Recompute::all(fx.cfg.text.num_hidden_layers));
    report(
        tag,
        "recompute-all grads vs kept activations (worst tensor)",
        worst_grad_err(&r2.grads, &r.grads, tag),
        1e-6,
    );
    report(tag, "recompute-all logits vs kept", rel_err(&r2.logits, &r.logits), 1e-7);

    // The optimizer view: every gradient paired with its parameter, frozen tensors left out.
    let n_pg = model.params_and_grads().len();
    let n_all = model.param_entries().len();
    println!("{tag}: {n_pg} trainable tensors of {n_all}");
    assert_eq!(n_pg, r.grads.len(), "params_and_grads pairs every gradient");
    for (r, p, g) in model.params_and_grads() {
        assert_eq!(p.len(), g.len(), "{}: parameter and gradient sizes", r.name);
    }
}

#[test]
fn llava_cpu_matches_transformers() {
    cpu_matches_transformers(&Fixture::load(), "cpu f32");
}

/// The fixture in the other layouts transformers writes (`fixture_variant`: the vision tower as
/// `vision_tower.*` with the decoder declared as the other family; the module layout
/// `model.*` + `lm_head.weight` in two shards), written to a temporary directory: the same
/// config, the same image features, logits, log-probs and objective, and every gradient under
/// the variant's own names.
#[test]
fn llava_cpu_layout_variants_match_transformers() {
    let src = fixture_dir("llava_next_tiny");
    let base = Fixture::load_from(&src);
    let t = &base.cfg.text;
    let root = fresh_tmp_dir("llava-layouts");
    let variants = fixture_variant::llava_variants(
        &src,
        &root,
        [t.num_key_value_heads, t.head_dim, t.intermediate_size, t.max_position_embeddings],
    );
    for v in &variants {
        let tag = format!("variant {}", v.name);
        println!("{tag}: {}", v.what);
        let fx = Fixture::load_from(&v.dir);
        // Only names and layout differ: the parsed config is the source's (but the decoder's
        // declared family and what goes with it).
        let mut cfg = fx.cfg.clone();
        (cfg.text.family, cfg.text.sliding_window) = (base.cfg.text.family, base.cfg.text.sliding_window);
        assert_eq!(cfg, base.cfg, "{tag}: the rewritten config means another model");
        // The model's names map to the variant's names of the source's tensors.
        for (canon, stored) in &base.stored {
            assert_eq!(&fx.stored[canon], &v.renamed[stored], "{tag}: {canon}");
        }
        let changed = base.stored.values().filter(|n| &v.renamed[*n] != *n).count();
        assert!(changed > 0, "{tag}: no tensor was renamed");
        println!("{tag}: {changed} of {} tensor names differ from the source's", base.stored.len());
        check_image_embeds(&fx, &Device::Cpu, &fx.model(&Device::Cpu, DType::F32), 1e-4, &tag);
        cpu_matches_transformers(&fx, &tag);
        fixture_kv_cache_check_in(&fx, &Device::Cpu, DType::F32, 1e-5, &tag);
        feature_layers_and_input_errors(&fx);
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// With `AM3_WRITE_FIXTURE_VARIANTS=DIR`, writes the layout variants to `DIR/<variant>/` for
/// running every test on one of them (`AM3_FIXTURES=DIR/<variant> cargo test --release ...`).
#[test]
fn llava_write_fixture_variants() {
    let Ok(root) = std::env::var("AM3_WRITE_FIXTURE_VARIANTS") else {
        println!("llava_write_fixture_variants: skipped: AM3_WRITE_FIXTURE_VARIANTS is not set");
        return;
    };
    let src = fixture_dir("llava_next_tiny");
    let t = LlavaNextConfig::load(&src).unwrap().text;
    for v in fixture_variant::llava_variants(
        &src,
        Path::new(&root),
        [t.num_key_value_heads, t.head_dim, t.intermediate_size, t.max_position_embeddings],
    ) {
        println!("{}: {} ({})", v.name, v.dir.display(), v.what);
    }
    let synthetic = Path::new(&root).join("llava-synthetic").join("llava_next_tiny");
    write_synthetic_fixture(&synthetic);
    println!(
        "llava-synthetic: {} (random Llama MHA model, vision_tower.* keys, 3 images, 2 adjacent; its own references)",
        synthetic.display()
    );
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
    let doubled: NamedTensors =
        r1.grads.iter().map(|(n, (sh, g))| (n.clone(), (sh.clone(), g.iter().map(|x| 2.0 * x).collect()))).collect();
    for (n, (_, g2)) in &r2.grads {
        println!("cpu f32 packed grad {n}: rel err vs 2x single {:.2e}", named_grad_err(n, g2, &doubled, true));
    }
    report("cpu f32", "packed grads vs 2x single (worst tensor)", worst_grad_err(&r2.grads, &doubled, "packed"), 1e-5);
}

/// Feeds one sequence through a KV-cached session in chunks — [0, splits[0]), [splits[0],
/// splits[1]), …, then one token at a time — each chunk with the images whose placeholder
/// tokens it holds (image k has the next `num_tokens(k)` placeholders, so two images may share
/// one run); the cached logits must equal the full forward's rows.
fn kv_cache_check(dev: &Device, model: &LlavaNext, x: &Inputs, splits: &[usize], tol: f64, tag: &str) {
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
        let logits = dev
            .to_vec(
                &model.extend(dev, &mut sess, &ids[a..b], b - a, &px, &sz, false).unwrap_or_else(|e| panic!("{e:#}")),
            )
            .unwrap();
        let e = rel_err(&logits, &full[a * v..b * v]);
        if b - a > 1 || !imgs.is_empty() || b == s {
            println!("{tag} kv-cache chunk {a}..{b} (images {imgs:?}): logits rel err {e:.2e}");
        }
        got.extend(logits);
    }
    report(tag, "kv-cache prefill + append + decode logits vs full forward", rel_err(&got, &full), tol);
    let mut sess2 = model.new_session(dev, 1, s).unwrap();
    let last = dev.to_vec(&model.extend(dev, &mut sess2, ids, s, pixels, sizes, true).unwrap()).unwrap();
    report(tag, "last_only logits vs full forward's last row", rel_err(&last, &full[(s - 1) * v..]), tol);
}

/// The fixture dialogue (`kv_splits`): prefill through the first image and two more tokens,
/// append a chunk holding the other images, decode the last tokens.
fn fixture_kv_cache_check_in(fx: &Fixture, dev: &Device, dt: DType, tol: f64, tag: &str) {
    let model = fx.model(dev, dt);
    let x = fx.inputs(&model);
    let counts: Vec<usize> = model.geometries(&x.sizes).unwrap().iter().map(|g| g.num_tokens()).collect();
    let spans = image_spans(&x.ids, fx.cfg.image_token_index as i64, &counts);
    kv_cache_check(dev, &model, &x, &kv_splits(&spans, x.ids.len()), tol, tag);
}

fn fixture_kv_cache_check(dev: &Device, dt: DType, tol: f64, tag: &str) {
    fixture_kv_cache_check_in(&Fixture::load(), dev, dt, tol, tag);
}

#[test]
fn llava_cpu_kv_cache_matches_full_forward() {
    fixture_kv_cache_check(&Device::Cpu, DType::F32, 1e-5, "cpu f32");
}

/// A tiny LLaVA-NeXT config written here: CLIP (3 layers, 56-px tiles of 14-px patches) and a
/// Llama decoder with MHA; the placeholder id lies past the vocabulary (as 7B's may).
fn tiny_llama_config() -> LlavaNextConfig {
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
fn three_image_inputs(model: &LlavaNext) -> (Inputs, Vec<std::ops::Range<usize>>) {
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

/// A random tiny LLaVA-NeXT (CLIP + Llama MHA decoder, built here from a config written in the
/// test) with three images: two side by side in one placeholder run (one turn showing two
/// images), the third in a later turn. The KV-cached logits equal the full forward's when the
/// chunks split the run exactly between the two images, when one chunk holds both, and when the
/// prefill ends before any image.
#[test]
fn llava_cpu_kv_cache_adjacent_images() {
    let cfg = tiny_llama_config();
    let dev = Device::Cpu;
    let model = random_llava(&cfg, &dev, DType::F32, 0.3);
    let (x, spans) = three_image_inputs(&model);
    let geo = model.geometries(&x.sizes).unwrap();
    let (s, vocab) = (x.ids.len(), model.tdims.vocab);
    let auto = kv_splits(&spans, s);
    assert_eq!(auto[0], spans[1].start, "kv_splits splits the shared run between the two images");
    kv_cache_check(&dev, &model, &x, &auto, 1e-5, "cpu f32 (adjacent images, split between them)");
    kv_cache_check(&dev, &model, &x, &[spans[1].end + 1, s - 2], 1e-5, "cpu f32 (adjacent images in one chunk)");
    kv_cache_check(
        &dev,
        &model,
        &x,
        &[spans[0].start - 2, spans[2].end + 1],
        1e-5,
        "cpu f32 (text prefill, all images appended in one chunk)",
    );
    // Each image's features land in its own tokens: changing one image's pixels leaves every
    // logit before its first placeholder as it was (causal attention) and changes those from it on.
    let logits = |px: &[f32]| {
        let b = Batch { ids: &x.ids, cu_seqlens: &x.cu, pixels: px, image_sizes: &x.sizes };
        dev.to_vec(&model.logits(&dev, &model.forward(&dev, &b, &Recompute::default()).unwrap()).unwrap()).unwrap()
    };
    let base = logits(&x.pixels);
    let tile_len = model.vdims.tile_len();
    for k in 0..geo.len() {
        let off: usize = geo[..k].iter().map(|g| g.num_tiles()).sum::<usize>() * tile_len;
        let mut px = x.pixels.clone();
        for p in &mut px[off..off + geo[k].num_tiles() * tile_len] {
            *p = -*p;
        }
        let moved = logits(&px);
        let cut = spans[k].start * vocab;
        let (before, after) = (rel_err(&moved[..cut], &base[..cut]), rel_err(&moved[cut..], &base[cut..]));
        println!(
            "image {k}'s pixels negated: logits before its tokens rel diff {before:.2e}, from them on {after:.2e}"
        );
        assert!(before == 0.0 && after > 1e-4, "image {k}'s features are not at its own placeholders");
    }
}

/// Writes a directory in the fixtures' format (`../shared/fixtures/README.md`) for a random
/// tiny LLaVA-NeXT laid out like the checkpoint of issue #16: a Llama (MHA) decoder, the vision
/// tower saved as `vision_tower.*`, and a dialogue with three images, two of them in one
/// placeholder run. The references are this model's own CPU numbers, so the fixture checks run
/// on it test the tests (layout, names, image placement), not the math against transformers.
fn write_synthetic_fixture(dir: &Path) {
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

/// Every fixture check on a checkpoint laid out like issue #16's (`write_synthetic_fixture`:
/// Llama MHA, `vision_tower.*` keys, three images of which two share a placeholder run): the
/// checks read all of that from the files, and the gradients are found under the checkpoint's
/// `vision_tower.*` names.
#[test]
fn llava_cpu_fixture_checks_on_a_synthetic_checkpoint() {
    let root = fresh_tmp_dir("llava-synthetic");
    let dir = root.join("llava_next_tiny");
    write_synthetic_fixture(&dir);
    let fx = Fixture::load_from(&dir);
    let tag = "synthetic (llama mha, vision_tower.*, adjacent images)";
    assert_eq!(fx.cfg.text.family, TextFamily::Llama);
    assert!(
        fx.stored.values().any(|n| n.starts_with("vision_tower.") && !n.starts_with("vision_tower.vision_model.")),
        "{tag}: key layout"
    );
    let x = fx.inputs(&fx.model(&Device::Cpu, DType::F32));
    assert_eq!(
        (x.sizes.len(), placeholder_run_count(&x.ids, fx.cfg.image_token_index as i64)),
        (3, 2),
        "{tag}: images and runs"
    );
    check_image_embeds(&fx, &Device::Cpu, &fx.model(&Device::Cpu, DType::F32), 1e-6, tag);
    cpu_matches_transformers(&fx, tag);
    fixture_kv_cache_check_in(&fx, &Device::Cpu, DType::F32, 1e-5, tag);
    feature_layers_and_input_errors(&fx);
    let _ = std::fs::remove_dir_all(&root);
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
    fixture_kv_cache_check_in(&fx, gpu, dt, tol.2, &tag);
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

/// A LLaVA-NeXT of `cfg` with seeded random weights (the same on every device, bf16-rounded):
/// norms around 1, biases and embeddings N(0, `bias_scale`), matrices N(0, 1/fan-in).
fn random_llava(cfg: &LlavaNextConfig, dev: &Device, dt: DType, bias_scale: f64) -> LlavaNext {
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

/// Edge cases on the fixture weights: other feature layers (the last one: every layer gets a
/// gradient; the embeddings: none does), padding tiles dropped, and bad inputs rejected with
/// errors instead of panics.
#[test]
fn llava_cpu_feature_layers_and_input_errors() {
    feature_layers_and_input_errors(&Fixture::load());
}

fn feature_layers_and_input_errors(fx: &Fixture) {
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
