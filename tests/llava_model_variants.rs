//! The LLaVA-NeXT fixture checks on other checkpoints: copies of the fixture in the other key
//! layouts transformers writes (`vision_tower.vision_model.*`, `vision_tower.*`, `model.*`;
//! `common/fixture_variant.rs`), and a synthetic checkpoint in the fixtures' format written from a
//! random model.
mod common;
#[path = "common/fixture_variant.rs"]
mod fixture_variant;
use am3safety::models::llava_next::config::{LlavaNextConfig, TextFamily};
use am3safety::tensor::{DType, Device};
use common::*;
use std::path::Path;

#[path = "support/llava_model.rs"]
mod llava_model_support;
use llava_model_support::*;

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
        check_image_embeds(&fx, &Device::Cpu, &fx.model(&Device::Cpu, DType::F32), Tol::FixtureEmbeds.value(), &tag);
        cpu_matches_transformers(&fx, &tag);
        fixture_kv_cache_check_in(&fx, &Device::Cpu, DType::F32, Tol::KvCache.value(), &tag);
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
    check_image_embeds(&fx, &Device::Cpu, &fx.model(&Device::Cpu, DType::F32), Tol::CpuSelf.value(), tag);
    cpu_matches_transformers(&fx, tag);
    fixture_kv_cache_check_in(&fx, &Device::Cpu, DType::F32, Tol::KvCache.value(), tag);
    feature_layers_and_input_errors(&fx);
    let _ = std::fs::remove_dir_all(&root);
}
