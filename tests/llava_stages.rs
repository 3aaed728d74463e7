//! The stages on LLaVA-NeXT: `am3 forward` on the fixture matches transformers (logits, token
//! log-probs, objective, gradients; padded or compact pixel batches), and `am3 sft` trains a
//! tiny random LLaVA-NeXT (CLIP + Mistral, tokenizer with the LLaVA special tokens, 56-px tiles)
//! on the demo data: the loss falls, the checkpoint keeps the source's tensor names and reloads
//! with identical logits, `--freeze-vision` leaves the tower as it was, and the Vicuna template
//! teaches the model to stop with `</s>`.
mod common;
#[path = "support/tiny_llava.rs"]
mod tiny_llava;
use am3safety::checkpoint::safetensors_io::SaveDtype;
use am3safety::checkpoint::{read_tensor_file, Checkpoint};
use am3safety::models::common::params::ParamRef;
use am3safety::models::llava_next::config::LlavaNextConfig;
use am3safety::models::llava_next::model::LlavaNext;
use am3safety::models::qwen2_5_vl::chat::load_tokenizer;
use am3safety::stages::examples::pack;
use am3safety::stages::forward::{write_tensors, OutData};
use am3safety::stages::model::{Encoder, Family, Net, Processor, VlModel};
use am3safety::stages::sft::{self, demo_data, encode_file, SftArgs};
use am3safety::tensor::{Device, DevicePref};
use am3safety::train::metrics::read_metrics;
use common::*;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use tiny_llava::write_tiny_dir;
use tokenizers::Tokenizer;

type Tensors = HashMap<String, (Vec<usize>, Vec<f64>)>;

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("am3-llava-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn am3_forward(model: &Path, inputs: &Path, out: &Path, grads: bool) -> std::process::Output {
    let mut c = Command::new(am3_bin());
    c.args(["forward", "--device", "cpu", "--model"]).arg(model).arg("--inputs").arg(inputs).arg("--out").arg(out);
    if grads {
        c.arg("--grads");
    }
    c.output().unwrap()
}

fn read(path: &Path) -> Tensors {
    read_tensor_file(path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()))
}

/// logits, token_logprobs and objective of `got` vs the fixture's reference.
fn check_outputs(tag: &str, got: &Tensors, want: &Tensors) {
    for (name, tol) in [
        ("logits", Tol::FixtureLogits.value()),
        ("token_logprobs", Tol::FixtureLogits.value()),
        ("objective", Tol::FixtureObjective.value()),
    ] {
        assert_eq!(got[name].0, want[name].0, "{tag} {name} shape");
        let e = rel_err(&f32s(&got[name].1), &f32s(&want[name].1));
        println!("{tag} am3 forward {name}: rel err {e:.2e} (tol {tol:.0e})");
        assert!(e <= tol, "{tag} {name}: rel err {e:.2e} > {tol:.0e}");
    }
}

#[test]
fn forward_cli_llava_matches_reference() {
    let fx = fixture_dir("llava_next_tiny");
    let out = tmp("fwd.safetensors");
    let o = am3_forward(&fx, &fx.join("inputs.safetensors"), &out, true);
    assert!(o.status.success(), "am3 forward failed: {}", String::from_utf8_lossy(&o.stderr));
    let got = read(&out);
    check_outputs("padded pixels", &got, &read(&fx.join("reference.safetensors")));
    assert!(!got.contains_key("position_ids"), "LLaVA has no M-RoPE position ids");

    let want = read(&fx.join("grads.safetensors"));
    let (mut worst, mut failed) = (0f64, Vec::new());
    for (name, (shape, w)) in &want {
        let (gs, g) = got.get(name).unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_eq!(gs, shape, "{name} shape");
        let e = match name.strip_suffix("self_attn.k_proj.bias") {
            // Exactly 0 in exact arithmetic (a key bias shifts a whole softmax row): both sides
            // are rounding noise, judged against the same layer's q_proj.bias gradient.
            Some(p) => rel_err_scaled(&f32s(g), &f32s(w), norm2(&f32s(&want[&format!("{p}self_attn.q_proj.bias")].1))),
            None => rel_err(&f32s(g), &f32s(w)),
        };
        worst = worst.max(e);
        if e > Tol::FixtureGrads.value() {
            failed.push(format!("{name}: {e:.2e}"));
        }
    }
    let extra: Vec<&String> = got
        .keys()
        .filter(|k| !want.contains_key(*k) && !["logits", "token_logprobs", "objective"].contains(&k.as_str()))
        .collect();
    println!("am3 forward grads: {} tensors, worst rel err {worst:.2e}; extra tensors {extra:?}", want.len());
    assert!(failed.is_empty(), "gradients over 1e-3: {failed:?}");
    assert!(extra.is_empty(), "gradients the reference does not have (frozen vision layers?): {extra:?}");
}

