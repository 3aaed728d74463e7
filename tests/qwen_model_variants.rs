//! The Qwen2.5-VL fixture checks on other checkpoints: copies of the fixture in the other layouts
//! transformers writes (`common/fixture_variant.rs`), and a synthetic checkpoint in the fixtures'
//! format written from a random model.
mod common;
#[path = "common/fixture_variant.rs"]
mod fixture_variant;
use am3safety::tensor::{DType, Device};
use common::*;
use std::path::Path;

#[path = "support/qwen_model.rs"]
mod qwen_model_support;
use qwen_model_support::*;

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
        check_vision_embeds(&fx, &Device::Cpu, &fx.model(&Device::Cpu, DType::F32), Tol::FixtureEmbeds.value(), &tag);
        cpu_matches_transformers(&fx, &tag);
        fixture_kv_cache_check_in(&fx, &Device::Cpu, DType::F32, Tol::KvCache.value(), &tag);
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
    check_vision_embeds(&fx, &Device::Cpu, &fx.model(&Device::Cpu, DType::F32), Tol::CpuSelf.value(), tag);
    cpu_matches_transformers(&fx, tag);
    fixture_kv_cache_check_in(&fx, &Device::Cpu, DType::F32, Tol::KvCache.value(), tag);
    let _ = std::fs::remove_dir_all(&root);
}
