//! LLaVA-NeXT `config.json` against the transformers fixtures (`../shared/fixtures/llava_next_tiny`,
//! or $AM3_LLAVA_FIXTURES / $AM3_FIXTURES): the fixture's config and a round trip, the published
//! llava-hf configs with their class defaults, errors naming the field and the file, and the
//! checkpoint's weight names in every layout transformers writes.

mod common;
use common::*;
#[path = "support/fixture_tokenizers.rs"]
mod fixture_tokenizers;

use am3safety::checkpoint::{save_sharded, Checkpoint, SaveDtype};
use am3safety::models::llava_next::config::{
    canonical_name, check_weights, resolve, spellings, weight_shapes, LlavaNextConfig, LlavaPreprocessorConfig,
    TextFamily,
};
use serde_json::{json, Value};

#[path = "support/llava_data.rs"]
mod llava_data_support;
use llava_data_support::*;

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

    let p = LlavaPreprocessorConfig::load(llava_fixtures(), &c).unwrap();
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
    let ck = Checkpoint::open(llava_fixtures()).unwrap();
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
    let fx = llava_fixtures();
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
