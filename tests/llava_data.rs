//! LLaVA-NeXT data side against the transformers fixtures (`../shared/fixtures/llava_next_tiny`,
//! or `AM3_LLAVA_FIXTURES`): config parsing (both layouts, defaults, errors), weight-name
//! resolution (llava-hf and transformers-5 spellings), anyres preprocessing vs
//! `imageK_processed.safetensors` (errors printed), `<image>` token counts vs the fixture's
//! input_ids and model-spec B2/B6, pack plans (newline rows located in `vision_reference`), and
//! the Mistral / Vicuna templates with their loss masks.

mod common;
use common::*;
#[path = "support/fixture_tokenizers.rs"]
mod fixture_tokenizers;
use fixture_tokenizers::llava_word_tokenizer;

use am3safety::checkpoint::{read_tensor_file, save_sharded, Checkpoint, SaveDtype};
use am3safety::data::image::{load_rgb, RgbImage};
use am3safety::models::llava_next::chat::{
    placeholder_runs, render_chat, ChatMessage, LlavaChatOptions, LlavaChatTemplate, Part, TemplateKind,
};
use am3safety::models::llava_next::config::{
    canonical_name, check_weights, resolve, spellings, weight_shapes, LlavaNextConfig, LlavaPreprocessorConfig,
    TextFamily,
};
use am3safety::models::llava_next::packing::{
    gather_index, image_token_count, pack_plan, select_best_resolution, AnyresGeometry, PackSrc,
};
use am3safety::models::llava_next::processor::{batch_images, process_image, process_image_file};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

type Tensors = HashMap<String, (Vec<usize>, Vec<f64>)>;

fn fixture_dir() -> PathBuf {
    let dir = common::fixture_dir("llava_next_tiny");
    assert!(
        dir.join("config.json").is_file(),
        "LLaVA fixtures not found in {} (set AM3_LLAVA_FIXTURES or AM3_FIXTURES)",
        dir.display()
    );
    dir
}

fn read(name: &str) -> Tensors {
    let p = fixture_dir().join(name);
    read_tensor_file(&p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()))
}

