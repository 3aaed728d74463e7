//! The rollout engine on the CPU (f32): greedy multi-turn generation of a batch of dialogues of
//! different lengths and turn counts, with continuous batching (fewer slots than rollouts),
//! gives exactly the tokens that a full forward (no cache) over each rollout's own sequence
//! picks at every generated position — for both families; a shared-prefix copy decodes like a
//! prefill of its own; seeded sampling does not depend on the batch; bad input is an error
//! naming the dialogue.
mod common;
#[path = "support/tiny_llava.rs"]
mod tiny_llava;

use am3safety::data::dataset::{load_jsonl_with, LoadOptions, Purpose};
use am3safety::models::common::step::{StepInput, StepScratch};
use am3safety::models::qwen2_5_vl::chat::Part;
use am3safety::models::qwen2_5_vl::model::Recompute;
use am3safety::ops::sample::SampleParams;
use am3safety::rollout::{generate, DialogueSpec, ImageBank, Rollout, RolloutConfig};
use am3safety::stages::examples::pack;
use am3safety::stages::model::VlModel;
use am3safety::stages::sft::{load_model, Loaded};
use am3safety::tensor::Device;
use std::path::{Path, PathBuf};

fn demo(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/demo").join(file)
}

/// Dialogues of 1 and 2 turns, with and without images, of different lengths.
fn dialogues(n: usize) -> Vec<DialogueSpec> {
    let loaded =
        load_jsonl_with(demo("train.jsonl"), LoadOptions { skip_bad: false, purpose: Purpose::Prompts }).unwrap();
    let mut specs: Vec<DialogueSpec> = loaded.samples.iter().map(DialogueSpec::from_sample).collect();
    // Mix turn counts: alternate one- and two-turn dialogues.
    specs.sort_by_key(|d| d.turns.len());
    let (one, two): (Vec<_>, Vec<_>) = specs.into_iter().partition(|d| d.turns.len() == 1);
    assert!(!two.is_empty(), "the demo data has two-turn dialogues");
    one.into_iter().zip(two).flat_map(|(a, b)| [a, b]).take(n).collect()
}

fn greedy(n: usize, max_new: usize, max_batch: usize) -> RolloutConfig {
    RolloutConfig { n, max_new_tokens: max_new, sample: SampleParams::greedy(), seed: 7, max_batch, max_len: None }
}

/// Argmax of a full forward over each rollout's sequence equals every generated token.
fn check_against_full_forward(
    dev: &Device, model: &VlModel, bank: &mut ImageBank, rollouts: &[Rollout], stop: &[i32], max_new: usize,
) {
    let v = model.tdims().vocab;
    for r in rollouts {
        let ex = r.example(model, bank, "check").unwrap();
        let p = pack(&[&ex]);
        let f = model.forward(dev, &p, &Recompute::default()).unwrap();
        let logits = dev.to_vec(&model.logits(dev, &f).unwrap()).unwrap();
        for (ti, t) in r.turns.iter().enumerate() {
            assert!(!t.ids.is_empty() && t.ids.len() <= max_new);
            assert_eq!(
                t.stopped,
                stop.contains(t.ids.last().unwrap()),
                "rollout {}/{} turn {ti}: stop flag",
                r.dialogue,
                r.index
            );
            assert_eq!(t.cut, !t.stopped && t.ids.len() == max_new);
            assert_eq!(&r.seq[t.span.clone()], &t.ids[..]);
            for p in t.span.clone() {
                let row = &logits[(p - 1) * v..p * v];
                let best = row
                    .iter()
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |b, (j, &x)| if x > b.1 { (j, x) } else { b })
                    .0;
                assert_eq!(
                    best as i32, r.seq[p],
                    "rollout {}/{} turn {ti}: token at {p} is not the full forward's argmax",
                    r.dialogue, r.index
                );
            }
        }
    }
}

