//! Qwen2.5-VL data side against the transformers fixtures (../shared/fixtures/qwen2_5_vl_tiny,
//! or $AM3_FIXTURES): config in both layouts, checkpoint loading and its errors, sharded saving,
//! image preprocessing, M-RoPE position ids, and ChatML prompts with loss masks.
mod common;
use common::fixture_dir;

use am3safety::checkpoint::{read_tensor_file, save_sharded, Checkpoint, SaveDtype, INDEX_FILE, SINGLE_FILE};
use am3safety::data::image::{load_rgb, resize_bicubic, RgbImage};
use am3safety::models::qwen2_5_vl::chat::{self, ChatMessage, ChatOptions, ChatTemplate, Part};
use am3safety::models::qwen2_5_vl::config::{QwenPreprocessorConfig, QwenVlConfig};
use am3safety::models::qwen2_5_vl::positions::{mrope_positions, MropeState};
use am3safety::models::qwen2_5_vl::processor::{process_image, smart_resize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    let dir = fixture_dir("qwen2_5_vl_tiny");
    assert!(dir.join("config.json").is_file(), "Qwen fixtures not found at {} (set AM3_FIXTURES)", dir.display());
    dir
}

/// A fresh, empty temporary directory for one test.
fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("am3_qwen_data_{}_{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn err_text<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

fn tensors(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    read_tensor_file(path).unwrap()
}

fn as_i32(v: &[f64]) -> Vec<i32> {
    v.iter().map(|&x| x as i32).collect()
}

fn grids_of(v: &[f64]) -> Vec<[usize; 3]> {
    v.chunks(3).map(|c| [c[0] as usize, c[1] as usize, c[2] as usize]).collect()
}

// ---------------------------------------------------------------------------------------------
// Config

fn check_tiny(cfg: &QwenVlConfig) {
    let t = &cfg.text;
    assert_eq!((t.hidden_size, t.intermediate_size, t.num_hidden_layers), (64, 128, 2));
    assert_eq!((t.num_attention_heads, t.num_key_value_heads, t.head_dim), (4, 2, 16));
    assert_eq!((t.vocab_size, t.max_position_embeddings), (600, 4096));
    assert_eq!(t.rms_norm_eps, 1e-6);
    assert_eq!(t.rope_theta, 1e6);
    assert_eq!(t.mrope_section, vec![2, 3, 3]);
    assert!(!t.tie_word_embeddings);
    let v = &cfg.vision;
    assert_eq!((v.depth, v.hidden_size, v.intermediate_size, v.num_heads), (4, 32, 64, 2));
    assert_eq!((v.in_channels, v.patch_size, v.spatial_merge_size, v.temporal_patch_size), (3, 14, 2, 2));
    assert_eq!((v.window_size, v.out_hidden_size), (56, 64));
    assert_eq!(v.fullatt_block_indexes, vec![1, 3]);
    assert_eq!(v.patch_dim(), 1176);
    assert_eq!(
        (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id),
        (590, 591, 592, 593)
    );
    assert_eq!((cfg.bos_token_id, cfg.eos_token_id), (580, 581));
}

/// The fixture's flat config rewritten in the transformers-5 nested layout.
fn nested_variant(flat: &Value) -> Value {
    let f = flat.as_object().unwrap();
    let text_keys = [
        "hidden_act",
        "hidden_size",
        "intermediate_size",
        "max_position_embeddings",
        "num_attention_heads",
        "num_hidden_layers",
        "num_key_value_heads",
        "rms_norm_eps",
        "vocab_size",
        "use_sliding_window",
        "sliding_window",
        "max_window_layers",
        "attention_dropout",
        "bos_token_id",
        "eos_token_id",
    ];
    let mut text = serde_json::Map::new();
    let mut root = serde_json::Map::new();
    for (k, v) in f {
        if text_keys.contains(&k.as_str()) {
            text.insert(k.clone(), v.clone());
        } else if k != "rope_scaling" && k != "rope_theta" {
            root.insert(k.clone(), v.clone());
        }
    }
    text.insert("model_type".into(), json!("qwen2_5_vl_text"));
    text.insert(
        "rope_parameters".into(),
        json!({"rope_type": "default", "rope_theta": f["rope_theta"], "mrope_section": f["rope_scaling"]["mrope_section"]}),
    );
    root.insert("text_config".into(), Value::Object(text));
    let mut vision = f["vision_config"].as_object().unwrap().clone();
    vision.remove("in_chans");
    vision.insert("in_channels".into(), json!(3));
    root.insert("vision_config".into(), Value::Object(vision));
    root.insert("dtype".into(), json!("float32"));
    root.remove("torch_dtype");
    Value::Object(root)
}

#[test]
fn config_both_layouts_and_roundtrip() {
    let dir = fixtures();
    let flat = QwenVlConfig::load(&dir).unwrap();
    check_tiny(&flat);
    assert_eq!(flat.torch_dtype, "float32");

    let raw: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let tmp = tmp_dir("config_layouts");
    std::fs::write(tmp.join("config.json"), serde_json::to_string_pretty(&nested_variant(&raw)).unwrap()).unwrap();
    let nested = QwenVlConfig::load(&tmp).unwrap();
    check_tiny(&nested);
    assert_eq!(nested, flat, "nested layout parses to the same config");

    // to_json writes the flat published layout, which loads back identically.
    let out = tmp_dir("config_save");
    flat.save(&out).unwrap();
    let j: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert!(j.get("text_config").is_none() && j["rope_scaling"]["mrope_section"] == json!([2, 3, 3]));
    assert_eq!(j["vision_config"]["in_chans"], json!(3));
    assert_eq!(QwenVlConfig::load(&out).unwrap(), flat);

    // Class defaults apply to omitted non-size fields (window, full-attention blocks, Qwen ids,
    // eps 1e-5); the sizes are required (tests/limits.rs).
    let minimal = json!({"model_type": "qwen2_5_vl", "hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4,
        "num_hidden_layers": 28, "intermediate_size": 18944, "vocab_size": 152064, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584}});
    let c = QwenVlConfig::from_json(&minimal, Path::new("minimal.json")).unwrap();
    assert_eq!((c.text.vocab_size, c.text.rms_norm_eps, c.text.head_dim), (152064, 1e-5, 128));
    assert_eq!(
        (c.vision.depth, c.vision.window_size, c.vision.fullatt_block_indexes.clone()),
        (32, 112, vec![7, 15, 23, 31])
    );
    assert_eq!((c.image_token_id, c.vision_start_token_id, c.eos_token_id), (151655, 151652, 151645));
    let _ = std::fs::remove_dir_all(&tmp);
    let _ = std::fs::remove_dir_all(&out);
}

