//! Qwen2.5-VL config against the transformers fixtures (../shared/fixtures/qwen2_5_vl_tiny, or
//! $AM3_FIXTURES): both layouts (flat and nested `text_config`) and a round trip, errors naming
//! the field and the file, `preprocessor_config.json` layouts.
mod common;

use am3safety::models::qwen2_5_vl::config::{QwenPreprocessorConfig, QwenVlConfig};
use serde_json::{json, Value};
use std::path::Path;

#[path = "support/qwen_data.rs"]
mod qwen_data_support;
use qwen_data_support::*;

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