/// The same inputs with compact pixels [Σ tiles, 3, S, S] give the same numbers, and
/// inconsistent inputs are errors that say what is wrong.
#[test]
fn forward_cli_llava_compact_pixels_and_errors() {
    let fx = fixture_dir("llava_next_tiny");
    let inputs = read(&fx.join("inputs.safetensors"));
    let cfg = LlavaNextConfig::load(&fx).unwrap();
    let model = LlavaNext::build(cfg, &mut |r: &ParamRef| Device::Cpu.zeros_f32(r.numel())).unwrap();
    let sizes: Vec<(usize, usize)> =
        inputs["image_sizes"].1.chunks(2).map(|c| (c[0] as usize, c[1] as usize)).collect();
    let tiles: Vec<usize> = model.geometries(&sizes).unwrap().iter().map(|g| g.num_tiles()).collect();
    let (shape, pv) = &inputs["pixel_values"];
    let tile_len: usize = shape[2..].iter().product();
    let mut compact = Vec::new();
    for (i, &n) in tiles.iter().enumerate() {
        compact.extend(f32s(&pv[i * shape[1] * tile_len..][..n * tile_len]));
    }
    println!("image sizes {sizes:?}: tiles {tiles:?} of a padded batch {shape:?}");
    let i64s = |v: &[f64]| OutData::I64(v.iter().map(|&x| x as i64).collect());
    let base = |with_sizes: bool| {
        let mut t = vec![
            ("input_ids".to_string(), inputs["input_ids"].0.clone(), i64s(&inputs["input_ids"].1)),
            ("loss_mask".to_string(), inputs["loss_mask"].0.clone(), i64s(&inputs["loss_mask"].1)),
            (
                "pixel_values".to_string(),
                [vec![tiles.iter().sum()], shape[2..].to_vec()].concat(),
                OutData::F32(compact.clone()),
            ),
        ];
        if with_sizes {
            t.push(("image_sizes".to_string(), inputs["image_sizes"].0.clone(), i64s(&inputs["image_sizes"].1)));
        }
        t
    };
    let (inp, out) = (tmp("compact-in.safetensors"), tmp("compact-out.safetensors"));
    write_tensors(&inp, &base(true)).unwrap();
    let o = am3_forward(&fx, &inp, &out, false);
    assert!(o.status.success(), "am3 forward (compact pixels) failed: {}", String::from_utf8_lossy(&o.stderr));
    check_outputs("compact pixels", &read(&out), &read(&fx.join("reference.safetensors")));

    write_tensors(&inp, &base(false)).unwrap();
    let o = am3_forward(&fx, &inp, &out, false);
    let err = String::from_utf8_lossy(&o.stderr);
    println!("pixels without sizes: {err}");
    assert!(!o.status.success() && err.contains("image_sizes"), "{err}");
    // One tile short: the count no longer matches the images.
    let mut short = base(true);
    short[2] = (
        "pixel_values".to_string(),
        [vec![tiles.iter().sum::<usize>() - 1], shape[2..].to_vec()].concat(),
        OutData::F32(compact[tile_len..].to_vec()),
    );
    write_tensors(&inp, &short).unwrap();
    let o = am3_forward(&fx, &inp, &out, false);
    let err = String::from_utf8_lossy(&o.stderr);
    println!("a tile short: {err}");
    assert!(!o.status.success() && err.contains("tiles"), "{err}");
}

// ------------------------------------------------------------------------------------------
// A tiny random LLaVA-NeXT model directory.

fn sft_args(model: &Path, out: &Path, steps: u64) -> SftArgs {
    SftArgs {
        model: Some(model.to_path_buf()),
        out: Some(out.to_path_buf()),
        steps: Some(steps),
        save_every: Some(steps),
        lr: Some(6e-3),
        warmup: Some(1),
        batch_tokens: Some(640),
        device: Some(DevicePref::Cpu),
        ..Default::default()
    }
}

fn tensor_names(dir: &Path) -> BTreeSet<String> {
    Checkpoint::open(dir).unwrap().names().into_iter().map(str::to_string).collect()
}

/// Logits of the first two demo examples, packed.
fn demo_logits(dev: &Device, m: &VlModel, tok: &Tokenizer, pp: &Processor) -> Vec<f32> {
    let ex = encode_file(&demo_data(), &Encoder::new(m, tok, pp).unwrap()).unwrap();
    let p = pack(&[&ex[0], &ex[1]]);
    dev.to_vec(&m.logits(dev, &m.forward(dev, &p, &Default::default()).unwrap()).unwrap()).unwrap()
}