/// (what the case breaks, how it edits config.json, the field the error must name).
type ConfigCase = (&'static str, Box<dyn Fn(&mut Value)>, &'static str);

#[test]
fn config_errors_name_field_and_file() {
    let dir = fixtures();
    let raw: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let file = Path::new("/some/ckpt/config.json");
    let cases: Vec<ConfigCase> = vec![
        ("model_type", Box::new(|v| v["model_type"] = json!("llava_next")), "model_type"),
        (
            "mrope sum",
            Box::new(|v| v["rope_scaling"]["mrope_section"] = json!([2, 3, 4])),
            "rope_scaling.mrope_section",
        ),
        ("string field", Box::new(|v| v["hidden_size"] = json!("64")), "hidden_size"),
        ("zero", Box::new(|v| v["num_hidden_layers"] = json!(0)), "num_hidden_layers"),
        ("kv heads", Box::new(|v| v["num_key_value_heads"] = json!(3)), "num_key_value_heads"),
        ("rope type", Box::new(|v| v["rope_scaling"]["type"] = json!("yarn")), "rope_scaling.type"),
        ("vision heads", Box::new(|v| v["vision_config"]["num_heads"] = json!(3)), "vision_config.num_heads"),
        (
            "out hidden",
            Box::new(|v| v["vision_config"]["out_hidden_size"] = json!(32)),
            "vision_config.out_hidden_size",
        ),
        (
            "fullatt",
            Box::new(|v| v["vision_config"]["fullatt_block_indexes"] = json!([1, 4])),
            "vision_config.fullatt_block_indexes",
        ),
        ("act", Box::new(|v| v["hidden_act"] = json!("relu")), "hidden_act"),
        ("token id", Box::new(|v| v["image_token_id"] = json!(600)), "image_token_id"),
    ];
    for (what, edit, field) in cases {
        let mut v = raw.clone();
        edit(&mut v);
        let msg = err_text(QwenVlConfig::from_json(&v, file));
        println!("{what}: {msg}");
        assert!(msg.contains(&format!("`{field}`")) && msg.contains("/some/ckpt/config.json"), "{what}: {msg}");
    }
    let mut nested = nested_variant(&raw);
    nested["text_config"]["rope_parameters"]["mrope_section"] = json!([8, 1, 0]);
    let msg = err_text(QwenVlConfig::from_json(&nested, file));
    assert!(msg.contains("`text_config.rope_parameters.mrope_section`"), "{msg}");
    let msg = err_text(QwenVlConfig::load("/nonexistent/dir"));
    assert!(msg.contains("/nonexistent/dir/config.json"), "{msg}");
}

