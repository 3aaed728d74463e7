//! The continuous-batching loop. `slots` rollouts run at once, each in its own KV-cache slot.
//! A dialogue is admitted when N slots are free: its first prompt is prefilled in one slot
//! (the leader) and copied to the other N − 1 after that step; all N then sample from the
//! leader's logits with their own random streams. Every step packs, for each busy slot, the
//! tokens it has not fed yet — a whole prompt segment, or the one token sampled last step — as
//! one ragged batch, and samples one token per slot. A rollout that ends a turn appends the next
//! prompt segment and keeps its slot; one that ends its last turn frees it for the next dialogue.

use super::images::ImageBank;
use super::positions::{PosTracker, StepPositions};
use super::spec::DialogueSpec;
use super::template::TurnTemplate;
use super::{Rollout, TurnOut};
use crate::models::common::lm::LmCache;
use crate::models::common::step::{StepInput, StepScratch};
use crate::ops::patch_embed::{gather_rows, RowIndex};
use crate::ops::sample::{stream_key, SampleParams, Sampler};
use crate::stages::model::{Processor, VlModel};
use crate::tensor::{Buf, Device};
use anyhow::{bail, Context, Result};
use std::time::Instant;
use tokenizers::Tokenizer;

/// How to generate.
#[derive(Clone, Debug)]
pub struct RolloutConfig {
    /// Rollouts per dialogue.
    pub n: usize,
    /// New tokens per assistant turn at most.
    pub max_new_tokens: usize,
    pub sample: SampleParams,
    pub seed: u64,
    /// Rollouts in flight at once (KV-cache slots); at least `n`.
    pub max_batch: usize,
    /// Tokens per slot; None: the longest dialogue's bound.
    pub max_len: Option<usize>,
}

/// What a call did, for throughput reports and metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RolloutStats {
    pub rollouts: usize,
    pub steps: usize,
    /// Prompt tokens fed (first prompts once per dialogue, later segments per rollout).
    pub prefill_tokens: usize,
    /// Tokens sampled, and those of them sampled in pure decode steps (per `decode_s`).
    pub decode_tokens: usize,
    pub decode_step_tokens: usize,
    /// Seconds in steps that fed a prompt segment (their decode rows included) and in pure
    /// decode steps.
    pub prefill_s: f64,
    pub decode_s: f64,
    pub vision_s: f64,
    pub total_s: f64,
    pub slots: usize,
    pub max_len: usize,
    /// Bytes of the KV cache.
    pub cache_bytes: usize,
    /// Turns cut at max_new_tokens.
    pub cut_turns: usize,
    pub turns: usize,
    /// Device buffers allocated by pure decode steps (forward and sampling): 0 once the step
    /// scratch has grown, which is what a CUDA graph of the step needs.
    pub decode_allocations: u64,
    /// Decode steps whose free slots were fed a pad token (see `generate_with`).
    pub padded_steps: usize,
    /// Bytes of the step scratch at the end of the call, and the pre-flight's bound on them.
    pub scratch_bytes: usize,
    pub scratch_plan_bytes: usize,
}

/// A dialogue's prompt segments: the first, then for each later turn the forms after a
/// stopped and after a cut reply.
struct Segments {
    first: Vec<i32>,
    next: Vec<[Vec<i32>; 2]>,
    /// Bank indexes of each turn's images, in order.
    images: Vec<Vec<usize>>,
}

/// A rollout in a slot.
#[derive(Clone)]
struct Live {
    dialogue: usize,
    index: usize,
    seq: Vec<i32>,
    /// Tokens of `seq` already in the cache.
    fed: usize,
    images: Vec<usize>,
    /// Images of `images` already fed.
    images_fed: usize,
    pos: PosTracker,
    turn: usize,
    turns: Vec<TurnOut>,
    cur: Vec<i32>,
    cur_logps: Vec<f32>,
    /// Tokens sampled so far over all turns (the random stream's counter).
    sampled: u64,
}

enum Slot {
    Free,
    /// Waits for the leader slot's first prompt.
    Follower {
        leader: usize,
        index: usize,
    },
    Busy(Box<Live>),
}

