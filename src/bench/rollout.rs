//! "rollout": the rollout engine's decode step: one ragged step (every slot one new token)
//! through the KV caches, the lm_head of the last rows and the device sampler, at batch 1, 8,
//! 32, 64 and 128 over `ctx` cached tokens per slot. The floor of a step is reading the decoder
//! weights once plus every slot's cached keys and values (at 4.2 TB/s on the H200);
//! transformers `generate` on the same card: 14.7 tokens/s at batch 1, 445 at batch 32.
//!
//! Then one GRPO-shaped call of the engine itself (`grpo_call`: dialogues × N rollouts × turns
//! × new tokens, one image in turn 1, sampled at T = 1): total, prefill and decode tokens/s and
//! peak memory.
//!
//! `decode` runs on any device and model (the workload suite, `--shape`); `run` is the kernel
//! suite's form on the 7B-shaped Qwen2.5-VL (GPU only).

use super::measure::{memory_source, time_runs, MemWatch};
use super::report::{Baseline, Figure};
use super::shape::act_bytes;
use super::synth;
use super::train7b::random_7b;
use super::workloads::{gib, text_ids, Ctx};
use super::{BenchRow, HBM_BYTES_PER_S};
use crate::data::dataset::{load_jsonl_with, LoadOptions, Purpose};
use crate::models::common::step::{StepInput, StepScratch};
use crate::ops::sample::{stream_key, SampleParams, Sampler};
use crate::rollout::{generate, DialogueSpec, RolloutConfig};
use crate::stages::model::{Net, VlModel};
use crate::stages::sft::Loaded;
use crate::tensor::Device;
use anyhow::Result;

/// One batch size's decode steps.
pub struct DecodeCase {
    pub batch: usize,
    pub ctx: usize,
    /// Seconds per step.
    pub secs: Vec<f64>,
    /// Decoder weights read per step (embedding rows aside).
    pub weight_bytes: f64,
    /// Cached keys and values read per step, averaged over the timed steps.
    pub kv_bytes: f64,
    /// Bytes of the allocated cache.
    pub cache_bytes: usize,
    pub peak: u64,
}

/// Weights a decode step reads: every decoder matrix and norm, the lm_head, one embedding row
/// per slot (the vision tower and projector do not run).
pub fn decode_weight_bytes(dev: &Device, m: &VlModel, batch: usize) -> f64 {
    let t = m.tdims();
    let elem = act_bytes(dev);
    let body: usize = m
        .param_entries()
        .iter()
        .filter(|(r, _)| {
            !m.is_vision(&r.name)
                && !r.name.contains("embed_tokens")
                && !r.name.contains("multi_modal_projector")
                && r.name != "image_newline"
        })
        .map(|(r, _)| r.numel())
        .sum();
    let head = if t.tied { t.vocab * t.layer.d } else { 0 };
    ((body + head + batch * t.layer.d) * elem) as f64
}

/// Decode steps at each batch size: prefill `ctx` tokens per slot, then `warmup` + `iters`
/// sampled steps at temperature 1.
pub fn decode(
    dev: &Device, m: &VlModel, batches: &[usize], ctx: usize, warmup: usize, iters: usize,
) -> Result<Vec<Result<DecodeCase>>> {
    let t = m.tdims().clone();
    let rows = if matches!(m.net, Net::Qwen(_)) { 3 } else { 1 };
    let elem = act_bytes(dev);
    let mut out = Vec::new();
    for &b in batches {
        let case = (|| -> Result<DecodeCase> {
            let max_len = ctx + warmup + iters + 1;
            let mut cache = m.new_cache(dev, b, max_len)?;
            let cache_bytes: usize =
                cache.layers.iter().map(|c| c.k.len() * c.k.dtype().size() + c.v.len() * c.v.dtype().size()).sum();
            let ids = text_ids(m, b * ctx, b as u64);
            let pos: Vec<i32> = (0..rows).flat_map(|_| (0..b).flat_map(|_| 0..ctx as i32)).collect();
            let cu: Vec<i32> = (0..=b).map(|i| (i * ctx) as i32).collect();
            let mut scratch = StepScratch::default();
            m.step_ragged(
                dev,
                &mut cache,
                &mut scratch,
                StepInput { ids: &ids, pos: &pos, cu_new: &cu, image_rows: None },
            )?;
            let mut sampler = Sampler::new(dev, b, t.vocab)?;
            let params = vec![SampleParams::new(1.0, 0, 1.0)?; b];
            let (first, limit) = (text_ids(m, 1, 0)[0], text_limit(m));
            let mut step = 0u64;
            let mut tok: Vec<i32> = vec![first; b];
            let cu1: Vec<i32> = (0..=b as i32).collect();
            let watch = MemWatch::start(dev);
            let secs = time_runs(dev, warmup, iters, &mut || {
                let p = ctx as i32 + step as i32;
                let pos1: Vec<i32> = vec![p; rows * b];
                let logits = m.step_ragged(
                    dev,
                    &mut cache,
                    &mut scratch,
                    StepInput { ids: &tok, pos: &pos1, cu_new: &cu1, image_rows: None },
                )?;
                let keys: Vec<u64> = (0..b).map(|i| stream_key(0, 0, i as u64, step)).collect();
                let drawn = sampler.sample(dev, logits, b, &params, &keys)?;
                // A sampled placeholder id would need an image: feed ordinary text instead.
                tok = drawn.iter().map(|d| if d.token < limit { d.token } else { first }).collect();
                step += 1;
                Ok(())
            });
            let peak = super::measure::peak(&watch.finish());
            let secs = secs?;
            // Step i reads ctx + i + 1 cached rows per slot.
            let mean_len = ctx as f64 + warmup as f64 + (iters as f64 - 1.0) / 2.0 + 1.0;
            let kv_bytes =
                2.0 * t.n_layers as f64 * b as f64 * mean_len * (t.layer.kv_heads * t.layer.head_dim * elem) as f64;
            Ok(DecodeCase {
                batch: b,
                ctx,
                secs,
                weight_bytes: decode_weight_bytes(dev, m, b),
                kv_bytes,
                cache_bytes,
                peak,
            })
        })();
        out.push(case);
    }
    Ok(out)
}