fn run_family(l: &Loaded, stop: &[i32]) {
    let dev = Device::Cpu;
    let specs = dialogues(6);
    let (max_new, n) = (10, 2);
    // 3 slots for 12 rollouts: dialogues are admitted as slots free up.
    let (batched, mut bank, stats) =
        generate(&dev, &l.model, &l.tok, &l.pp, &specs, &greedy(n, max_new, 3), &mut |_, _| {}).unwrap();
    assert_eq!(batched.len(), specs.len() * n);
    assert_eq!(stats.slots, 3);
    assert!(stats.steps > 0 && stats.decode_tokens == batched.iter().map(|r| r.generated_tokens()).sum::<usize>());
    for r in &batched {
        assert_eq!(r.turns.len(), specs[r.dialogue].turns.len(), "every user turn gets an answer");
    }
    check_against_full_forward(&dev, &l.model, &mut bank, &batched, stop, max_new);
    // Each dialogue alone (one slot per rollout) gives the same sequences.
    for (di, d) in specs.iter().enumerate() {
        let (alone, _, _) =
            generate(&dev, &l.model, &l.tok, &l.pp, std::slice::from_ref(d), &greedy(n, max_new, n), &mut |_, _| {})
                .unwrap();
        for (a, b) in alone.iter().zip(batched.iter().filter(|r| r.dialogue == di)) {
            assert_eq!(a.seq, b.seq, "dialogue {di}: batched and alone differ");
        }
    }
}

#[test]
fn qwen_greedy_continuous_batching_equals_full_forward() {
    let l = load_model(&Device::Cpu, None, 0).unwrap();
    let stop =
        vec![l.tok.token_to_id("<|im_end|>").unwrap() as i32, l.tok.token_to_id("<|endoftext|>").unwrap() as i32];
    run_family(&l, &stop);
}