/// A stable 64-bit id of a dialogue (FNV-1a of its id), so its random streams do not depend on
/// where it sits in the input.
pub fn dialogue_uid(id: &str) -> u64 {
    id.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

/// Generates `cfg.n` rollouts of every dialogue. Returns them ordered by (dialogue, index),
/// with the images they show and the call's statistics. `progress(done, total)` is called as
/// rollouts finish.
pub fn generate(
    dev: &Device, model: &VlModel, tok: &Tokenizer, pp: &Processor, dialogues: &[DialogueSpec], cfg: &RolloutConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<Rollout>, ImageBank, RolloutStats)> {
    generate_with(dev, model, tok, pp, dialogues, cfg, Hooks { progress, on_done: &mut |_| Ok(()) })
}

/// What `generate_with` calls as rollouts finish: `progress(done, total)`, and `on_done` with
/// each finished rollout (before `progress`).
pub struct Hooks<'a> {
    pub progress: &'a mut dyn FnMut(usize, usize),
    pub on_done: &'a mut dyn FnMut(&Rollout) -> Result<()>,
}

/// `generate`, calling `hooks.on_done` with each rollout as it finishes (GRPO hands finished
/// dialogues to the judge while the others are still decoding).
pub fn generate_with(
    dev: &Device, model: &VlModel, tok: &Tokenizer, pp: &Processor, dialogues: &[DialogueSpec], cfg: &RolloutConfig,
    hooks: Hooks,
) -> Result<(Vec<Rollout>, ImageBank, RolloutStats)> {
    let Hooks { progress, on_done } = hooks;
    let t0 = Instant::now();
    if cfg.n == 0 || cfg.max_new_tokens == 0 {
        bail!("rollouts: n and max_new_tokens must be at least 1 (got {} and {})", cfg.n, cfg.max_new_tokens);
    }
    if cfg.max_batch < cfg.n {
        bail!("rollouts: max_batch {} is smaller than the {} rollouts of one dialogue", cfg.max_batch, cfg.n);
    }
    let tmpl = TurnTemplate::new(model, tok)?;
    let mut bank = ImageBank::new(pp);
    let mut segs = Vec::with_capacity(dialogues.len());
    let mut bound = 0usize;
    let limits =
        [(Some(model.max_positions()), "the model's max_position_embeddings"), (cfg.max_len, "the cache's max_len")];
    for d in dialogues {
        let s = segments(model, &tmpl, &mut bank, d).with_context(|| format!("dialogue {} ({})", d.id, d.origin))?;
        let len = dialogue_bound(&s, cfg.max_new_tokens);
        for (limit, what) in limits {
            if let Some(m) = limit.filter(|&m| len > m) {
                bail!(
                    "dialogue {} ({}): up to {len} tokens with {} turns of at most {} new tokens, more than {what} {m}",
                    d.id,
                    d.origin,
                    d.turns.len(),
                    cfg.max_new_tokens
                );
            }
        }
        bound = bound.max(len);
        segs.push(s);
    }
    let max_len = cfg.max_len.unwrap_or(bound).max(1);
    let total = dialogues.len() * cfg.n;
    let slots_n = cfg.max_batch.min(total.max(cfg.n));
    let vocab = model.tdims().vocab;
    // The largest step: every leader feeds its first prompt and every other slot its longest
    // later segment (all cut at max_new_tokens at once).
    let longest = |f: &dyn Fn(&Segments) -> usize| segs.iter().map(f).max().unwrap_or(1);
    let first = longest(&|s| s.first.len());
    let later = longest(&|s| s.next.iter().flatten().map(Vec::len).max().unwrap_or(1)).max(1);
    let step_tokens = ((slots_n / cfg.n).max(1) * first + slots_n * later).min(slots_n * max_len);
    let elem = if dev.is_cuda() { 2 } else { 4 };
    let scratch_plan = StepScratch::plan_bytes(model.tdims(), elem, step_tokens, slots_n);
    let cache_bytes = preflight(dev, model, slots_n, max_len, scratch_plan)?;
    let mut stats =
        RolloutStats { slots: slots_n, max_len, cache_bytes, scratch_plan_bytes: scratch_plan, ..Default::default() };
    let mut out: Vec<Rollout> = Vec::with_capacity(total);
    if total == 0 {
        return Ok((out, bank, stats));
    }
    let mut cache = model.new_cache(dev, slots_n, max_len)?;
    let mut sampler = Sampler::new(dev, slots_n, vocab)?;
    let mut scratch = StepScratch::default();
    // −inf on the placeholder ids (a sampled placeholder would have no image behind it).
    let mut ban = vec![0f32; vocab];
    tmpl.banned.iter().filter(|&&b| (0..vocab as i32).contains(&b)).for_each(|&b| ban[b as usize] = f32::NEG_INFINITY);
    let ban = dev.upload(&ban, model.param_entries()[0].1.dtype())?;
    let mut slots: Vec<Slot> = (0..slots_n).map(|_| Slot::Free).collect();
    let d_model = model.tdims().layer.d;
    let pos_rows = PosTracker::new(model).rows();
    let mut next_dialogue = 0usize;
    loop {
        // Admit whole dialogues while N slots are free.
        while next_dialogue < dialogues.len() {
            let free: Vec<usize> = (0..slots_n).filter(|&s| matches!(slots[s], Slot::Free)).take(cfg.n).collect();
            if free.len() < cfg.n {
                break;
            }
            let di = next_dialogue;
            next_dialogue += 1;
            let s = &segs[di];
            let live = Live {
                dialogue: di,
                index: 0,
                seq: s.first.clone(),
                fed: 0,
                images: s.images[0].clone(),
                images_fed: 0,
                pos: PosTracker::new(model),
                turn: 0,
                turns: Vec::new(),
                cur: Vec::new(),
                cur_logps: Vec::new(),
                sampled: 0,
            };
            slots[free[0]] = Slot::Busy(Box::new(live));
            for (k, &f) in free.iter().enumerate().skip(1) {
                slots[f] = Slot::Follower { leader: free[0], index: k };
            }
        }
        let busy: Vec<usize> = (0..slots_n).filter(|&s| matches!(slots[s], Slot::Busy(_))).collect();
        if busy.is_empty() {
            break;
        }
        // Pack the step: each busy slot feeds what it has not fed yet.
        let step_t0 = Instant::now();
        let allocs0 = crate::tensor::allocations();
        let mut ids = Vec::new();
        let mut cu = vec![0i32];
        let mut pos = StepPositions::new(pos_rows);
        let mut step_images = Vec::new();
        let mut any_prefill = false;
        // A pure decode step with free slots feeds them a pad token (id 0 at position 0, dropped
        // after the step): every decode step then has one token per slot, the uniform shape
        // that takes the tensor-core decode kernels and that a CUDA graph can replay.
        let pad = busy.len() < slots_n
            && slots.iter().all(|s| match s {
                Slot::Free => true,
                Slot::Follower { .. } => false,
                Slot::Busy(l) => l.seq.len() == l.fed + 1 && l.images.len() == l.images_fed,
            });
        for slot in slots.iter_mut() {
            if pad && matches!(slot, Slot::Free) {
                ids.push(0);
                pos.push(vec![0; pos_rows]);
            }
            if let Slot::Busy(l) = slot {
                let new = &l.seq[l.fed..];
                let imgs = &l.images[l.images_fed..];
                let grids: Vec<[usize; 3]> = imgs.iter().filter_map(|&i| bank.grid(i)).collect();
                pos.push(l.pos.append(new, &grids)?);
                if new.len() > 1 || !imgs.is_empty() {
                    any_prefill = true;
                    stats.prefill_tokens += new.len();
                }
                ids.extend_from_slice(new);
                step_images.extend_from_slice(imgs);
                l.fed = l.seq.len();
                l.images_fed = l.images.len();
            }
            cu.push(ids.len() as i32);
        }
        let tv = Instant::now();
        bank.ensure_embeds(dev, model, &step_images)?;
        let rows = bank.rows_for(dev, &step_images, d_model)?;
        stats.vision_s += tv.elapsed().as_secs_f64();
        let logits = model.step_ragged(
            dev,
            &mut cache,
            &mut scratch,
            StepInput { ids: &ids, pos: &pos.finish(), cu_new: &cu, image_rows: rows.as_ref() },
        )?;
        // Followers of a leader that just prefilled take its cache and state.
        let mut requests: Vec<(usize, usize)> = Vec::new(); // (slot, logits row)
        for (row, &s) in busy.iter().enumerate() {
            requests.push((s, if pad { s } else { row }));
            for f in 0..slots_n {
                if let Slot::Follower { leader, index } = slots[f] {
                    if leader == s {
                        let Slot::Busy(l) = &slots[s] else { unreachable!() };
                        let mut copy = l.clone();
                        copy.index = index;
                        cache.copy_prefix(dev, s, f, l.fed)?;
                        slots[f] = Slot::Busy(copy);
                        requests.push((f, row));
                    }
                }
            }
        }
        let mut repeated;
        let batch_logits: &mut Buf = if pad || requests.len() == busy.len() {
            logits
        } else {
            repeated = repeat_rows(dev, logits, &requests, busy.len(), vocab)?;
            &mut repeated
        };
        // Padded steps sample every row (a pad row's draw is dropped): no gather, no allocation.
        let n_rows = if pad { slots_n } else { requests.len() };
        crate::ops::elementwise::bias_add(dev, batch_logits, &ban, n_rows, vocab)?;
        // Request i is sampled from row at[i] of batch_logits; pad rows draw greedily.
        let at: Vec<usize> = requests.iter().enumerate().map(|(i, &(_, row))| if pad { row } else { i }).collect();
        let pads: Vec<usize> = (0..slots_n).filter(|&s| pad && matches!(slots[s], Slot::Free)).collect();
        let mut params = vec![cfg.sample; n_rows];
        let mut keys = vec![0u64; n_rows];
        for (&(s, _), &r) in requests.iter().zip(&at) {
            let Slot::Busy(l) = &slots[s] else { unreachable!() };
            keys[r] = stream_key(cfg.seed, dialogue_uid(&dialogues[l.dialogue].id), l.index as u64, l.sampled);
        }
        pads.iter().for_each(|&s| params[s] = SampleParams::greedy());
        let drawn = sampler.sample(dev, batch_logits, n_rows, &params, &keys)?;
        let drawn: Vec<_> = at.iter().map(|&r| drawn[r]).collect();
        stats.padded_steps += pad as usize;
        for &s in &pads {
            cache.reset(dev, s)?;
        }
        if !any_prefill {
            stats.decode_allocations += crate::tensor::allocations() - allocs0;
            stats.decode_step_tokens += requests.len();
        }
        stats.steps += 1;
        stats.decode_tokens += drawn.len();
        for (&(s, _), d) in requests.iter().zip(&drawn) {
            let Slot::Busy(l) = &mut slots[s] else { unreachable!() };
            l.sampled += 1;
            l.seq.push(d.token);
            l.cur.push(d.token);
            l.cur_logps.push(d.logp);
            let stopped = tmpl.stop_ids.contains(&d.token);
            let cut = !stopped && l.cur.len() >= cfg.max_new_tokens;
            if !(stopped || cut) {
                continue;
            }
            let start = l.seq.len() - l.cur.len();
            let reply: Vec<i32> = if stopped { l.cur[..l.cur.len() - 1].to_vec() } else { l.cur.clone() };
            let turn = TurnOut {
                ids: std::mem::take(&mut l.cur),
                logps: std::mem::take(&mut l.cur_logps),
                text: tmpl.decode(&reply)?,
                span: start..l.seq.len(),
                stopped,
                cut,
            };
            stats.turns += 1;
            stats.cut_turns += cut as usize;
            l.turns.push(turn);
            l.turn += 1;
            let sg = &segs[l.dialogue];
            if l.turn < sg.images.len() {
                l.seq.extend_from_slice(&sg.next[l.turn - 1][cut as usize]);
                l.images.extend_from_slice(&sg.images[l.turn]);
            } else {
                let Slot::Busy(l) = std::mem::replace(&mut slots[s], Slot::Free) else { unreachable!() };
                cache.reset(dev, s)?;
                let r = Rollout { dialogue: l.dialogue, index: l.index, turns: l.turns, seq: l.seq, images: l.images };
                on_done(&r)?;
                out.push(r);
                progress(out.len(), total);
            }
        }
        dev.sync()?;
        let dt = step_t0.elapsed().as_secs_f64();
        if any_prefill {
            stats.prefill_s += dt;
        } else {
            stats.decode_s += dt;
        }
    }
    out.sort_by_key(|r| (r.dialogue, r.index));
    stats.rollouts = out.len();
    stats.scratch_bytes = scratch.bytes();
    stats.total_s = t0.elapsed().as_secs_f64();
    Ok((out, bank, stats))
}

