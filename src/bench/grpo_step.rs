//! "grpo": whole GRPO steps of the `am3 grpo` stage (`stages::grpo::Trainer`, rules judge),
//! broken into its phases — rollout, judge, old log-probs, reference log-probs, update, and
//! the idle rest (rewards, packing, bookkeeping) — with seconds, tokens/s and peak memory per
//! phase. The tiny shape starts from a freshly written random checkpoint on the bundled
//! `data/demo/grpo.jsonl`; the 7B shapes from a random checkpoint with the synthetic
//! tokenizer on synthetic prompts (three user turns, one image). Two set-ups run: LoRA rank 64
//! at 7B (a full fine-tune elsewhere), then a full fine-tune with the per-layer optimizer step
//! (bf16 gradients at 7B: f32 master, AdamW and the reference beside whole-model gradients would
//! not fit one card), its figures prefixed "full fine-tune, per-layer step: ".

use super::measure::{memory_source, peak_in, MemWatch};
use super::report::Figure;
use super::shape::grad_refs;
use super::synth;
use super::workloads::{gib, Ctx};
use crate::data::dataset::{load_jsonl_with, LoadOptions, Purpose};
use crate::grpo::memory::{MemoryInput, MemoryPlan};
use crate::rollout::engine::cache_plan;
use crate::rollout::DialogueSpec;
use crate::stages::grpo::{demo_prompts, GrpoArgs, Trainer};
use anyhow::{anyhow, Result};
use std::time::Instant;

const B_EASYR1: &str = "EasyR1 GRPO, Qwen2.5-VL-7B, 8×H100, per GPU (issue #14; full fine-tune sharded over 8 cards, not this bench's one-card set-up)";

/// One set-up of the step: LoRA (the 7B default: one card holds it with room to spare) or a
/// full fine-tune, with the whole-model or the per-layer optimizer step.
struct Variant {
    /// Prefix of the figure names ("" for the first variant, so runs compare by name).
    prefix: &'static str,
    lora_rank: Option<usize>,
    per_layer: bool,
}

