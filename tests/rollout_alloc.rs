//! The rollout engine's decode step allocates nothing once its step scratch has grown (what a
//! CUDA graph of the step needs), for both families, and the pre-flight's scratch bound holds.
//! One test per binary: the allocation counter is process-wide, so no other test may run
//! beside it.
mod common;
#[path = "support/tiny_llava.rs"]
mod tiny_llava;

use am3safety::data::dataset::{load_jsonl_with, LoadOptions, Purpose};
use am3safety::models::common::step::{StepInput, StepScratch};
use am3safety::ops::sample::SampleParams;
use am3safety::rollout::{generate, DialogueSpec, RolloutConfig};
use am3safety::stages::sft::{load_model, Loaded};
use am3safety::tensor::{allocations, Device};
use std::path::Path;

/// Multi-turn prompt-only dialogues of the demo data, with and without images.
fn dialogues(n: usize) -> Vec<DialogueSpec> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/demo/train.jsonl");
    let loaded = load_jsonl_with(path, LoadOptions { skip_bad: false, purpose: Purpose::Prompts }).unwrap();
    let mut specs: Vec<DialogueSpec> = loaded.samples.iter().map(DialogueSpec::from_sample).collect();
    specs.sort_by_key(|d| std::cmp::Reverse(d.turns.len()));
    specs.truncate(n);
    assert!(specs.iter().any(|d| d.turns.len() > 1), "the demo data has multi-turn dialogues");
    specs
}

fn check_family(dev: &Device, l: &Loaded, what: &str) {
    let specs = dialogues(4);
    // Sampled, so turns end at different steps; 3 slots for 8 rollouts: slots free and refill.
    let cfg = RolloutConfig {
        n: 2,
        max_new_tokens: 12,
        sample: SampleParams::new(1.0, 0, 1.0).unwrap(),
        seed: 5,
        max_batch: 3,
        max_len: None,
    };
    let (rollouts, _, stats) = generate(dev, &l.model, &l.tok, &l.pp, &specs, &cfg, &mut |_, _| {}).unwrap();
    assert_eq!(rollouts.len(), 8, "{what}");
    assert!(stats.decode_s > 0.0 && stats.decode_tokens > stats.steps / 2, "{what}: decode steps ran: {stats:?}");
    assert_eq!(stats.decode_allocations, 0, "{what}: pure decode steps allocated device buffers");
    assert!(stats.padded_steps > 0, "{what}: no decode step ran with a free slot padded: {stats:?}");
    assert!(
        stats.scratch_bytes > 0 && stats.scratch_bytes <= stats.scratch_plan_bytes,
        "{what}: step scratch {} B above the pre-flight's bound {} B",
        stats.scratch_bytes,
        stats.scratch_plan_bytes
    );
    println!(
        "{what}: {} steps ({} padded), {} decode tokens, 0 allocations in decode steps, scratch {} B (bound {} B)",
        stats.steps, stats.padded_steps, stats.decode_tokens, stats.scratch_bytes, stats.scratch_plan_bytes
    );

    // At the model level: a prefill, then decode steps over the same scratch allocate nothing,
    // and the scratch holds exactly what `plan_bytes` predicts for that step shape.
    let m = &l.model;
    let text = l.tok.encode("a b c d e f", false).unwrap().get_ids().iter().map(|&i| i as i32).collect::<Vec<_>>();
    let (b, p) = (2usize, text.len());
    let rows = if matches!(m.net, am3safety::stages::model::Net::Qwen(_)) { 3 } else { 1 };
    let mut cache = m.new_cache(dev, b, p + 8).unwrap();
    let mut sc = StepScratch::default();
    let ids: Vec<i32> = text.iter().chain(&text).copied().collect();
    let pos: Vec<i32> = (0..rows).flat_map(|_| (0..b).flat_map(|_| 0..p as i32)).collect();
    m.step_ragged(
        dev,
        &mut cache,
        &mut sc,
        StepInput { ids: &ids, pos: &pos, cu_new: &[0, p as i32, 2 * p as i32], image_rows: None },
    )
    .unwrap();
    let elem = if dev.is_cuda() { 2 } else { 4 };
    assert_eq!(sc.bytes(), StepScratch::plan_bytes(m.tdims(), elem, 2 * p, b), "{what}: plan_bytes");
    let before = allocations();
    for i in 0..4 {
        let pos1 = vec![(p + i) as i32; rows * b];
        m.step_ragged(
            dev,
            &mut cache,
            &mut sc,
            StepInput { ids: &[text[i], text[i + 1]], pos: &pos1, cu_new: &[0, 1, 2], image_rows: None },
        )
        .unwrap();
    }
    assert_eq!(allocations() - before, 0, "{what}: decode steps allocated");
}

#[test]
fn decode_steps_allocate_nothing() {
    let mut devices = vec![Device::Cpu];
    devices.extend(common::cuda_or_skip("decode_steps_allocate_nothing (GPU part)"));
    for dev in &devices {
        let l = load_model(dev, None, 0).unwrap();
        check_family(dev, &l, &format!("qwen on {}", dev.name()));
        let dir = std::env::temp_dir().join(format!("am3-rollout-alloc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        tiny_llava::write_tiny_dir(&dir, "mistral", 11);
        let l = load_model(dev, Some(&dir), 0).unwrap();
        check_family(dev, &l, &format!("llava on {}", dev.name()));
        std::fs::remove_dir_all(&dir).ok();
    }
}