/// The first placeholder id (ids at or above it are not fed back as text).
fn text_limit(m: &VlModel) -> i32 {
    match &m.net {
        Net::Qwen(q) => (q.cfg.image_token_id.min(q.cfg.video_token_id) as usize).min(m.tdims().vocab) as i32,
        Net::Llava(l) => (l.cfg.image_token_index as usize).min(m.tdims().vocab) as i32,
    }
}

const B_GEN: &str = "transformers generate, Qwen2.5-VL-7B, H200 (issue #14)";

/// The workload suite: decode figures with the floor's bytes counted.
pub fn suite(c: &Ctx) -> Result<Vec<Figure>> {
    let (dev, set) = (c.dev, c.set);
    let l = c.subject.load(dev, 0)?;
    let mut out = Vec::new();
    let cases = decode(dev, &l.model, &set.decode_batches, set.decode_ctx, set.decode_warmup, set.decode_iters)?;
    let biggest = set.decode_batches.iter().copied().max().unwrap_or(0);
    for (case, &b) in cases.into_iter().zip(&set.decode_batches) {
        let name = format!("decode batch {b}, {} cached", set.decode_ctx);
        let d = match case {
            Ok(d) => d,
            Err(e) => {
                c.fail(&format!("rollout/{name}"), e);
                continue;
            }
        };
        if b == biggest {
            c.measured.borrow_mut().kv_cache = Some(d.cache_bytes);
        }
        let base: Option<Baseline> = match b {
            1 => c.baseline(true, 14.7, "14.7", B_GEN),
            32 => c.baseline(true, 445.0, "445", B_GEN),
            _ => None,
        };
        let bytes = d.weight_bytes + d.kv_bytes;
        out.push(Figure::rate("rollout", &format!("{name}: tok/s"), "tok/s", b as f64, &d.secs).with_baseline(base));
        out.push(
            Figure::of(
                "rollout",
                &format!("{name}: ms per step"),
                "ms",
                &d.secs.iter().map(|s| s * 1e3).collect::<Vec<_>>(),
            )
            .note(format!("floor at 4.2 TB/s: {} ms", super::report::num(bytes / HBM_BYTES_PER_S * 1e3))),
        );
        out.push(Figure::rate("rollout", &format!("{name}: GB/s of floor bytes"), "GB/s", bytes / 1e9, &d.secs));
        if dev.is_cuda() {
            out.push(Figure::rate(
                "rollout",
                &format!("{name}: % of 4.2 TB/s floor"),
                "%",
                100.0 * bytes / HBM_BYTES_PER_S,
                &d.secs,
            ));
        }
        out.push(Figure::single("rollout", &format!("{name}: weight bytes per step"), "GB", d.weight_bytes / 1e9));
        out.push(
            Figure::single("rollout", &format!("{name}: KV bytes per step"), "GB", d.kv_bytes / 1e9).note(format!(
                "mean over the timed steps; cache {} GiB",
                super::report::num(gib(d.cache_bytes as u64))
            )),
        );
        out.push(
            Figure::single("rollout", &format!("{name}: peak memory"), "GiB", gib(d.peak))
                .note(super::measure::memory_source(dev)),
        );
    }
    match grpo_call(c, &l) {
        Ok(f) => out.extend(f),
        Err(e) => c.fail("rollout/GRPO-shaped call", e),
    }
    Ok(out)
}