pub fn suite(c: &Ctx) -> Result<Vec<Figure>> {
    let big = c.skeleton.param_entries().iter().map(|(r, _)| r.numel()).sum::<usize>() > 1_000_000_000;
    // At 7B: LoRA, then the full fine-tune with bf16 gradients and the per-layer step (issue #13's
    // one-card step: whole-model gradients would not fit beside AdamW and the reference).
    let first = Variant { prefix: "", lora_rank: big.then_some(64), per_layer: false };
    let full = Variant { prefix: "full fine-tune, per-layer step: ", lora_rank: None, per_layer: true };
    let dir = c.subject.model_dir(c.dev, c.tmp, 0)?;
    let mut out = Vec::new();
    for v in [first, full] {
        match variant(c, &v, big, &dir) {
            Ok(f) => out.extend(f),
            Err(e) if !v.prefix.is_empty() => c.fail(&format!("grpo/{}", v.prefix.trim_end_matches(": ")), e),
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

fn variant(c: &Ctx, v: &Variant, big: bool, dir: &std::path::Path) -> Result<Vec<Figure>> {
    let (dev, set) = (c.dev, c.set);
    let data = if c.subject.is_tiny() {
        demo_prompts()
    } else {
        synth::write_prompts(c.tmp, 2 * set.grpo_dialogues, set.grpo_turns, set.grpo_image_side)?
    };
    let args = GrpoArgs {
        model: Some(dir.to_path_buf()),
        data: Some(data.clone()),
        judge: Some("rules".into()),
        steps: Some((set.warmup + set.grpo_steps) as u64),
        dialogues_per_step: Some(set.grpo_dialogues),
        n: Some(set.grpo_n),
        max_new_tokens: Some(set.grpo_max_new),
        // Every group trains, so the log-prob and update phases run every step.
        skip_flat: Some(false),
        recompute: Some(big),
        lora_rank: v.lora_rank,
        // The per-layer step takes no global clip (the norm of all gradients never exists).
        clip: v.per_layer.then_some(0.0),
        grad_dtype: (v.per_layer && big).then(|| "bf16".to_string()),
        optim_step: v.per_layer.then(|| "per-layer".to_string()),
        seed: Some(0),
        ..Default::default()
    };
    let (_, plan, jcfg) = args.resolve()?;
    let mut tr = Trainer::new(dev, plan.clone(), dir, &data, &jcfg)?;

    // The stage's own memory plan (as Trainer::new prints it), for the peak check.
    let loaded = load_jsonl_with(&data, LoadOptions { skip_bad: false, purpose: Purpose::Prompts })?;
    let specs: Vec<DialogueSpec> = loaded.samples.iter().map(DialogueSpec::from_sample).collect();
    let slots = plan.max_batch.min(plan.dialogues_per_step * plan.n).max(plan.n);
    let (max_len, kv) = cache_plan(dev, &tr.l.model, &tr.l.tok, &tr.l.pp, &specs, slots, plan.max_new_tokens)?;
    let trainable: usize = if plan.lora_rank > 0 {
        tr.l.model.trainable_entries().iter().map(|(r, _)| r.numel()).sum()
    } else {
        grad_refs(&tr.l.model).iter().map(|r| r.numel()).sum()
    };
    let mem = MemoryPlan::new(
        dev,
        &tr.l.model,
        MemoryInput {
            trainable,
            reference: plan.beta_kl > 0.0 && plan.lora_rank == 0,
            kv_cache: kv,
            batch_tokens: plan.batch_tokens.max(max_len),
            recompute: plan.recompute,
            store: tr.l.model.grad_store(),
        },
    );
    let mem = if plan.per_layer() { mem.per_layer(dev, &tr.l.model) } else { mem };

    let phases = ["rollout", "judge", "old log-probs", "reference log-probs", "update"];
    let (mut secs, mut rates, mut peaks) =
        (vec![Vec::new(); phases.len()], vec![Vec::new(); phases.len()], vec![Vec::new(); phases.len()]);
    let (mut idle, mut step_s, mut step_tps, mut gen_tps, mut step_peak) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for step in 0..set.warmup + set.grpo_steps {
        let w = MemWatch::start(dev);
        let t0 = Instant::now();
        let rep = tr.step(dev, step as u64);
        let wall = t0.elapsed().as_secs_f64();
        let samples = w.finish();
        let j = rep?.json;
        if step < set.warmup {
            continue;
        }
        let get = |k: &str| j.get(k).and_then(|v| v.as_f64()).ok_or_else(|| anyhow!("GRPO step metrics have no {k}"));
        let (r, jd, o, f, u, s) = (
            get("rollout_s")?,
            get("judge_s")?,
            get("old_logp_s")?,
            get("ref_logp_s")?,
            get("update_s")?,
            get("step_s")?,
        );
        let generated = get("rollout_tokens_per_s")? * r;
        let train_tokens = get("train_tokens")?;
        // Phases run in this order; the old/ref/update spans end where the step does.
        let windows = [(0.0, r), (r, r + jd), (s - u - f - o, s - u - f), (s - u - f, s - u), (s - u, s)];
        let work = [generated, generated, train_tokens, train_tokens, train_tokens * plan.ppo_epochs as f64];
        for (k, (&(a, b), &tokens)) in windows.iter().zip(&work).enumerate() {
            let t = b - a;
            secs[k].push(t);
            rates[k].push(tokens / t.max(1e-9));
            peaks[k].push(gib(peak_in(&samples, a, b)));
        }
        idle.push(wall - (r + jd + o + f + u));
        step_s.push(wall);
        step_tps.push(train_tokens / wall);
        gen_tps.push(generated / wall);
        step_peak.push(gib(super::measure::peak(&samples)));
    }
    let what = format!(
        "{} dialogues × {} rollouts, ≤{} new tokens per turn, {}",
        plan.dialogues_per_step,
        plan.n,
        plan.max_new_tokens,
        if plan.lora_rank > 0 {
            format!("LoRA rank {}", plan.lora_rank)
        } else {
            format!("full fine-tune, {} gradients, {} optimizer step", plan.grad_dtype, plan.optim_step)
        }
    );
    let mut out = Vec::new();
    for (k, p) in phases.iter().enumerate() {
        out.push(Figure::of("grpo", &format!("{}{p}: s", v.prefix), "s", &secs[k]).note(what.clone()));
        let unit_note = match k {
            0 => "generated tokens per second",
            1 => "generated tokens judged per second",
            4 => "prompt + response tokens × PPO epochs per second",
            _ => "prompt + response tokens per second",
        };
        out.push(Figure::of("grpo", &format!("{}{p}: tok/s", v.prefix), "tok/s", &rates[k]).note(unit_note));
        out.push(
            Figure::of("grpo", &format!("{}{p}: peak memory", v.prefix), "GiB", &peaks[k]).note(memory_source(dev)),
        );
    }
    out.push(
        Figure::of("grpo", &format!("{}idle: s", v.prefix), "s", &idle)
            .note("rewards, packing and bookkeeping between the phases"),
    );
    out.push(Figure::of("grpo", &format!("{}step: s", v.prefix), "s", &step_s).note(what));
    let base = c.baseline(true, 1300.0, "1,200–1,400", B_EASYR1);
    out.push(
        Figure::of("grpo", &format!("{}step: tok/s", v.prefix), "tok/s", &step_tps)
            .with_baseline(base)
            .note("prompt + response tokens of all rollouts per second of the whole step (EasyR1's throughput)"),
    );
    out.push(Figure::of("grpo", &format!("{}step: generated tok/s", v.prefix), "tok/s", &gen_tps));
    out.push(
        Figure::of("grpo", &format!("{}step: peak memory", v.prefix), "GiB", &step_peak)
            .note(format!("the stage's plan: {}", mem.describe())),
    );
    let measured = step_peak.iter().fold(0.0f64, |a, &b| a.max(b));
    if v.prefix.is_empty() {
        c.measured.borrow_mut().grpo_peak = Some((mem.peak(), (measured * (1u64 << 30) as f64) as u64));
    }
    Ok(out)
}