#[test]
fn preprocessor_config_layouts() {
    let p = QwenPreprocessorConfig::load(fixtures()).unwrap();
    assert_eq!(
        (p.min_pixels, p.max_pixels, p.patch_size, p.merge_size, p.temporal_patch_size),
        (3136, 50176, 14, 2, 2)
    );
    assert_eq!(p.image_mean, [0.48145466, 0.4578275, 0.40821073]);
    let hub = json!({"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"});
    let h = QwenPreprocessorConfig::from_json(&hub, Path::new("p.json")).unwrap();
    assert_eq!(h, QwenPreprocessorConfig::default());
    assert_eq!(QwenPreprocessorConfig::load("/nonexistent").unwrap(), QwenPreprocessorConfig::default());
    let bad = json!({"image_std": [0.2, 0.0, 0.3]});
    let msg = err_text(QwenPreprocessorConfig::from_json(&bad, Path::new("/x/preprocessor_config.json")));
    assert!(msg.contains("`image_std`") && msg.contains("/x/preprocessor_config.json"), "{msg}");
    let cfg = QwenVlConfig::load(fixtures()).unwrap();
    p.check_against(&cfg.vision).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Checkpoint

#[test]
fn checkpoint_loads_fixture() {
    let dir = fixtures();
    let ck = Checkpoint::open(&dir).unwrap();
    let reference = tensors(&dir.join("model.safetensors"));
    assert_eq!(ck.names().len(), reference.len());
    assert!(
        ck.has("model.embed_tokens.weight") && ck.has("visual.patch_embed.proj.weight") && ck.has("lm_head.weight")
    );
    for (name, (shape, vals)) in &reference {
        let got = ck.get_f32(name, shape).unwrap();
        assert!(got.iter().zip(vals).all(|(a, b)| *a as f64 == *b), "{name}");
    }
    assert_eq!(ck.shape("visual.patch_embed.proj.weight"), Some(&[32, 3, 2, 14, 14][..]));
    println!("checkpoint: {} tensors read back exactly", reference.len());
}

#[test]
fn checkpoint_errors_name_tensor_and_file() {
    let dir = fixtures();
    let ck = Checkpoint::open(&dir).unwrap();
    let file = dir.join("model.safetensors").display().to_string();

    let msg = err_text(ck.get_f32("model.layers.9.mlp.up_proj.weight", &[128, 64]));
    println!("missing: {msg}");
    assert!(
        msg.contains("`model.layers.9.mlp.up_proj.weight`")
            && msg.contains("not found")
            && msg.contains("model.safetensors")
    );

    let msg = err_text(ck.get_f32("model.embed_tokens.weight", &[64, 600]));
    println!("shape: {msg}");
    assert!(msg.contains("`model.embed_tokens.weight`") && msg.contains(&file) && msg.contains("[600, 64]"));

    // Truncated: the header promises more data than the file holds.
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let t = tmp_dir("ckpt_truncated");
    std::fs::write(t.join(SINGLE_FILE), &bytes[..bytes.len() - 1000]).unwrap();
    let msg = err_text(Checkpoint::open(&t));
    println!("truncated: {msg}");
    assert!(
        msg.contains("truncated")
            && msg.contains("tensor `")
            && msg.contains(&t.join(SINGLE_FILE).display().to_string())
    );

    // Truncated inside the header, and garbage.
    std::fs::write(t.join(SINGLE_FILE), &bytes[..100]).unwrap();
    let msg = err_text(Checkpoint::open(&t));
    println!("truncated header: {msg}");
    assert!(msg.contains("model.safetensors"));
    let mut junk = bytes.clone();
    for b in junk[8..40].iter_mut() {
        *b = b'#';
    }
    std::fs::write(t.join(SINGLE_FILE), &junk).unwrap();
    let msg = err_text(Checkpoint::open(&t));
    println!("corrupt header: {msg}");
    assert!(msg.contains("model.safetensors") && msg.contains("JSON"));

    // Unsupported dtype: the fixture inputs hold I64 tensors.
    std::fs::copy(dir.join("inputs.safetensors"), t.join(SINGLE_FILE)).unwrap();
    let ck = Checkpoint::open(&t).unwrap();
    let msg = err_text(ck.get_f32("input_ids", &[1, 86]));
    println!("dtype: {msg}");
    assert!(msg.contains("`input_ids`") && msg.contains("I64") && msg.contains("model.safetensors"));

    // Empty directory.
    let e = tmp_dir("ckpt_empty");
    let msg = err_text(Checkpoint::open(&e));
    assert!(msg.contains(INDEX_FILE), "{msg}");
    let _ = std::fs::remove_dir_all(&t);
    let _ = std::fs::remove_dir_all(&e);
}

#[test]
fn save_load_roundtrip_sharded_and_single() {
    let dir = fixtures();
    let reference = tensors(&dir.join("model.safetensors"));
    let mut names: Vec<&String> = reference.keys().collect();
    names.sort();
    let list: Vec<(String, Vec<usize>, Vec<f32>)> = names
        .iter()
        .map(|n| ((*n).clone(), reference[*n].0.clone(), reference[*n].1.iter().map(|&x| x as f32).collect()))
        .collect();
    let out = tmp_dir("save_roundtrip");

    // f32 in shards of at most 256 kB (the embedding and lm_head take 150 kB each).
    save_sharded(&out, &list, SaveDtype::F32, 256 << 10).unwrap();
    let shards: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    println!("sharded save wrote {shards:?}");
    assert!(out.join(INDEX_FILE).is_file() && !out.join(SINGLE_FILE).exists());
    let n_shards = shards.iter().filter(|s| s.starts_with("model-")).count();
    assert!(n_shards >= 3, "expected several shards, got {n_shards}");
    assert!(shards.iter().all(|s| !s.contains(".tmp")), "temporary files left behind");
    // Each shard is a valid safetensors file for the reference parser too.
    for s in shards.iter().filter(|s| s.starts_with("model-")) {
        let bytes = std::fs::read(out.join(s)).unwrap();
        safetensors::SafeTensors::deserialize(&bytes).unwrap();
    }
    let ck = Checkpoint::open(&out).unwrap();
    assert_eq!(ck.names().len(), list.len());
    for (n, s, v) in &list {
        assert_eq!(&ck.get_f32(n, s).unwrap(), v, "{n}");
    }

    // bf16 into one file over the sharded save: the index and shards are removed.
    save_sharded(&out, &list, SaveDtype::BF16, usize::MAX).unwrap();
    let left: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(left, vec![SINGLE_FILE.to_string()]);
    let ck = Checkpoint::open(&out).unwrap();
    let mut worst = 0f64;
    for (n, s, v) in &list {
        let got = ck.get_f32(n, s).unwrap();
        let want: Vec<f32> = v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
        assert_eq!(got, want, "{n}");
        let bf = ck.get_bf16(n, s).unwrap();
        assert!(bf.iter().zip(&want).all(|(a, b)| a.to_f32() == *b));
        worst = worst.max(common::max_abs(&got, v));
    }
    println!("bf16 save: rounding error max abs {worst:.2e}");

    // A broken index is reported with the tensor and the shard.
    save_sharded(&out, &list, SaveDtype::F32, 256 << 10).unwrap();
    let idx_path = out.join(INDEX_FILE);
    let mut idx: Value = serde_json::from_str(&std::fs::read_to_string(&idx_path).unwrap()).unwrap();
    idx["weight_map"]["model.norm.weight"] = json!("model-00001-of-00099.safetensors");
    std::fs::write(&idx_path, idx.to_string()).unwrap();
    let msg = err_text(Checkpoint::open(&out));
    println!("bad index: {msg}");
    assert!(msg.contains("model-00001-of-00099.safetensors"));
    let _ = std::fs::remove_dir_all(&out);
}

// ---------------------------------------------------------------------------------------------
// Image preprocessing

#[test]
fn smart_resize_examples() {
    let (mn, mx) = (3136, 12845056);
    for &((h, w), want) in &[
        ((768, 1024), (756, 1036)),
        ((480, 640), (476, 644)),
        ((1080, 1920), (1092, 1932)),
        ((224, 224), (224, 224)),
        ((70, 70), (56, 56)),
        ((20, 20), (56, 56)),
        ((112, 140), (112, 140)),
        ((100, 130), (112, 140)),
    ] {
        assert_eq!(smart_resize(h, w, 28, mn, mx).unwrap(), want, "{h}x{w}");
    }
    // Over the pixel budget: scaled down, sides floored to multiples of 28.
    let (h, w) = smart_resize(4000, 3000, 28, mn, 1003520).unwrap();
    assert!(h % 28 == 0 && w % 28 == 0 && h * w <= 1003520, "{h}x{w}");
    assert!(smart_resize(10, 2500, 28, mn, mx).unwrap_err().to_string().contains("aspect ratio"));
}

#[test]
fn processed_pixels_match_fixtures() {
    let dir = fixtures();
    let pcfg = QwenPreprocessorConfig::load(&dir).unwrap();
    for k in 0..2 {
        let path = dir.join(format!("image{k}.png"));
        let img = load_rgb(&path).unwrap();
        let refs = tensors(&dir.join(format!("image{k}_processed.safetensors")));
        let (pshape, pv) = &refs["pixel_values"];
        let grid = grids_of(&refs["image_grid_thw"].1)[0];
        let out = process_image(&img, &pcfg).unwrap();
        assert_eq!(out.grid_thw, grid, "image{k} grid");
        assert_eq!(vec![out.num_patches(), out.patch_dim], *pshape, "image{k} shape");
        let want: Vec<f32> = pv.iter().map(|&x| x as f32).collect();
        let err = common::max_abs(&out.pixel_values, &want);
        let lsb = 1.0 / 255.0 / 0.26130258; // one uint8 level after normalisation (largest std⁻¹)
        let off: usize = out.pixel_values.iter().zip(&want).filter(|(a, b)| (**a - **b).abs() > 1e-5).count();
        let resized = (img.height, img.width) != (grid[1] * 14, grid[2] * 14);
        println!(
            "image{k} {}x{} -> grid {grid:?} ({}): max abs err {err:.3e} (= {:.2} uint8 levels), {off} of {} values differ by > 1e-5",
            img.height,
            img.width,
            if resized { "resized, Pillow bicubic" } else { "no resize" },
            err / lsb,
            want.len()
        );
        let tol = if resized { 2e-2 } else { 1e-5 };
        assert!(err <= tol, "image{k}: max abs err {err:.3e} > {tol:.0e}");
    }
}

#[test]
fn image_errors_and_resize_identity() {
    let t = tmp_dir("image_errors");
    let bad = t.join("broken.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nnot really a png").unwrap();
    let msg = err_text(load_rgb(&bad));
    assert!(msg.contains("broken.png"), "{msg}");
    let msg = err_text(load_rgb(t.join("missing.jpg")));
    assert!(msg.contains("missing.jpg"), "{msg}");
    let img = load_rgb(fixtures().join("image1.png")).unwrap();
    assert_eq!(resize_bicubic(&img, img.width, img.height).unwrap(), img);
    // A 2× upscale keeps a horizontal ramp monotone and within range.
    let ramp = RgbImage::new(8, 2, (0..2).flat_map(|_| (0..8).flat_map(|x| [x as u8 * 30; 3])).collect()).unwrap();
    let up = resize_bicubic(&ramp, 16, 4).unwrap();
    let row: Vec<u8> = (0..16).map(|x| up.at(x, 0, 0)).collect();
    assert!(row.windows(2).all(|w| w[0] <= w[1]), "{row:?}");
    let _ = std::fs::remove_dir_all(&t);
}

/// Pillow 13.0 `Image.resize(..., BICUBIC)` outputs of a synthetic image, as FNV-1a-64 hashes of
/// the RGB bytes plus the first two pixels. Covers down- and upscaling, mixed axes and both pass
/// orders (11×29→8×7 and 30×90→28×28 run the vertical pass first).
/// ((width, height) in, (width, height) out, FNV-1a-64 of the output, its first two pixels).
type ResizeCase = ((usize, usize), (usize, usize), u64, [u8; 6]);

#[test]
fn bicubic_resize_matches_pillow() {
    let cases: [ResizeCase; 6] = [
        ((23, 17), (9, 5), 0xf758328de5ee6ac1, [117, 138, 135, 144, 139, 142]),
        ((11, 29), (8, 7), 0x90fc21caa2d2d110, [102, 138, 133, 125, 153, 128]),
        ((9, 6), (20, 13), 0x4b0ea62d8f07e08a, [0, 42, 95, 0, 48, 101]),
        ((40, 40), (28, 28), 0x636c402f24ca2a1b, [33, 91, 157, 98, 155, 152]),
        ((37, 19), (56, 28), 0xa600186bb9e53cd8, [0, 45, 98, 9, 62, 114]),
        ((30, 90), (28, 28), 0x2462c9b33dd71c1c, [84, 133, 124, 137, 127, 161]),
    ];
    for ((w, h), (nw, nh), hash, head) in cases {
        let data: Vec<u8> = (0..h)
            .flat_map(|y| {
                (0..w).flat_map(move |x| {
                    (0..3).map(move |c| ((x * 37 + y * 91 + c * 53 + (x * y) % 17 * 13) % 256) as u8)
                })
            })
            .collect();
        let out = resize_bicubic(&RgbImage::new(w, h, data).unwrap(), nw, nh).unwrap();
        let fnv = out.data.iter().fold(0xcbf29ce484222325u64, |a, &b| (a ^ b as u64).wrapping_mul(0x100000001b3));
        println!("bicubic {w}x{h} -> {nw}x{nh}: hash {fnv:016x} (Pillow {hash:016x})");
        assert_eq!(&out.data[..6], &head, "{w}x{h} -> {nw}x{nh}: first pixels");
        assert_eq!(fnv, hash, "{w}x{h} -> {nw}x{nh}: output differs from Pillow");
    }
}

// ---------------------------------------------------------------------------------------------
// M-RoPE positions

#[test]
fn mrope_positions_match_reference() {
    let dir = fixtures();
    let cfg = QwenVlConfig::load(&dir).unwrap();
    let inputs = tensors(&dir.join("inputs.safetensors"));
    let reference = tensors(&dir.join("reference.safetensors"));
    let ids = as_i32(&inputs["input_ids"].1);
    let grids = grids_of(&inputs["image_grid_thw"].1);
    let (rshape, rpos) = &reference["position_ids"];
    assert_eq!(rshape, &vec![3, ids.len()]);
    let want = as_i32(rpos);
    let (pos, delta) = mrope_positions(&ids, &grids, &cfg).unwrap();
    let mismatches = pos.iter().zip(&want).filter(|(a, b)| a != b).count();
    println!("position_ids: {} tokens, {mismatches} mismatches, rope delta {delta}", ids.len());
    assert_eq!(pos, want);
    assert_eq!(delta, want.iter().max().unwrap() + 1 - ids.len() as i32);

    // Appending in chunks (split anywhere, even inside an image run) gives the same ids.
    for split in [1usize, 6, 10, 26, 27, 50, 85] {
        let mut st = MropeState::new(&cfg);
        let (a, b) = ids.split_at(split);
        let images_in_a = {
            let mut n = 0;
            for (i, &t) in a.iter().enumerate() {
                if t == 590 && (i == 0 || a[i - 1] != 590) {
                    n += 1;
                }
            }
            n
        };
        let pa = st.append(a, &grids[..images_in_a]).unwrap();
        let pb = st.append(b, &grids[images_in_a..]).unwrap();
        for r in 0..3 {
            let row: Vec<i32> =
                pa[r * a.len()..(r + 1) * a.len()].iter().chain(&pb[r * b.len()..(r + 1) * b.len()]).copied().collect();
            assert_eq!(row, want[r * ids.len()..(r + 1) * ids.len()], "split at {split}, row {r}");
        }
        assert_eq!(st.delta(), delta);
    }

    // Pure text is arange on all rows; decoding continues at next_position.
    let (p, d) = mrope_positions(&[5, 6, 7], &[], &cfg).unwrap();
    assert_eq!((p, d), (vec![0, 1, 2, 0, 1, 2, 0, 1, 2], 0));
    // Spec worked example: 11 text, image grid 1×18×24, 10 text → delta −96.
    let mut ex = vec![1i32; 11];
    ex.extend(std::iter::repeat_n(590, 108));
    ex.extend(std::iter::repeat_n(1, 10));
    let (p, d) = mrope_positions(&ex, &[[1, 18, 24]], &cfg).unwrap();
    assert_eq!((d, p[129 + 11 + 107], p[2 * 129 + 11 + 107], p[118 + 1]), (-96, 19, 22, 23));

    // Errors: wrong grid count, short image run.
    assert!(mrope_positions(&ids, &grids[..1], &cfg).is_err());
    assert!(mrope_positions(&ex, &[[1, 18, 24], [1, 2, 2]], &cfg).is_err());
    let msg = err_text(mrope_positions(&ex, &[[1, 18, 26]], &cfg));
    assert!(msg.contains("needs 117"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// Chat template

/// GPT-2's byte → printable character map used by byte-level BPE.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut map = vec!['\0'; 256];
    for &b in &printable {
        map[b as usize] = char::from_u32(b).unwrap();
    }
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            map[b as usize] = char::from_u32(256 + n).unwrap();
            n += 1;
            printable.push(b);
        }
    }
    map
}

/// A tiny byte-level BPE tokenizer with Qwen's pre-tokenizer, a few merges and the ChatML and
/// vision special tokens at the tiny config's ids.
fn tiny_tokenizer(dir: &Path) -> tokenizers::Tokenizer {
    let chars = byte_chars();
    let mut vocab = serde_json::Map::new();
    for (b, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), json!(b));
    }
    let nl = chars[b'\n' as usize];
    let sp = chars[b' ' as usize];
    let merge_pairs = [
        ("a", "s"),
        ("as", "s"),
        ("i", "s"),
        ("t", "a"),
        ("n", "t"),
        (&*format!("{nl}"), &*format!("{nl}")),
        (&*format!("{sp}"), "c"),
    ];
    let mut merges = Vec::new();
    for (next, (a, b)) in (256..).zip(merge_pairs) {
        vocab.insert(format!("{a}{b}"), json!(next));
        merges.push(json!([a, b]));
    }
    let special = [
        ("<|endoftext|>", 580),
        ("<|im_end|>", 581),
        ("<|im_start|>", 582),
        ("<|image_pad|>", 590),
        ("<|video_pad|>", 591),
        ("<|vision_start|>", 592),
        ("<|vision_end|>", 593),
    ];
    let added: Vec<Value> = special
        .iter()
        .map(|(t, id)| json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    for (t, id) in special {
        vocab.insert(t.to_string(), json!(id));
    }
    let tj = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
             "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "", "end_of_word_suffix": "",
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges}
    });
    std::fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
    chat::load_tokenizer(dir).unwrap().expect("tokenizer.json was just written")
}