#[test]
fn llava_greedy_continuous_batching_equals_full_forward() {
    for family in ["mistral", "llama"] {
        let dir = std::env::temp_dir().join(format!("am3-rollout-llava-{family}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        tiny_llava::write_tiny_dir(&dir, family, 11);
        let l = load_model(&Device::Cpu, Some(&dir), 0).unwrap();
        let stop = vec![l.tok.token_to_id("</s>").unwrap() as i32];
        run_family(&l, &stop);
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn shared_prefix_copy_decodes_like_its_own_prefill() {
    let dev = Device::Cpu;
    let l = load_model(&dev, None, 0).unwrap();
    let spec = &dialogues(2)[0];
    // The engine with N = 3 shares the prefix; N = 1 prefills it alone: the first sampled
    // tokens' log-probs (from the first decode step's logits) must agree exactly.
    let cfg = |n| RolloutConfig {
        n,
        max_new_tokens: 4,
        sample: SampleParams::new(1.0, 0, 1.0).unwrap(),
        seed: 3,
        max_batch: n,
        max_len: None,
    };
    let (shared, _, _) =
        generate(&dev, &l.model, &l.tok, &l.pp, std::slice::from_ref(spec), &cfg(3), &mut |_, _| {}).unwrap();
    let (alone, _, _) =
        generate(&dev, &l.model, &l.tok, &l.pp, std::slice::from_ref(spec), &cfg(1), &mut |_, _| {}).unwrap();
    assert_eq!(shared[0].turns[0].ids, alone[0].turns[0].ids);
    assert_eq!(shared[0].turns[0].logps, alone[0].turns[0].logps);
    // And at the model level: copy slot 0's prefix into slot 1, then one decode step in both.
    let m = &l.model;
    let (rollouts, bank, _) =
        generate(&dev, m, &l.tok, &l.pp, std::slice::from_ref(spec), &cfg(1), &mut |_, _| {}).unwrap();
    let r = &rollouts[0];
    let prompt = r.turns[0].span.start;
    let mut bank = bank;
    let ex = r.example(m, &mut bank, "p").unwrap();
    let d = m.tdims().layer.d;
    let k = spec.turns[0].iter().filter(|p| matches!(p, Part::Image(_))).count();
    bank.ensure_embeds(&dev, m, &r.images[..k]).unwrap();
    let rows = bank.rows_for(&dev, &r.images[..k], d).unwrap();
    let pos_all = &ex.pos3;
    let s = ex.ids.len();
    let take_pos = |a: usize, b: usize| -> Vec<i32> {
        (0..3).flat_map(|row| pos_all[row * s + a..row * s + b].to_vec()).collect()
    };
    let mut two = m.new_cache(&dev, 2, prompt + 4).unwrap();
    let mut sc = StepScratch::default();
    m.step_ragged(
        &dev,
        &mut two,
        &mut sc,
        StepInput {
            ids: &ex.ids[..prompt],
            pos: &take_pos(0, prompt),
            cu_new: &[0, prompt as i32, prompt as i32],
            image_rows: rows.as_ref(),
        },
    )
    .unwrap();
    two.copy_prefix(&dev, 0, 1, prompt).unwrap();
    let tok = [ex.ids[prompt], ex.ids[prompt]];
    let p1 = take_pos(prompt, prompt + 1);
    let pos2: Vec<i32> = (0..3).flat_map(|row| [p1[row], p1[row]]).collect();
    let both = dev
        .to_vec(
            m.step_ragged(
                &dev,
                &mut two,
                &mut sc,
                StepInput { ids: &tok, pos: &pos2, cu_new: &[0, 1, 2], image_rows: None },
            )
            .unwrap(),
        )
        .unwrap();
    let mut one = m.new_cache(&dev, 1, prompt + 4).unwrap();
    let mut sc1 = StepScratch::default();
    m.step_ragged(
        &dev,
        &mut one,
        &mut sc1,
        StepInput {
            ids: &ex.ids[..prompt],
            pos: &take_pos(0, prompt),
            cu_new: &[0, prompt as i32],
            image_rows: rows.as_ref(),
        },
    )
    .unwrap();
    let own = dev
        .to_vec(
            m.step_ragged(
                &dev,
                &mut one,
                &mut sc1,
                StepInput { ids: &tok[..1], pos: &p1, cu_new: &[0, 1], image_rows: None },
            )
            .unwrap(),
        )
        .unwrap();
    let v = m.tdims().vocab;
    assert_eq!(&both[..v], &own[..], "slot 0");
    assert_eq!(&both[v..], &own[..], "slot 1 (copied prefix)");
}

#[test]
fn seeded_sampling_does_not_depend_on_the_batch() {
    let dev = Device::Cpu;
    let l = load_model(&dev, None, 0).unwrap();
    let specs = dialogues(4);
    let cfg = |max_batch| RolloutConfig {
        n: 3,
        max_new_tokens: 8,
        sample: SampleParams::new(1.0, 20, 0.95).unwrap(),
        seed: 42,
        max_batch,
        max_len: None,
    };
    let (a, _, _) = generate(&dev, &l.model, &l.tok, &l.pp, &specs, &cfg(3), &mut |_, _| {}).unwrap();
    let (b, _, _) = generate(&dev, &l.model, &l.tok, &l.pp, &specs, &cfg(12), &mut |_, _| {}).unwrap();
    let (c, _, _) = generate(&dev, &l.model, &l.tok, &l.pp, &specs[1..2], &cfg(3), &mut |_, _| {}).unwrap();
    assert_eq!(a, b, "3 slots vs 12 slots");
    let a1: Vec<_> = a.iter().filter(|r| r.dialogue == 1).map(|r| r.seq.clone()).collect();
    let c1: Vec<_> = c.iter().map(|r| r.seq.clone()).collect();
    assert_eq!(a1, c1, "a dialogue alone samples what it samples in a batch");
    // The N rollouts of a dialogue draw from different streams.
    assert!(a.iter().filter(|r| r.dialogue == 0).map(|r| &r.seq).collect::<std::collections::BTreeSet<_>>().len() > 1);
}

#[test]
fn too_long_dialogue_and_bad_image_are_errors_naming_the_dialogue() {
    let dev = Device::Cpu;
    let l = load_model(&dev, None, 0).unwrap();
    let specs = dialogues(2);
    let cfg = RolloutConfig {
        n: 2,
        max_new_tokens: 16,
        sample: SampleParams::greedy(),
        seed: 0,
        max_batch: 4,
        max_len: Some(20),
    };
    let err = format!("{:#}", generate(&dev, &l.model, &l.tok, &l.pp, &specs, &cfg, &mut |_, _| {}).unwrap_err());
    assert!(err.contains(&specs[0].id) && err.contains("max_len 20"), "{err}");
    let mut long = specs[0].clone();
    long.turns[0].push(Part::Text("a b c d e f g h ".repeat(2000)));
    let err = format!(
        "{:#}",
        generate(&dev, &l.model, &l.tok, &l.pp, &[long], &greedy(1, 4, 1), &mut |_, _| {}).unwrap_err()
    );
    assert!(err.contains("max_position_embeddings"), "{err}");
    let mut bad = specs[0].clone();
    bad.images = vec![demo("does-not-exist.png")];
    bad.turns[0] = vec![Part::Image(0), Part::Text("What is this?".into())];
    let err = format!(
        "{:#}",
        generate(&dev, &l.model, &l.tok, &l.pp, &[bad.clone()], &greedy(1, 4, 1), &mut |_, _| {}).unwrap_err()
    );
    assert!(err.contains(&bad.id) && err.contains("does-not-exist.png"), "{err}");
    // A truncated PNG: its header gives the size, its pixels fail when the tower needs them,
    // and the error still names the file and the dialogue.
    let png = std::fs::read_dir(demo("images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "png"))
        .unwrap();
    let cut = std::env::temp_dir().join(format!("am3-rollout-truncated-{}.png", std::process::id()));
    std::fs::write(&cut, &std::fs::read(&png).unwrap()[..60]).unwrap();
    bad.images = vec![cut.clone()];
    let err = format!(
        "{:#}",
        generate(&dev, &l.model, &l.tok, &l.pp, &[bad.clone()], &greedy(1, 4, 1), &mut |_, _| {}).unwrap_err()
    );
    assert!(err.contains(&bad.id) && err.contains("truncated"), "{err}");
    std::fs::remove_file(cut).ok();
}

/// On a GPU (bf16): greedy rollouts over a short horizon equal the full forward's argmax at
/// every generated position whose top-2 logit margin is clear of bf16 rounding.
#[test]
fn cuda_greedy_equals_full_forward_where_margins_are_clear() {
    let Some(dev) = common::cuda_or_skip("cuda_greedy_equals_full_forward_where_margins_are_clear") else { return };
    let l = load_model(&dev, None, 0).unwrap();
    let specs = dialogues(6);
    let (rollouts, mut bank, stats) =
        generate(&dev, &l.model, &l.tok, &l.pp, &specs, &greedy(2, 4, 3), &mut |_, _| {}).unwrap();
    println!("cuda rollouts: {stats:?}");
    let v = l.model.tdims().vocab;
    let (mut checked, mut close) = (0, 0);
    for r in &rollouts {
        let ex = r.example(&l.model, &mut bank, "gpu").unwrap();
        let p = pack(&[&ex]);
        let f = l.model.forward(&dev, &p, &Recompute::default()).unwrap();
        let logits = dev.to_vec(&l.model.logits(&dev, &f).unwrap()).unwrap();
        for t in &r.turns {
            for pos in t.span.clone() {
                let row = &logits[(pos - 1) * v..pos * v];
                let mut idx: Vec<usize> = (0..v).collect();
                idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                if row[idx[0]] - row[idx[1]] < 0.05 * row[idx[0]].abs().max(1.0) {
                    close += 1;
                    continue;
                }
                checked += 1;
                assert_eq!(idx[0] as i32, r.seq[pos], "rollout {}/{}: token at {pos}", r.dialogue, r.index);
            }
        }
    }
    println!("cuda greedy: {checked} tokens checked, {close} with margins inside bf16 rounding skipped");
    assert!(checked > close, "too few clear margins to test");
}