/// The prompt segments of one dialogue, its images added to the bank.
fn segments(model: &VlModel, tmpl: &TurnTemplate, bank: &mut ImageBank, d: &DialogueSpec) -> Result<Segments> {
    if d.turns.is_empty() {
        bail!("no user turn");
    }
    let mut ids = Vec::with_capacity(d.images.len());
    for (k, p) in d.images.iter().enumerate() {
        ids.push(
            bank.add(model, p, &format!("dialogue {} ({})", d.id, d.origin))
                .with_context(|| format!("image {} ({})", k + 1, p.display()))?,
        );
    }
    let counts: Vec<usize> = ids.iter().map(|&i| bank.tokens(i)).collect();
    let images: Vec<Vec<usize>> =
        d.turns.iter().map(|t| TurnTemplate::images_of(t).into_iter().map(|k| ids[k]).collect()).collect();
    let first = tmpl.first(d.system.as_deref(), &d.turns[0], &counts)?;
    if !d.history.is_empty() {
        // Given history: one prompt of the scripted replies, each closed by the template's
        // end-of-turn as a cut reply would be, up to the last user turn; only that is generated.
        if d.history.len() + 1 != d.turns.len() {
            bail!("{} scripted answers for {} user turns (need one fewer)", d.history.len(), d.turns.len());
        }
        let mut seq = first;
        for (k, reply) in d.history.iter().enumerate() {
            seq.extend(tmpl.reply(reply).with_context(|| format!("the scripted answer to turn {}", k + 1))?);
            seq.extend(tmpl.next(&d.turns[k + 1], false, &counts)?);
        }
        return Ok(Segments { first: seq, next: Vec::new(), images: vec![images.concat()] });
    }
    let mut next = Vec::new();
    for t in &d.turns[1..] {
        next.push([tmpl.next(t, true, &counts)?, tmpl.next(t, false, &counts)?]);
    }
    Ok(Segments { first, next, images })
}