#[test]
fn chat_prompt_ids_and_loss_mask() {
    let dir = fixtures();
    let cfg = QwenVlConfig::load(&dir).unwrap();
    assert!(chat::load_tokenizer(&dir).unwrap().is_none(), "the fixture has no tokenizer.json");
    let t = tmp_dir("chat");
    let tok = tiny_tokenizer(&t);
    let tpl = ChatTemplate::new(&tok, &cfg).unwrap();

    let grids = [[1usize, 8, 10], [1, 4, 6]];
    let msgs = vec![
        ChatMessage::user(vec![Part::Image(0), Part::Text("What is in this picture?".into())]),
        ChatMessage::assistant("A cat sits."),
        ChatMessage::user(vec![Part::Text("And this one?\n".into()), Part::Image(1)]),
        ChatMessage::assistant("\n\nI cannot assist with that."),
    ];
    let opts = ChatOptions::default();
    let enc = tpl.encode_chat(&msgs, &grids, &opts).unwrap();
    assert_eq!(enc.ids.len(), enc.loss_mask.len());
    assert_eq!(enc.image_order, vec![0, 1]);
    assert_eq!(enc.grids, grids.to_vec());

    // Collapsing the placeholder runs and decoding gives back the template text exactly.
    let r = chat::render_chat(&msgs, &opts).unwrap();
    assert!(r.text.starts_with(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What"
    ));
    let mut collapsed: Vec<u32> = Vec::new();
    for (i, &id) in enc.ids.iter().enumerate() {
        if !(id == 590 && i > 0 && enc.ids[i - 1] == 590) {
            collapsed.push(id as u32);
        }
    }
    assert_eq!(tok.decode(&collapsed, false).unwrap(), r.text);
    // One whole-text tokenisation (merges across the role header included).
    let direct: Vec<i32> = tok.encode(r.text.as_str(), false).unwrap().get_ids().iter().map(|&i| i as i32).collect();
    assert_eq!(collapsed.iter().map(|&i| i as i32).collect::<Vec<_>>(), direct);

    // Placeholder runs: 8·10/4 = 20 and 4·6/4 = 6 tokens, never in the loss.
    let runs: Vec<usize> = enc.ids.split(|&i| i != 590).filter(|r| !r.is_empty()).map(|r| r.len()).collect();
    assert_eq!(runs, vec![20, 6]);
    assert!(enc.ids.iter().zip(&enc.loss_mask).all(|(&i, &m)| i != 590 || m == 0));

    // The loss covers exactly the replies and their <|im_end|>.
    assert_eq!(enc.assistant_spans.len(), 2);
    let mut masked_text = Vec::new();
    for (mi, span) in &enc.assistant_spans {
        assert!(enc.loss_mask[span.clone()].iter().all(|&m| m == 1));
        let ids: Vec<u32> = enc.ids[span.clone()].iter().map(|&i| i as u32).collect();
        masked_text.push((*mi, tok.decode(&ids, false).unwrap()));
    }
    println!("assistant spans: {:?}", enc.assistant_spans);
    println!("masked text: {masked_text:?}");
    assert_eq!(masked_text[0], (1, "A cat sits.<|im_end|>".to_string()));
    // A reply starting with newlines: BPE merges them with the header's "\n" (as transformers'
    // whole-text tokenisation does), and that token overlaps the reply, so it is a target.
    assert_eq!(masked_text[1], (3, "\n\n\nI cannot assist with that.<|im_end|>".to_string()));
    assert_eq!(
        enc.loss_mask.iter().map(|&m| m as usize).sum::<usize>(),
        enc.assistant_spans.iter().map(|(_, s)| s.len()).sum::<usize>()
    );
    assert_eq!(*enc.ids.last().unwrap(), b'\n' as i32, "the last token is the newline after <|im_end|>");
    assert_eq!(enc.loss_mask.last(), Some(&0));

    // Encoding the dialogue in two chunks gives the same ids (special tokens split the text).
    let a = tpl.encode_chat(&msgs[..2], &grids, &opts).unwrap();
    let cont = ChatOptions { default_system: None, ..ChatOptions::default() };
    let b = tpl.encode_chat(&msgs[2..], &grids, &cont).unwrap();
    let joined: Vec<i32> = a.ids.iter().chain(&b.ids).copied().collect();
    assert_eq!(joined, enc.ids);
    // ... and M-RoPE continues across the chunks.
    let (whole, _) = mrope_positions(&enc.ids, &enc.grids, &cfg).unwrap();
    let mut st = MropeState::new(&cfg);
    let pa = st.append(&a.ids, &a.grids).unwrap();
    let pb = st.append(&b.ids, &b.grids).unwrap();
    let n = enc.ids.len();
    assert_eq!(&pa[..a.ids.len()], &whole[..a.ids.len()]);
    assert_eq!(&pb[2 * b.ids.len()..], &whole[2 * n + a.ids.len()..]);

    // Generation prompt, explicit system message, image ids.
    let gen = ChatOptions { add_generation_prompt: true, add_vision_id: true, ..ChatOptions::default() };
    let mut sys = vec![ChatMessage::system("Be safe.")];
    sys.push(msgs[0].clone());
    let r = chat::render_chat(&sys, &gen).unwrap();
    assert_eq!(
        r.text,
        "<|im_start|>system\nBe safe.<|im_end|>\n<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>What is in this picture?<|im_end|>\n<|im_start|>assistant\n"
    );
    let g = tpl.encode_chat(&sys, &grids, &gen).unwrap();
    assert!(g.loss_mask.iter().all(|&m| m == 0));
    let tail = [vec![582], tpl.encode_text("assistant\n").unwrap()].concat();
    assert!(g.ids.ends_with(&tail));

    // A literal placeholder in user text, a missing grid, an unknown role: errors.
    let inject = vec![ChatMessage::user(vec![Part::Text("<|image_pad|>".into())])];
    assert!(err_text(tpl.encode_chat(&inject, &grids, &opts)).contains("literal"));
    let msg = err_text(tpl.encode_chat(&[ChatMessage::user(vec![Part::Image(5)])], &grids, &opts));
    assert!(msg.contains("image 5"), "{msg}");
    assert!(tpl.encode_chat(&[ChatMessage::new("tool", vec![])], &grids, &opts).is_err());
    let _ = std::fs::remove_dir_all(&t);
}