/// `warmup` + `grpo_steps` calls of the engine on the GRPO shape of the settings.
fn grpo_call(c: &Ctx, l: &Loaded) -> Result<Vec<Figure>> {
    let (dev, set) = (c.dev, c.set);
    let data = synth::write_prompts(c.tmp, set.grpo_dialogues, set.grpo_turns, set.grpo_image_side)?;
    let loaded = load_jsonl_with(&data, LoadOptions { skip_bad: false, purpose: Purpose::Prompts })?;
    let specs: Vec<DialogueSpec> = loaded.samples.iter().map(DialogueSpec::from_sample).collect();
    let cfg = RolloutConfig {
        n: set.grpo_n,
        max_new_tokens: set.grpo_max_new,
        sample: SampleParams::new(1.0, 0, 1.0)?,
        seed: 0,
        max_batch: specs.len() * set.grpo_n,
        max_len: None,
    };
    let (mut total, mut prefill, mut decode, mut vision, mut peak) = (vec![], vec![], vec![], vec![], vec![]);
    let mut last = None;
    for run in 0..set.warmup + set.grpo_steps.max(1) {
        let watch = MemWatch::start(dev);
        let (_, _, st) = generate(dev, &l.model, &l.tok, &l.pp, &specs, &cfg, &mut |_, _| {})?;
        let p = super::measure::peak(&watch.finish());
        if run < set.warmup {
            continue;
        }
        total.push((st.prefill_tokens + st.decode_tokens) as f64 / st.total_s.max(1e-9));
        prefill.push(st.prefill_tokens as f64 / st.prefill_s.max(1e-9));
        decode.push(st.decode_step_tokens.max(1) as f64 / st.decode_s.max(1e-9));
        vision.push(st.vision_s.max(1e-9));
        peak.push(gib(p));
        last = Some(st);
    }
    let st = last.ok_or_else(|| anyhow::anyhow!("GRPO-shaped call: no timed run"))?;
    let what = format!(
        "{} dialogues × {} rollouts × {} turns, ≤{} new tokens per turn, one {}² image; last call: {} prefill + {} generated tokens in {} steps ({} padded), {} allocations in decode steps, KV cache {} GiB, step scratch {} GiB",
        specs.len(),
        set.grpo_n,
        set.grpo_turns,
        set.grpo_max_new,
        set.grpo_image_side,
        st.prefill_tokens,
        st.decode_tokens,
        st.steps,
        st.padded_steps,
        st.decode_allocations,
        super::report::num(gib(st.cache_bytes as u64)),
        super::report::num(gib(st.scratch_bytes as u64)),
    );
    let name = "GRPO-shaped call";
    Ok(vec![
        Figure::of("rollout", &format!("{name}: tok/s"), "tok/s", &total).note(what),
        Figure::of("rollout", &format!("{name}: prefill tok/s"), "tok/s", &prefill)
            .note("prompt tokens per second of the steps that fed a prompt segment (their decode rows included)"),
        Figure::of("rollout", &format!("{name}: decode tok/s"), "tok/s", &decode)
            .note("generated tokens per second of the pure decode steps"),
        Figure::of("rollout", &format!("{name}: vision s"), "s", &vision),
        Figure::of("rollout", &format!("{name}: peak memory"), "GiB", &peak).note(memory_source(dev)),
    ])
}

/// The kernel suite's form: the 7B-shaped Qwen2.5-VL on the GPU (no rows on the CPU).
pub fn run(dev: &Device, quick: bool) -> Result<Vec<BenchRow>> {
    if !dev.is_cuda() {
        return Ok(Vec::new());
    }
    let model: VlModel = random_7b(dev)?.into();
    let batches: &[usize] = if quick { &[1, 32] } else { &[1, 8, 32, 64, 128] };
    let mut rows = Vec::new();
    for case in decode(dev, &model, batches, 512, 2, if quick { 8 } else { 32 })? {
        let d = case?;
        let ms = super::report::stats(&d.secs).0 * 1e3;
        let bytes = d.weight_bytes + d.kv_bytes;
        rows.push(BenchRow {
            op: "rollout decode step".into(),
            shape: format!("batch {}, {} cached", d.batch, d.ctx),
            ms,
            bytes,
            note: format!(
                "{:.0} tok/s (transformers generate: 14.7 at batch 1, 445 at 32); floor {:.2} ms",
                d.batch as f64 / (ms * 1e-3),
                bytes / HBM_BYTES_PER_S * 1e3
            ),
            ..Default::default()
        });
    }
    Ok(rows)
}