/// The most tokens a rollout of the dialogue can hold.
fn dialogue_bound(s: &Segments, max_new: usize) -> usize {
    s.first.len() + s.next.iter().map(|n| n[0].len().max(n[1].len())).sum::<usize>() + s.images.len() * max_new
}

/// Bytes of a KV cache of `slots` sequences of `max_len` tokens.
pub fn kv_bytes(dev: &Device, model: &VlModel, slots: usize, max_len: usize) -> usize {
    let t = model.tdims();
    let elem = if dev.is_cuda() { 2 } else { 4 };
    2 * t.n_layers * slots * max_len * t.layer.kv_heads * t.layer.head_dim * elem
}

/// The KV cache a call of `slots` rollouts over `dialogues` needs: (max_len, bytes), the longest
/// dialogue's bound (prompt segments + turns × max_new_tokens), computed without generating.
pub fn cache_plan(
    dev: &Device, model: &VlModel, tok: &Tokenizer, pp: &Processor, dialogues: &[DialogueSpec], slots: usize,
    max_new_tokens: usize,
) -> Result<(usize, usize)> {
    let tmpl = TurnTemplate::new(model, tok)?;
    let mut bank = ImageBank::new(pp);
    let mut bound = 1;
    for d in dialogues {
        let s = segments(model, &tmpl, &mut bank, d).with_context(|| format!("dialogue {} ({})", d.id, d.origin))?;
        bound = bound.max(dialogue_bound(&s, max_new_tokens));
    }
    Ok((bound, kv_bytes(dev, model, slots, bound)))
}