/// A fresh temporary directory for one test.
fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("am3_llava_{tag}_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fixture_config() -> LlavaNextConfig {
    LlavaNextConfig::load(fixture_dir()).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The CLIP ViT-L/14-336 vision_config of the published LLaVA-NeXT 7B models.
fn clip_l() -> Value {
    json!({"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14})
}

fn parse(v: &Value) -> anyhow::Result<LlavaNextConfig> {
    LlavaNextConfig::from_json(v, Path::new("test/config.json"))
}

// ---------------------------------------------------------------------------------------------
// Config and weights.

#[test]
fn config_fixture() {
    let c = fixture_config();
    let t = &c.text;
    assert_eq!(t.family, TextFamily::Mistral);
    assert_eq!((t.hidden_size, t.intermediate_size, t.num_hidden_layers), (64, 128, 2));
    assert_eq!((t.num_attention_heads, t.num_key_value_heads, t.head_dim), (4, 2, 16));
    assert_eq!((t.vocab_size, t.rms_norm_eps, t.rope_theta), (600, 1e-5, 1e6));
    assert_eq!(t.sliding_window, Some(4096));
    assert_eq!((t.bos_token_id, t.eos_token_id, t.pad_token_id), (1, 2, None));
    assert!(!t.tie_word_embeddings);
    let v = &c.vision;
    assert_eq!((v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads), (32, 64, 3, 2));
    assert_eq!((v.image_size, v.patch_size, v.patches_per_side(), v.num_positions()), (56, 14, 4, 17));
    assert_eq!(v.layer_norm_eps, 1e-5);
    assert_eq!(c.image_token_index, 590);
    assert_eq!(c.vision_feature_layer, vec![-2]);
    assert_eq!(c.feature_hidden_states(), vec![2]);
    assert_eq!(c.vision_layers_used(), 2);
    assert_eq!(c.projector_in(), 32);
    assert_eq!(c.image_grid_pinpoints, vec![(56, 112), (112, 56), (112, 112), (56, 168), (168, 56)]);
    assert!(c.multimodal_projector_bias);

    let p = LlavaPreprocessorConfig::load(fixture_dir(), &c).unwrap();
    assert_eq!((p.shortest_edge, p.crop_size), (56, (56, 56)));
    assert_eq!(p.image_grid_pinpoints, c.image_grid_pinpoints);
    assert_eq!(p.image_mean, [0.48145466, 0.4578275, 0.40821073]);
    #[allow(clippy::excessive_precision)]
    let published = [0.26862954f32, 0.26130258, 0.27577711];
    assert_eq!(p.image_std, published);

    // Written back and re-read: the same config.
    let d = temp_dir("cfg_roundtrip");
    c.save(&d).unwrap();
    assert_eq!(LlavaNextConfig::load(&d).unwrap(), c);
    std::fs::remove_dir_all(&d).ok();
    println!("config_fixture: ok");
}

#[test]
fn config_published_defaults() {
    // The sparse llava-v1.6-vicuna-7b-hf layout: most text/vision fields omitted.
    let vicuna = json!({
        "architectures": ["LlavaNextForConditionalGeneration"],
        "model_type": "llava_next",
        "ignore_index": -100, "image_token_index": 32000, "projector_hidden_act": "gelu",
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
            "max_position_embeddings": 4096, "model_type": "llama", "pad_token_id": 0, "rms_norm_eps": 1e-05,
            "torch_dtype": "float16", "vocab_size": 32064},
        "torch_dtype": "float16", "use_image_newline_parameter": true,
        "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model",
            "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064
    });
    let c = parse(&vicuna).unwrap();
    let t = &c.text;
    assert_eq!(t.family, TextFamily::Llama);
    assert_eq!((t.hidden_size, t.intermediate_size, t.num_hidden_layers), (4096, 11008, 32));
    assert_eq!((t.num_attention_heads, t.num_key_value_heads, t.head_dim), (32, 32, 128));
    assert_eq!((t.rope_theta, t.rms_norm_eps, t.max_position_embeddings), (10000.0, 1e-5, 4096));
    assert_eq!((t.vocab_size, t.pad_token_id, t.sliding_window), (32064, Some(0), None));
    assert_eq!(c.vision.num_positions(), 577);
    assert_eq!(c.feature_hidden_states(), vec![23]);

    // The llava-v1.6-mistral-7b-hf text_config: sliding_window null, kv heads 8.
    let mut mistral = vicuna.clone();
    mistral["text_config"] = json!({"_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2", "architectures": ["MistralForCausalLM"],
        "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral", "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": null, "torch_dtype": "bfloat16", "vocab_size": 32064});
    let c = parse(&mistral).unwrap();
    assert_eq!(c.text.family, TextFamily::Mistral);
    assert_eq!((c.text.num_key_value_heads, c.text.head_dim, c.text.rope_theta), (8, 128, 1e6));
    assert_eq!(c.text.sliding_window, None);
    // An absent sliding_window takes MistralConfig's default.
    mistral["text_config"].as_object_mut().unwrap().remove("sliding_window");
    assert_eq!(parse(&mistral).unwrap().text.sliding_window, Some(4096));

    // text_config and vision_config themselves are required (no silent Llama-2-7B / CLIP-L);
    // an empty text_config takes LlamaConfig's defaults.
    let e = format!("{:#}", parse(&json!({"model_type": "llava_next"})).unwrap_err());
    assert!(e.contains("`text_config`: missing"), "{e}");
    let c = parse(&json!({"model_type": "llava_next", "text_config": {}, "vision_config": clip_l()})).unwrap();
    assert_eq!((c.text.family, c.text.vocab_size, c.text.rms_norm_eps), (TextFamily::Llama, 32000, 1e-6));
    assert_eq!((c.image_token_index, c.image_grid_pinpoints.len()), (32000, 5));
    // A present vision_config without fields: CLIPVisionConfig's own defaults.
    let c = parse(&json!({"model_type": "llava_next", "text_config": {}, "vision_config": {}, "image_grid_pinpoints": [[224, 448]]})).unwrap();
    assert_eq!((c.vision.hidden_size, c.vision.image_size, c.vision.patch_size), (768, 224, 32));

    // v5 spelling: rope_parameters, image_token_id, a list of feature layers.
    let c = parse(&json!({"model_type": "llava_next", "image_token_id": 7,
        "text_config": {"model_type": "llama", "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
        "vision_config": clip_l(), "vision_feature_layer": [-2, -5]}))
    .unwrap();
    assert_eq!((c.image_token_index, c.text.rope_theta), (7, 5e5));
    assert_eq!(c.feature_hidden_states(), vec![23, 20]);
    assert_eq!(c.projector_in(), 2048);
    println!("config_published_defaults: ok");
}

#[test]
fn config_errors_name_field_and_file() {
    let cases = [
        (json!({"model_type": "llava"}), "model_type"),
        (json!({"model_type": "llava_next", "text_config": {"model_type": "qwen2"}}), "text_config.model_type"),
        (json!({"model_type": "llava_next", "text_config": {"hidden_size": "big"}}), "text_config.hidden_size"),
        (
            json!({"model_type": "llava_next", "text_config": {"num_key_value_heads": 5}}),
            "text_config.num_key_value_heads",
        ),
        (
            json!({"model_type": "llava_next", "vision_config": {"model_type": "siglip_vision_model"}}),
            "vision_config.model_type",
        ),
        (json!({"model_type": "llava_next", "vision_feature_layer": 30}), "vision_feature_layer"),
        (
            json!({"model_type": "llava_next", "vision_feature_select_strategy": "full"}),
            "vision_feature_select_strategy",
        ),
        (json!({"model_type": "llava_next", "image_grid_pinpoints": [[336, 500]]}), "image_grid_pinpoints"),
        (json!({"model_type": "llava_next", "image_grid_pinpoints": [[336]]}), "image_grid_pinpoints"),
        (
            json!({"model_type": "llava_next", "text_config": {"rope_scaling": {"rope_type": "llama3"}}}),
            "text_config.rope_scaling.rope_type",
        ),
        (json!({"model_type": "llava_next", "text_config": {"attention_bias": true}}), "text_config.attention_bias"),
    ];
    for (mut v, field) in cases {
        // The sub-configs are required; an absent one stands for CLIP-L / an all-default Llama.
        for (key, sub) in [("text_config", json!({})), ("vision_config", clip_l())] {
            if v.get(key).is_none() {
                v[key] = sub;
            }
        }
        let e = format!("{:#}", parse(&v).expect_err(&format!("{v} should fail")));
        println!("error: {e}");
        assert!(
            e.contains("test/config.json") && e.contains(&format!("`{field}`")),
            "{e} should name the file and `{field}`"
        );
    }
}

#[test]
fn weight_names_fixture() {
    let c = fixture_config();
    let ck = Checkpoint::open(fixture_dir()).unwrap();
    let pairs = check_weights(&ck, &c).unwrap_or_else(|e| panic!("{e:#}"));
    // The fixture uses the published spelling for every tensor, and nothing is left unlisted.
    assert!(pairs.iter().all(|(canon, stored)| canon == stored));
    let mut listed: Vec<&str> = pairs.iter().map(|(c, _)| c.as_str()).collect();
    listed.sort();
    assert_eq!(listed, ck.names(), "weight_shapes must list exactly the checkpoint's tensors");
    println!("weight_names_fixture: {} tensors resolved", pairs.len());
}

#[test]
fn canonical_and_spellings() {
    let cases = [
        ("vision_tower.encoder.layers.0.mlp.fc1.weight", "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"),
        ("model.vision_tower.vision_model.pre_layrnorm.bias", "vision_tower.vision_model.pre_layrnorm.bias"),
        ("model.vision_tower.embeddings.class_embedding", "vision_tower.vision_model.embeddings.class_embedding"),
        (
            "model.language_model.layers.1.self_attn.q_proj.weight",
            "language_model.model.layers.1.self_attn.q_proj.weight",
        ),
        ("language_model.norm.weight", "language_model.model.norm.weight"),
        ("language_model.model.norm.weight", "language_model.model.norm.weight"),
        ("lm_head.weight", "language_model.lm_head.weight"),
        ("language_model.lm_head.weight", "language_model.lm_head.weight"),
        ("model.multi_modal_projector.linear_1.bias", "multi_modal_projector.linear_1.bias"),
        ("model.image_newline", "image_newline"),
    ];
    for (name, canon) in cases {
        assert_eq!(canonical_name(name), canon, "{name}");
        assert!(spellings(canon).iter().any(|s| s == name), "{name} must be among the spellings of {canon}");
        assert_eq!(spellings(name)[0], canon);
    }
}

/// The transformers-5 layout: `vision_tower.*` without `vision_model`, `model.language_model.*`,
/// `lm_head.weight`, with a llama text_config.
#[test]
fn weight_names_v5_layout_and_llama() {
    let fx = fixture_dir();
    let mut cfg_json: Value = serde_json::from_str(&std::fs::read_to_string(fx.join("config.json")).unwrap()).unwrap();
    let t = cfg_json["text_config"].as_object_mut().unwrap();
    t.insert("model_type".into(), json!("llama"));
    t.remove("sliding_window");
    t.insert("num_key_value_heads".into(), json!(4));
    let d = temp_dir("v5_layout");
    std::fs::write(d.join("config.json"), serde_json::to_string_pretty(&cfg_json).unwrap()).unwrap();
    let cfg = LlavaNextConfig::load(&d).unwrap();
    assert_eq!((cfg.text.family, cfg.text.num_key_value_heads, cfg.text.sliding_window), (TextFamily::Llama, 4, None));

    // Random tensors of the right shapes, saved under the v5 names.
    let mut rng = Rng::new(7);
    let mut tensors = Vec::new();
    for (canon, shape) in weight_shapes(&cfg) {
        let name = if let Some(r) = canon.strip_prefix("vision_tower.vision_model.") {
            format!("vision_tower.{r}")
        } else if let Some(r) = canon.strip_prefix("language_model.model.") {
            format!("model.language_model.{r}")
        } else if canon == "language_model.lm_head.weight" {
            "lm_head.weight".to_string()
        } else {
            canon.clone()
        };
        let n: usize = shape.iter().product();
        tensors.push((name, shape, (0..n).map(|_| rng.normal() as f32).collect::<Vec<f32>>()));
    }
    save_sharded(&d, &tensors, SaveDtype::F32, 1 << 14).unwrap(); // several shards
    let ck = Checkpoint::open(&d).unwrap();
    let pairs = check_weights(&ck, &cfg).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(pairs.len(), tensors.len());
    assert_eq!(
        resolve(&ck, "vision_tower.vision_model.encoder.layers.2.mlp.fc2.bias").unwrap(),
        "vision_tower.encoder.layers.2.mlp.fc2.bias"
    );
    assert_eq!(
        resolve(&ck, "language_model.model.layers.1.self_attn.k_proj.weight").unwrap(),
        "model.language_model.layers.1.self_attn.k_proj.weight"
    );
    assert_eq!(resolve(&ck, "language_model.lm_head.weight").unwrap(), "lm_head.weight");
    assert_eq!(resolve(&ck, "image_newline").unwrap(), "image_newline");

    // A missing tensor names itself, its spellings and the checkpoint's files.
    let e = format!("{:#}", resolve(&ck, "language_model.model.layers.9.mlp.up_proj.weight").unwrap_err());
    println!("missing: {e}");
    assert!(
        e.contains("language_model.model.layers.9.mlp.up_proj.weight")
            && e.contains("model.language_model.layers.9.mlp.up_proj.weight")
    );
    assert!(e.contains(".safetensors"), "{e}");
    // A wrong shape names the tensor and the file.
    let mut bad = cfg.clone();
    bad.text.intermediate_size = 100;
    let e = format!("{:#}", check_weights(&ck, &bad).unwrap_err());
    println!("misshapen: {e}");
    assert!(e.contains("mlp.gate_proj.weight") && e.contains(".safetensors") && e.contains("[100, 64]"), "{e}");
    std::fs::remove_dir_all(&d).ok();
}

// ---------------------------------------------------------------------------------------------
// Preprocessing.

/// Compares our pixel_values for imageK with the fixture's, printing the errors over pixels
/// that are not resampled (the canvas padding) and over resampled ones. image1's base image
/// (130x90 -> 56x56) needs Pillow 13's vertical-first pass order to match.
#[test]
fn preprocess_matches_fixtures() {
    let fx = fixture_dir();
    let cfg = fixture_config();
    let pcfg = LlavaPreprocessorConfig::load(&fx, &cfg).unwrap();
    let mut processed = Vec::new();
    for k in 0..2 {
        let img = load_rgb(fx.join(format!("image{k}.png"))).unwrap();
        let p = process_image(&img, &pcfg).unwrap();
        let r = read(&format!("image{k}_processed.safetensors"));
        let (shape, want) = &r["pixel_values"];
        let sizes: Vec<usize> = r["image_sizes"].1.iter().map(|&x| x as usize).collect();
        let s = p.tile_size;
        assert_eq!(shape, &vec![p.num_tiles, 3, s, s], "image{k}: tile count/shape");
        assert_eq!(sizes, vec![p.image_size.0, p.image_size.1], "image{k}: image_sizes");
        let g = &p.geometry;
        let (mut pad_err, mut res_err, mut n_pad, mut n_over) = (0f64, 0f64, 0usize, 0usize);
        let mut worst_lsb = 0f64;
        for t in 0..p.num_tiles {
            for c in 0..3 {
                for y in 0..s {
                    for x in 0..s {
                        let i = ((t * 3 + c) * s + y) * s + x;
                        let e = (p.pixel_values[i] as f64 - want[i]).abs();
                        worst_lsb = worst_lsb.max(e * pcfg.image_std[c] as f64 * 255.0);
                        n_over += (e > 1e-5) as usize;
                        // Canvas coordinates of an anyres tile pixel; the base tile is all resampled.
                        let is_pad = t > 0 && {
                            let (ty, tx) = ((t - 1) / g.grid.1, (t - 1) % g.grid.1);
                            let (cy, cx) = (ty * s + y, tx * s + x);
                            cy < g.pad_top_left.0
                                || cy >= g.pad_top_left.0 + g.resized_hw.0
                                || cx < g.pad_top_left.1
                                || cx >= g.pad_top_left.1 + g.resized_hw.1
                        };
                        if is_pad {
                            pad_err = pad_err.max(e);
                            n_pad += 1;
                        } else {
                            res_err = res_err.max(e);
                        }
                    }
                }
            }
        }
        println!(
            "preprocess image{k} ({}x{} -> canvas {:?}, resized {:?}, {} tiles): max abs err {:.3e} on {} padding values (no resize), {:.3e} on resampled values ({:.2} uint8 levels); {} of {} values differ by > 1e-5",
            p.image_size.0, p.image_size.1, g.best_hw, g.resized_hw, p.num_tiles, pad_err, n_pad, res_err, worst_lsb, n_over, want.len()
        );
        assert!(n_pad > 0, "image{k}: expected some padding");
        assert!(pad_err <= 1e-5, "image{k}: padding differs by {pad_err:e}");
        // Pillow 13's bicubic (pass order included) reproduces the fixtures bit for bit, so the
        // no-resize bound holds everywhere (the target for resampled values is 2e-2).
        assert!(res_err <= 1e-5, "image{k}: resampled values differ by {res_err:e}");
        processed.push(p);
    }
    // The batch matches inputs.safetensors (both images stacked, no tile padding needed here).
    let b = batch_images(&processed).unwrap();
    let inp = read("inputs.safetensors");
    let (shape, want) = &inp["pixel_values"];
    assert_eq!(shape, &vec![2, b.max_tiles, 3, b.tile_size, b.tile_size]);
    let sizes: Vec<usize> = inp["image_sizes"].1.iter().map(|&x| x as usize).collect();
    assert_eq!(sizes, b.image_sizes.iter().flat_map(|&(h, w)| [h, w]).collect::<Vec<_>>());
    let err = max_abs(&b.pixel_values, &want.iter().map(|&x| x as f32).collect::<Vec<_>>());
    println!("preprocess batch vs inputs.safetensors pixel_values: max abs err {err:.3e}");
    assert!(err <= 1e-5);
}

/// Images that need no resampling at all: every value must match the plain formula.
#[test]
fn preprocess_exact_without_resize() {
    let pcfg = LlavaPreprocessorConfig::for_model(&fixture_config());
    let mut rng = Rng::new(3);
    for &(h, w) in &[(56usize, 56usize), (112, 56), (112, 112)] {
        let data: Vec<u8> = (0..h * w * 3).map(|_| (rng.next_u64() % 256) as u8).collect();
        let img = RgbImage::new(w, h, data).unwrap();
        let p = process_image(&img, &pcfg).unwrap();
        let g = &p.geometry;
        let s = 56;
        assert_eq!(g.resized_hw, (h, w), "{h}x{w}: no resize expected");
        let norm = |u: u8, c: usize| ((u as f64 / 255.0 - pcfg.image_mean[c] as f64) / pcfg.image_std[c] as f64) as f32;
        let mut err = 0f64;
        for t in 1..p.num_tiles {
            let (ty, tx) = ((t - 1) / g.grid.1, (t - 1) % g.grid.1);
            for c in 0..3 {
                for y in 0..s {
                    for x in 0..s {
                        let (cy, cx) = (ty * s + y, tx * s + x);
                        let (iy, ix) =
                            (cy as isize - g.pad_top_left.0 as isize, cx as isize - g.pad_top_left.1 as isize);
                        let u = if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                            img.at(ix as usize, iy as usize, c)
                        } else {
                            0
                        };
                        let got = p.pixel_values[((t * 3 + c) * s + y) * s + x];
                        err = err.max((got - norm(u, c)).abs() as f64);
                    }
                }
            }
        }
        if (h, w) == (s, s) {
            for c in 0..3 {
                for y in 0..s {
                    for x in 0..s {
                        err = err.max((p.pixel_values[(c * s + y) * s + x] - norm(img.at(x, y, c), c)).abs() as f64);
                    }
                }
            }
        }
        println!(
            "preprocess {h}x{w} (canvas {:?}, {} tiles, no resize): max abs err {err:.3e}",
            g.best_hw, p.num_tiles
        );
        assert!(err <= 1e-5);
    }
    // A file path that does not exist names itself.
    let e = format!("{:#}", process_image_file("/nonexistent/x.png", &pcfg).unwrap_err());
    assert!(e.contains("/nonexistent/x.png"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Token counts and packing.

#[test]
fn token_counts_match_fixture_input_ids() {
    let cfg = fixture_config();
    let inp = read("inputs.safetensors");
    let ids: Vec<i32> = inp["input_ids"].1.iter().map(|&x| x as i32).collect();
    let sizes: Vec<usize> = inp["image_sizes"].1.iter().map(|&x| x as usize).collect();
    let runs = placeholder_runs(&ids, cfg.image_token_index);
    let counts: Vec<usize> = runs.iter().map(|r| r.len()).collect();
    assert_eq!(runs.len() * 2, sizes.len(), "one placeholder run per image");
    for (k, &n) in counts.iter().enumerate() {
        let hw = (sizes[2 * k], sizes[2 * k + 1]);
        let geo = AnyresGeometry::for_config(hw, &cfg).unwrap();
        println!(
            "image{k} {hw:?}: canvas {:?}, grid {:?}, kept rows {:?} cols {:?} -> {} tokens (input_ids hold {n})",
            geo.best_hw,
            geo.grid,
            geo.keep_rows,
            geo.keep_cols,
            geo.num_tokens()
        );
        assert_eq!(geo.num_tokens(), n, "image{k}");
        let v = read("vision_reference.safetensors");
        assert_eq!(v[&format!("image{k}_embeds")].0[0], n, "image{k}: vision_reference rows");
    }
}

#[test]
fn token_counts_match_spec_examples() {
    let pins: Vec<(usize, usize)> = vec![(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)];
    // model-spec B2.
    for &((h, w), want) in &[
        ((808, 1100), 2340),
        ((480, 640), 2340),
        ((640, 480), 2352),
        ((336, 336), 1176),
        ((1080, 1920), 1948),
        ((500, 500), 2928),
        ((300, 1000), 2182),
    ] {
        let n = image_token_count((h, w), &pins, 336, 14).unwrap();
        println!("{h}x{w}: {n} tokens");
        assert_eq!(n, want, "{h}x{w}");
    }
    assert_eq!(select_best_resolution((336, 336), &pins).unwrap(), (336, 672), "first-wins tie");
    // model-spec B6 tiny check: 70x100 with 56-pixel tiles -> canvas 112x112, unpad to 6x8, 70 tokens.
    let tiny: Vec<(usize, usize)> = pins.iter().map(|&(h, w)| (h / 6, w / 6)).collect();
    let g = AnyresGeometry::new((70, 100), &tiny, 56, 14).unwrap();
    assert_eq!((g.best_hw, g.keep_rows.len(), g.keep_cols.len(), g.num_tokens()), ((112, 112), 6, 8, 70));
}

#[test]
fn pack_plan_structure() {
    let pins: Vec<(usize, usize)> = vec![(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)];
    for &(h, w) in &[(808usize, 1100usize), (640, 480), (336, 336), (1080, 1920), (300, 1000), (1000, 300), (37, 2000)]
    {
        let geo = AnyresGeometry::new((h, w), &pins, 336, 14).unwrap();
        let plan = geo.plan();
        let g = geo.g;
        assert_eq!(plan, pack_plan((h, w), geo.best_hw, 336, 24).unwrap());
        assert_eq!(plan.len(), geo.num_tokens());
        assert!(plan[..g * g].iter().enumerate().all(|(i, s)| *s == PackSrc::Base(i)), "base block first, in order");
        let newlines: Vec<usize> =
            plan.iter().enumerate().filter(|(_, s)| **s == PackSrc::Newline).map(|(i, _)| i).collect();
        let row_len = geo.keep_cols.len() + 1;
        assert_eq!(newlines.len(), geo.keep_rows.len());
        assert!(
            newlines.iter().enumerate().all(|(r, &i)| i == g * g + (r + 1) * row_len - 1),
            "a newline closes every row"
        );
        // Tile cells: distinct, in range, row-major over the kept window of the feature grid.
        let idx = gather_index(&plan, g);
        let rows: Vec<i32> = idx.iter().copied().filter(|&r| r >= g as i32 * g as i32).collect();
        assert!(rows.windows(2).all(|p| p[0] != p[1]));
        assert!(rows.iter().all(|&r| (r as usize) < geo.num_tiles() * g * g));
        let mut prev: Option<(usize, usize)> = None;
        for s in &plan[g * g..] {
            if let PackSrc::Tile { tile, row, col } = *s {
                let (gy, gx) = ((tile / geo.grid.1) * g + row, (tile % geo.grid.1) * g + col);
                assert!(geo.keep_rows.contains(&gy) && geo.keep_cols.contains(&gx));
                if let Some(p) = prev {
                    assert!((gy, gx) > p, "row-major order");
                }
                prev = Some((gy, gx));
            }
        }
        // Symmetric crop: the dropped margins differ by at most... zero (both sides drop p).
        let (hc, wc) = (geo.grid.0 * g, geo.grid.1 * g);
        assert_eq!(geo.keep_rows.start, hc - geo.keep_rows.end);
        assert_eq!(geo.keep_cols.start, wc - geo.keep_cols.end);
        println!(
            "pack plan {h}x{w}: canvas {:?}, grid {:?}, kept {}x{} of {hc}x{wc}, {} tokens",
            geo.best_hw,
            geo.grid,
            geo.keep_rows.len(),
            geo.keep_cols.len(),
            plan.len()
        );
    }
    // Invalid canvases are errors, not panics.
    assert!(pack_plan((10, 10), (100, 336), 336, 24).is_err());
    assert!(pack_plan((10, 10), (336, 336), 336, 25).is_err());
    assert!(select_best_resolution((0, 5), &pins).is_err());
}

/// The newline rows of `vision_reference` (the packed features transformers fed the LLM) are
/// exactly where the plan puts `Newline`, and hold `image_newline`.
#[test]
fn pack_plan_newlines_in_vision_reference() {
    let cfg = fixture_config();
    let ck = Checkpoint::open(fixture_dir()).unwrap();
    let newline = ck.get_f32(&resolve(&ck, "image_newline").unwrap(), &[cfg.text.hidden_size]).unwrap();
    let v = read("vision_reference.safetensors");
    let inp = read("inputs.safetensors");
    let sizes: Vec<usize> = inp["image_sizes"].1.iter().map(|&x| x as usize).collect();
    let d = cfg.text.hidden_size;
    for k in 0..sizes.len() / 2 {
        let geo = AnyresGeometry::new(
            (sizes[2 * k], sizes[2 * k + 1]),
            &cfg.image_grid_pinpoints,
            cfg.vision.image_size,
            cfg.vision.patch_size,
        )
        .unwrap();
        let plan = geo.plan();
        let (shape, emb) = &v[&format!("image{k}_embeds")];
        assert_eq!(shape, &vec![plan.len(), d]);
        let mut worst_nl = 0f64;
        for (j, s) in plan.iter().enumerate() {
            let row: Vec<f32> = emb[j * d..(j + 1) * d].iter().map(|&x| x as f32).collect();
            let e = max_abs(&row, &newline);
            if *s == PackSrc::Newline {
                worst_nl = worst_nl.max(e);
            } else {
                assert!(e > 1e-3, "image{k} token {j} ({s:?}) equals image_newline");
            }
        }
        println!("image{k}: {} newline rows match image_newline to {worst_nl:.1e}", geo.keep_rows.len());
        assert!(worst_nl <= 1e-6);
    }
}

// ---------------------------------------------------------------------------------------------
// Chat templates.

fn dialogue() -> Vec<ChatMessage> {
    vec![
        ChatMessage::user(vec![Part::Image(0), Part::Text("What is this?".into())]),
        ChatMessage::assistant("A cat."),
        ChatMessage::user(vec![Part::Text("And this?".into()), Part::Image(1)]),
        ChatMessage::assistant("A dog."),
    ]
}

#[test]
fn template_strings() {
    let q = vec![ChatMessage::user(vec![Part::Image(0), Part::Text("What is shown in this image?".into())])];
    let gen = LlavaChatOptions { add_generation_prompt: true, ..Default::default() };
    // model-spec B2 examples.
    assert_eq!(
        render_chat(TemplateKind::Mistral, &q, &gen).unwrap().text,
        "[INST] <image>\nWhat is shown in this image? [/INST]"
    );
    assert_eq!(
        render_chat(TemplateKind::Vicuna, &q, &gen).unwrap().text,
        "USER: <image>\nWhat is shown in this image? ASSISTANT:"
    );

    let opts = LlavaChatOptions::default();
    let r = render_chat(TemplateKind::Mistral, &dialogue(), &opts).unwrap();
    assert_eq!(
        r.text,
        "[INST] <image>\nWhat is this? [/INST] A cat.</s> [INST] <image>\nAnd this? [/INST] A dog.</s> "
    );
    assert_eq!(r.image_order, vec![0, 1]);
    let tgt: Vec<&str> = r.targets.iter().map(|(_, rg)| &r.text[rg.clone()]).collect();
    assert_eq!(tgt, vec!["A cat.</s>", "A dog.</s>"]);

    let r = render_chat(TemplateKind::Vicuna, &dialogue(), &opts).unwrap();
    assert_eq!(r.text, "USER: <image>\nWhat is this? ASSISTANT: A cat. USER: <image>\nAnd this? ASSISTANT: A dog. ");
    let tgt: Vec<&str> = r.targets.iter().map(|(_, rg)| &r.text[rg.clone()]).collect();
    assert_eq!(tgt, vec!["A cat.", "A dog."]);
    let eos = LlavaChatOptions { vicuna_eos: true, add_generation_prompt: true, ..Default::default() };
    let mut d = dialogue();
    d.push(ChatMessage::user(vec![Part::Image(2), Part::Image(3), Part::Text("Both?".into())]));
    let r = render_chat(TemplateKind::Vicuna, &d, &eos).unwrap();
    assert_eq!(
        r.text,
        "USER: <image>\nWhat is this? ASSISTANT: A cat.</s> USER: <image>\nAnd this? ASSISTANT: A dog.</s> USER: <image>\n<image>\nBoth? ASSISTANT:"
    );
    assert_eq!(r.image_order, vec![0, 1, 2, 3]);

    // System prompts.
    let mut s = vec![ChatMessage::system("Be safe.")];
    s.extend(dialogue().into_iter().take(2));
    assert_eq!(
        render_chat(TemplateKind::Mistral, &s, &opts).unwrap().text,
        "<<SYS>>\nBe safe.\n<</SYS>>\n\n[INST] <image>\nWhat is this? [/INST] A cat.</s> "
    );
    assert_eq!(
        render_chat(TemplateKind::Vicuna, &s, &opts).unwrap().text,
        "Be safe. USER: <image>\nWhat is this? ASSISTANT: A cat. "
    );

    // Roles the templates reject.
    let bad = vec![ChatMessage::new("tool", vec![Part::Text("x".into())])];
    assert!(render_chat(TemplateKind::Mistral, &bad, &opts).is_err());
    assert!(render_chat(TemplateKind::Vicuna, &bad, &opts).is_err());
}

/// A word-level tokenizer with the LLaVA special tokens at the fixture's ids: the fixtures ship
/// no tokenizer, and this exercises the offset-based mask.
fn test_tokenizer() -> Tokenizer {
    llava_word_tokenizer(&[
        "[",
        "INST",
        "]",
        "[/",
        "What",
        "is",
        "this",
        "?",
        "A",
        "cat",
        ".",
        "dog",
        "And",
        "USER",
        "ASSISTANT",
        ":",
        "Be",
        "safe",
    ])
}

#[test]
fn chat_tokens_and_loss_mask() {
    let tok = test_tokenizer();
    let mut cfg = fixture_config();
    let counts = [52usize, 72];
    for (family, want_targets) in [
        (TextFamily::Mistral, vec!["A", "cat", ".", "</s>", "A", "dog", ".", "</s>"]),
        (TextFamily::Llama, vec!["A", "cat", ".", "A", "dog", "."]),
    ] {
        cfg.text.family = family;
        let tmpl = LlavaChatTemplate::new(&tok, &cfg).unwrap();
        let ct = tmpl.encode_chat(&dialogue(), &counts, &LlavaChatOptions::default()).unwrap();
        assert_eq!(ct.ids[0], 1, "BOS first");
        assert_eq!(ct.ids.len(), ct.loss_mask.len());
        assert_eq!(ct.image_tokens, vec![52, 72]);
        let runs = placeholder_runs(&ct.ids, 590);
        assert_eq!(runs.iter().map(|r| r.len()).collect::<Vec<_>>(), vec![52, 72]);
        assert!(runs.iter().all(|r| ct.loss_mask[r.clone()].iter().all(|&m| m == 0)));
        assert!(!ct.ids.contains(&0), "no <unk> in {:?}", ct.ids);
        let targets: Vec<String> = ct
            .ids
            .iter()
            .zip(&ct.loss_mask)
            .filter(|(_, &m)| m == 1)
            .map(|(&i, _)| tok.id_to_token(i as u32).unwrap())
            .collect();
        println!("{family:?}: {} tokens, targets {targets:?}", ct.ids.len());
        assert_eq!(targets, want_targets);
        assert_eq!(ct.assistant_spans.iter().map(|(m, _)| *m).collect::<Vec<_>>(), vec![1, 3]);
        for (_, sp) in &ct.assistant_spans {
            assert!(ct.loss_mask[sp.clone()].iter().all(|&m| m == 1));
        }
    }
    // Vicuna with the EOS option: the `</s>` after each reply is a target.
    cfg.text.family = TextFamily::Llama;
    let opts = LlavaChatOptions { vicuna_eos: true, ..Default::default() };
    let ct = LlavaChatTemplate::new(&tok, &cfg).unwrap().encode_chat(&dialogue(), &counts, &opts).unwrap();
    let n_eos = ct.ids.iter().zip(&ct.loss_mask).filter(|(&i, &m)| i == 2 && m == 1).count();
    assert_eq!(n_eos, 2);

    // Errors: too few counts, a mismatched image id, a literal <image> in the text.
    let tmpl = LlavaChatTemplate::new(&tok, &cfg).unwrap();
    assert!(tmpl.encode_chat(&dialogue(), &[52], &LlavaChatOptions::default()).is_err());
    let mut wrong = cfg.clone();
    wrong.image_token_index = 591;
    assert!(LlavaChatTemplate::new(&tok, &wrong).is_err());
    let lit = vec![ChatMessage::user(vec![Part::Text("see <image> here".into())])];
    assert!(tmpl.encode_chat(&lit, &[], &LlavaChatOptions::default()).is_err());
}