#[test]
fn sft_tiny_llava_loss_falls_and_checkpoint_reloads() {
    let dev = Device::Cpu;
    let src = tmp("src");
    write_tiny_dir(&src, "mistral", 11);
    let out = tmp("sft");
    let t0 = std::time::Instant::now();
    let ck = sft::run(sft_args(&src, &out, 40)).unwrap_or_else(|e| panic!("{e:#}"));
    println!("40 SFT steps in {:.1} s", t0.elapsed().as_secs_f64());

    let m = read_metrics(out.join("metrics.jsonl")).unwrap();
    let r: Vec<f64> = m.iter().filter_map(|v| v.get("refusal_loss").and_then(|x| x.as_f64())).collect();
    let losses: Vec<f64> = m.iter().filter_map(|v| v.get("loss").and_then(|x| x.as_f64())).collect();
    println!("refusal loss {r:?}; step losses {losses:.3?}");
    assert_eq!(losses.len(), 40, "one metrics line per step");
    assert!(r.len() == 2 && r[1] < 0.7 * r[0], "refusal loss did not fall by 30%: {r:?}");

    // A complete HF directory of the same family, under the source's tensor names.
    for f in ["config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "trainer_state.json"] {
        assert!(ck.join(f).is_file(), "checkpoint lacks {f}");
    }
    assert_eq!(Family::of_dir(&ck).unwrap(), Family::Llava);
    let names = tensor_names(&ck);
    assert_eq!(names, tensor_names(&src), "the checkpoint renamed tensors");
    assert!(
        names.contains("model.language_model.embed_tokens.weight") && names.contains("lm_head.weight"),
        "{names:?}"
    );

    // It loads, its logits moved away from the source's, and a save/load round trip is exact.
    let tok = load_tokenizer(&ck).unwrap().unwrap();
    let trained = VlModel::load(&dev, &ck).unwrap();
    let pp = Processor::load(&ck, &trained).unwrap();
    let l_trained = demo_logits(&dev, &trained, &tok, &pp);
    let l_src = demo_logits(&dev, &VlModel::load(&dev, &src).unwrap(), &tok, &pp);
    let moved = rel_err(&l_trained, &l_src);
    println!("trained vs source logits: rel diff {moved:.3e}");
    assert!(moved > 1e-3, "training did not change the logits");
    let again = tmp("again");
    trained.save(&dev, &again, SaveDtype::F32).unwrap();
    assert_eq!(tensor_names(&again), names, "a second save renamed tensors");
    let back = VlModel::load(&dev, &again).unwrap();
    let l_back = demo_logits(&dev, &back, &tok, &pp);
    assert!(l_trained.iter().zip(&l_back).all(|(a, b)| a.to_bits() == b.to_bits()), "logits differ after save/load");
}

#[test]
fn sft_tiny_llava_freeze_vision_keeps_the_tower() {
    let src = tmp("src-freeze");
    write_tiny_dir(&src, "mistral", 12);
    let out = tmp("sft-freeze");
    let ck =
        sft::run(SftArgs { freeze_vision: Some(true), ..sft_args(&src, &out, 2) }).unwrap_or_else(|e| panic!("{e:#}"));
    let (a, b) = (Checkpoint::open(&src).unwrap(), Checkpoint::open(&ck).unwrap());
    let (mut same, mut changed) = (0, 0);
    for n in a.names() {
        let (x, y) = (a.get_f32_any(n).unwrap().1, b.get_f32_any(n).unwrap().1);
        let eq = x == y;
        if n.contains("vision_tower") {
            assert!(eq, "{n}: a frozen vision tensor changed");
            same += 1;
        } else if !eq {
            changed += 1;
        }
    }
    println!("frozen vision tensors unchanged: {same}; other tensors changed: {changed}");
    assert!(same > 0 && changed > 0);
}

/// The Vicuna (Llama) template closes every reply with a weighted `</s>` target, and the MHA
/// decoder trains a step.
#[test]
fn vicuna_examples_end_replies_with_eos() {
    let dev = Device::Cpu;
    let src = tmp("src-vicuna");
    write_tiny_dir(&src, "llama", 13);
    let model = VlModel::load(&dev, &src).unwrap();
    let tok = load_tokenizer(&src).unwrap().unwrap();
    let pp = Processor::load(&src, &model).unwrap();
    let eos = tok.token_to_id("</s>").unwrap() as i32;
    let ex = encode_file(&demo_data(), &Encoder::new(&model, &tok, &pp).unwrap()).unwrap();
    for e in ex.iter().take(10) {
        // Runs of weighted targets are the replies; each must end with </s>.
        let mut ends = Vec::new();
        for t in 0..e.len() {
            if e.weights[t] != 0.0 && (t + 1 == e.len() || e.weights[t + 1] == 0.0) {
                ends.push(e.targets[t]);
            }
        }
        assert!(
            !ends.is_empty() && ends.iter().all(|&t| t == eos),
            "{}: replies end with {ends:?}, not </s> {eos}",
            e.id
        );
        let Net::Llava(m) = &model.net else { panic!("not a LLaVA model") };
        let tiles: usize = m.geometries(&e.image_sizes).unwrap().iter().map(|g| g.num_tiles()).sum();
        assert_eq!(e.pixels.len(), tiles * 3 * 56 * 56, "{}: pixels of {} images", e.id, e.image_sizes.len());
    }
    let out = tmp("sft-vicuna");
    sft::run(sft_args(&src, &out, 1)).unwrap_or_else(|e| panic!("{e:#}"));
}