/// KV-cache bytes; on a GPU, fails with the numbers when the cache and scratch do not fit.
fn preflight(dev: &Device, model: &VlModel, slots: usize, max_len: usize, scratch: usize) -> Result<usize> {
    let bytes = kv_bytes(dev, model, slots, max_len);
    if let Device::Cuda(g) = dev {
        let (free, _) = g.mem_info();
        if bytes + scratch > free {
            let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
            bail!(
                "rollouts: the KV cache ({slots} slots × {max_len} tokens: {:.2} GiB) and step scratch ({:.2} GiB) need {:.2} GiB, {:.2} GiB are free (weights already loaded); lower --max-batch or --max-new-tokens",
                gib(bytes),
                gib(scratch),
                gib(bytes + scratch),
                gib(free)
            );
        }
    }
    Ok(bytes)
}

/// logits rows picked per request: out[i] = logits[requests[i].1].
fn repeat_rows(dev: &Device, logits: &Buf, requests: &[(usize, usize)], rows: usize, vocab: usize) -> Result<Buf> {
    let idx: Vec<usize> = requests.iter().map(|r| r.1).collect();
    let at = RowIndex::with_repeats(dev, &idx, rows)?;
    let mut out = dev.zeros(logits.dtype(), idx.len() * vocab)?;
    gather_rows(dev, &mut out, logits, &at, vocab)?;
    Ok(out)
}

impl VlModel {
    /// Empty KV caches for `batch` rollouts of up to `max_len` tokens.
    pub fn new_cache(&self, dev: &Device, batch: usize, max_len: usize) -> Result<LmCache> {
        let dt = self.param_entries().first().map(|(_, b)| b.dtype()).unwrap_or(dev.act_dtype());
        LmCache::new(dev, self.tdims(), dt, batch, max_len)
    }

    /// One ragged step (see `QwenVl::step_ragged`): logits [active, V], in `scratch`.
    pub fn step_ragged<'s>(
        &self, dev: &Device, cache: &mut LmCache, scratch: &'s mut StepScratch, input: StepInput,
    ) -> Result<&'s mut Buf> {
        match &self.net {
            crate::stages::model::Net::Qwen(m) => m.step_ragged(dev, cache, scratch, input),
            crate::stages::model::Net::Llava(m) => m.step_ragged(dev, cache, scratch, input),
        }
    }
}
