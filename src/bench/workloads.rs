//! The workload suites of `am3 bench --shape S | --model DIR`: `train` (language-model and
//! full-model forward + backward, and the SFT step with AdamW, recompute on and off, vision
//! trained and frozen), `vision` (the tower alone), `prefill`, `rollout` (decode steps, in
//! `rollout.rs`) and `grpo` (one whole GRPO step, in `grpo_step.rs`). Each warms up, times every
//! run and reports medians and min–max; sizes are the on a GPU and scaled down on the
//! CPU (`Settings`).

use super::measure::{time_runs, MemWatch};
use super::report::{Baseline, Figure};
use super::shape::{buf_bytes, FlopModel, Subject};
use super::synth;
use crate::models::common::params::{GradStore, ParamRef};
use crate::models::llava_next::vision as clip;
use crate::models::qwen2_5_vl::model::Recompute;
use crate::models::qwen2_5_vl::vision as qvision;
use crate::ops::adamw::AdamW;
use crate::rng::Rng;
use crate::stages::examples::Packed;
use crate::stages::model::{Net, VlModel};
use crate::stages::sft::nll_micro_batch;
use crate::tensor::Device;
use crate::train::optim::{slot_key, Optimizer};
use anyhow::Result;
use serde::Serialize;
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::Path;

pub const GEMM_CEILING: f64 = 770e12;
pub const DATASHEET_PEAK: f64 = 989e12;

/// Sizes and repetitions of every suite.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub gpu: bool,
    pub quick: bool,
    pub warmup: usize,
    pub seq: usize,
    pub train_images: usize,
    pub train_image_side: u32,
    pub train_iters: usize,
    pub vision_sides: Vec<u32>,
    pub vision_batch: usize,
    pub vision_iters: usize,
    pub prefill: Vec<usize>,
    pub prefill_iters: usize,
    pub decode_batches: Vec<usize>,
    pub decode_ctx: usize,
    pub decode_warmup: usize,
    pub decode_iters: usize,
    pub grpo_dialogues: usize,
    pub grpo_n: usize,
    pub grpo_turns: usize,
    pub grpo_max_new: usize,
    pub grpo_steps: usize,
    pub grpo_image_side: u32,
}

impl Settings {
    pub fn new(gpu: bool, quick: bool, seq: Option<usize>) -> Settings {
        let mut s = if gpu {
            Settings {
                gpu,
                quick,
                warmup: 1,
                seq: 4096,
                train_images: 2,
                train_image_side: 448,
                train_iters: 3,
                vision_sides: vec![448, 1008],
                vision_batch: 8,
                vision_iters: 5,
                prefill: vec![1024, 4096, 16384],
                prefill_iters: 5,
                decode_batches: vec![1, 8, 32, 64, 128],
                decode_ctx: 512,
                decode_warmup: 2,
                decode_iters: 32,
                grpo_dialogues: 8,
                grpo_n: 8,
                grpo_turns: 3,
                grpo_max_new: 128,
                grpo_steps: 3,
                grpo_image_side: 448,
            }
        } else {
            Settings {
                gpu,
                quick,
                warmup: 1,
                seq: 256,
                train_images: 2,
                train_image_side: 112,
                train_iters: 3,
                vision_sides: vec![112, 224],
                vision_batch: 2,
                vision_iters: 3,
                prefill: vec![64, 256, 1024],
                prefill_iters: 3,
                decode_batches: vec![1, 8, 32, 64, 128],
                decode_ctx: 64,
                decode_warmup: 2,
                decode_iters: 8,
                grpo_dialogues: 2,
                grpo_n: 4,
                grpo_turns: 3,
                grpo_max_new: 16,
                grpo_steps: 3,
                grpo_image_side: 112,
            }
        };
        if quick {
            s.train_iters = 2;
            s.vision_sides.truncate(1);
            s.vision_iters = 2;
            s.prefill.truncate(2);
            s.prefill_iters = 2;
            s.decode_batches = vec![1, 8, 32];
            s.decode_iters = s.decode_iters.min(8);
            s.grpo_steps = 2;
            if gpu {
                s.seq = 1024;
                (s.grpo_dialogues, s.grpo_n, s.grpo_max_new) = (4, 4, 64);
            }
        }
        if let Some(n) = seq {
            s.seq = n;
        }
        s
    }

    /// Tokens per slot of the decode suite's caches.
    pub fn decode_len(&self) -> usize {
        self.decode_ctx + self.decode_warmup + self.decode_iters + 1
    }
}

/// Buffer bytes the suites allocated, for the plan check; measured peaks.
#[derive(Clone, Debug, Default)]
pub struct Measured {
    pub weights: Option<usize>,
    pub optimizer: Option<usize>,
    pub grads: Option<usize>,
    pub kv_cache: Option<usize>,
    /// The SFT step with recompute, vision trained: measured peak.
    pub sft_peak: Option<u64>,
    /// The GRPO stage's own plan peak and the step's measured peak.
    pub grpo_peak: Option<(usize, u64)>,
}

pub struct Ctx<'a> {
    pub dev: &'a Device,
    pub subject: &'a Subject,
    pub skeleton: &'a VlModel,
    pub set: &'a Settings,
    pub tmp: &'a Path,
    pub flops: FlopModel,
    /// The published baselines apply (Qwen2.5-VL-7B sizes).
    pub qwen7b: bool,
    pub failures: RefCell<Vec<String>>,
    pub measured: RefCell<Measured>,
}

impl Ctx<'_> {
    pub fn fail(&self, what: &str, e: anyhow::Error) {
        let msg = format!("{what}: {e:#}");
        eprintln!("am3 bench: not run: {msg}");
        self.failures.borrow_mut().push(msg);
    }

    /// A baseline, when the shape is the one it was measured on and `applies`.
    pub fn baseline(&self, applies: bool, value: f64, text: &str, source: &str) -> Option<Baseline> {
        (self.qwen7b && applies).then(|| Baseline { value, text: text.into(), source: source.into() })
    }
}

/// Seconds per run and the peak bytes in use.
pub type Timed = (Vec<f64>, u64);

/// Runs after warm-up, timed, with memory watched.
pub fn measure(dev: &Device, warmup: usize, iters: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<Timed> {
    let w = MemWatch::start(dev);
    let r = time_runs(dev, warmup, iters, f);
    let samples = w.finish();
    Ok((r?, super::measure::peak(&samples)))
}

pub fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// One timed workload for `throughput`: `work` units of `unit` and `flops` model FLOPs per run,
/// the seconds of each run and the peak bytes in use.
struct Run<'a> {
    name: &'a str,
    unit: &'a str,
    work: f64,
    flops: f64,
    secs: &'a [f64],
    peak: u64,
}

/// Throughput, model TFLOP/s, MFU (on a GPU: against the H200 ceilings) and peak memory.
fn throughput(c: &Ctx, suite: &str, run: Run, base: Option<Baseline>, mem_base: Option<Baseline>) -> Vec<Figure> {
    let Run { name, unit, work, flops, secs, peak } = run;
    let mut v = vec![
        Figure::rate(suite, &format!("{name}: {unit}"), unit, work, secs).with_baseline(base),
        Figure::of(suite, &format!("{name}: ms"), "ms", &secs.iter().map(|s| s * 1e3).collect::<Vec<_>>()),
        Figure::rate(suite, &format!("{name}: model TFLOP/s"), "TFLOP/s", flops / 1e12, secs)
            .note(format!("{} TFLOP per run", super::report::num(flops / 1e12))),
    ];
    if c.dev.is_cuda() {
        v.push(Figure::rate(suite, &format!("{name}: MFU of 770 TFLOP/s"), "%", 100.0 * flops / GEMM_CEILING, secs));
        v.push(Figure::rate(suite, &format!("{name}: MFU of 989 TFLOP/s"), "%", 100.0 * flops / DATASHEET_PEAK, secs));
    }
    v.push(
        Figure::single(suite, &format!("{name}: peak memory"), "GiB", gib(peak))
            .with_baseline(mem_base)
            .note(super::measure::memory_source(c.dev)),
    );
    v
}

/// Image grids for the FLOP count: Qwen's patch grids, LLaVA's tiles as [tiles, 0, 0].
fn image_grids(m: &VlModel, p: &Packed) -> Result<Vec<[usize; 3]>> {
    Ok(match &m.net {
        Net::Qwen(_) => p.grids.clone(),
        Net::Llava(l) => l.geometries(&p.image_sizes)?.iter().map(|g| [g.num_tiles(), 0, 0]).collect(),
    })
}

/// Ids of ordinary text: below the first image/video placeholder and the vocabulary's end.
pub fn text_ids(m: &VlModel, n: usize, seed: u64) -> Vec<i32> {
    let limit = match &m.net {
        Net::Qwen(q) => m.tdims().vocab.min(q.cfg.image_token_id as usize).min(q.cfg.video_token_id as usize),
        Net::Llava(l) => m.tdims().vocab.min(l.cfg.image_token_index as usize),
    };
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.below(limit.max(1)) as i32).collect()
}

const B_LM: &str = "Qwen2-7B LM fwd+bwd, S=4096, PyTorch eager SDPA, H200 (issue #14)";
const B_FULL: &str =
    "full Qwen2.5-VL-7B fwd+bwd, S=4096 with two 448² images, PyTorch + transformers, H200 (issue #14)";
const B_SFT: &str = "SFT step, Qwen2.5-VL-7B, S=4096, PyTorch + transformers, H200 (issue #14; its optimizer/sharding set-up is the issue's, not this bench's)";

pub fn train(c: &Ctx) -> Result<Vec<Figure>> {
    let (dev, set) = (c.dev, c.set);
    let mut l = c.subject.load(dev, 0)?;
    // What `am3 sft --grad-dtype auto` picks for a 7B full fine-tune on one card.
    l.model.set_grad_store(if dev.is_cuda() { GradStore::Bf16Linear } else { GradStore::F32 });
    c.measured.borrow_mut().weights = Some(buf_bytes(l.model.param_entries().iter().map(|(_, b)| *b)));
    let s = set.seq;
    let text = synth::batch_of(&l, c.tmp, s, &[])?;
    // LLaVA-NeXT's anyres turns a 448² image into ~2.9k tokens: fewer images when they do
    // not fit in S.
    let (mut full, mut n_img) = (None, set.train_images);
    while full.is_none() {
        match synth::batch_of(&l, c.tmp, s, &vec![(set.train_image_side, set.train_image_side); n_img]) {
            Ok(b) => full = Some(b),
            Err(e) if n_img > 1 => {
                eprintln!("am3 bench: train: {e:#}; trying {} image(s)", n_img - 1);
                n_img -= 1;
            }
            Err(e) => return Err(e),
        }
    }
    let full = full.expect("set above");
    let grids = image_grids(&l.model, &full)?;
    let lm = 3.0 * c.flops.lm_fwd(&[s], s);
    let vis = 3.0 * c.flops.vision_fwd(&grids);
    let n_layers = l.model.tdims().n_layers;
    let at_4096 = s == 4096;
    let imgs_448 = at_4096 && n_img == 2 && set.train_image_side == 448;
    let mut out = Vec::new();

    for (label, rc, base) in [
        ("kept activations", Recompute::default(), (10455.0, "10,455")),
        ("recompute", Recompute::all(n_layers), (8924.0, "8,924")),
    ] {
        let name = format!("lm fwd+bwd S={s}, {label}");
        let src = if rc == Recompute::default() { B_LM.to_string() } else { format!("{B_LM}, gradient checkpointing") };
        let r = measure(dev, set.warmup, set.train_iters, &mut || {
            l.model.zero_grads(dev)?;
            nll_micro_batch(dev, &mut l.model, &text, &rc, true).map(|_| ())
        });
        match r {
            Ok((secs, peak)) => out.extend(throughput(
                c,
                "train",
                Run { name: &name, unit: "tok/s", work: s as f64, flops: lm, secs: &secs, peak },
                c.baseline(at_4096, base.0, base.1, &src),
                None,
            )),
            Err(e) => c.fail(&format!("train/{name}"), e),
        }
    }

    let img_desc = format!("{n_img} image{} {}²", if n_img == 1 { "" } else { "s" }, set.train_image_side);
    let name = format!("full model fwd+bwd S={s} with {img_desc}, kept activations");
    let r = measure(dev, set.warmup, set.train_iters, &mut || {
        l.model.zero_grads(dev)?;
        nll_micro_batch(dev, &mut l.model, &full, &Recompute::default(), true).map(|_| ())
    });
    match r {
        Ok((secs, peak)) => out.extend(throughput(
            c,
            "train",
            Run { name: &name, unit: "tok/s", work: s as f64, flops: lm + vis, secs: &secs, peak },
            c.baseline(imgs_448, 6852.0, "6,852", B_FULL),
            c.baseline(imgs_448, 67.5, "67.5", B_FULL),
        )),
        Err(e) => c.fail(&format!("train/{name}"), e),
    }

    // The SFT step as `am3 sft` runs it: fresh gradients, forward, fused log-prob, backward,
    // AdamW over f32 masters (global-norm clip 1).
    let n_targets: f64 = full.weights.iter().map(|&w| w as f64).sum();
    for (rc_label, rc) in [("recompute", Recompute::all(n_layers)), ("kept activations", Recompute::default())] {
        for (vis_label, freeze) in [("vision trained", false), ("vision frozen", true)] {
            let name = format!("sft step S={s} with {img_desc}, {rc_label}, {vis_label}");
            l.model.set_frozen_vision(freeze);
            let has_grad = l.model.grad_keys(dev)?;
            if c.measured.borrow().grads.is_none() {
                let g = l.model.params_and_grads().iter().map(|(_, _, g)| g.len() * g.dtype().size()).sum();
                c.measured.borrow_mut().grads = Some(g);
            }
            let vision: BTreeSet<String> = l
                .model
                .param_entries()
                .iter()
                .filter(|(r, _)| l.model.is_vision(&r.name))
                .map(|(r, _)| slot_key(r))
                .collect();
            let trainable =
                |r: &ParamRef| has_grad.contains(&slot_key(r)) && !(freeze && vision.contains(&slot_key(r)));
            let hp = AdamW { lr: 1e-5, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.0 };
            let mut opt = match Optimizer::new(dev, hp, &l.model.trainable_entries(), &trainable) {
                Ok(o) => o,
                Err(e) => {
                    c.fail(&format!("train/{name}"), e);
                    continue;
                }
            };
            if !freeze {
                c.measured.borrow_mut().optimizer = Some(opt.state_bytes());
            }
            let r = measure(dev, set.warmup, set.train_iters, &mut || {
                l.model.zero_grads(dev)?;
                nll_micro_batch(dev, &mut l.model, &full, &rc, true)?;
                opt.step(dev, l.model.params_and_grads(), 1e-5, 1.0 / n_targets.max(1.0), 1.0).map(|_| ())
            });
            let applies = imgs_448 && !freeze && rc_label == "recompute";
            match r {
                Ok((secs, peak)) => {
                    if !freeze && rc_label == "recompute" {
                        c.measured.borrow_mut().sft_peak = Some(peak);
                    }
                    let figs = throughput(
                        c,
                        "train",
                        Run { name: &name, unit: "tok/s", work: s as f64, flops: lm + vis, secs: &secs, peak },
                        c.baseline(applies, 8377.0, "8,377", B_SFT),
                        c.baseline(applies, 58.2, "58.2", B_SFT),
                    );
                    out.extend(figs.into_iter().map(|f| {
                        if f.note.is_empty() {
                            f.note(format!("AdamW over {:.4} M parameters", opt.num_params() as f64 / 1e6))
                        } else {
                            f
                        }
                    }));
                }
                Err(e) => c.fail(&format!("train/{name}"), e),
            }
        }
    }
    Ok(out)
}

const B_VIS: &str = "Qwen2.5-VL-7B vision tower, batch 8, PyTorch + transformers, H200 (issue #14)";

pub fn vision(c: &Ctx) -> Result<Vec<Figure>> {
    let (dev, set) = (c.dev, c.set);
    let l = c.subject.load(dev, 0)?;
    let b = set.vision_batch;
    let mut rng = Rng::new(5);
    let mut out = Vec::new();
    for &side in &set.vision_sides {
        let side_u = side as usize;
        let base = |fwd: bool| -> Option<Baseline> {
            let v = match (side, fwd) {
                (448, true) => (31.0, "31"),
                (448, false) => (11.5, "11.5"),
                (1008, true) => (6.65, "6.65"),
                (1008, false) => (2.5, "2.5"),
                _ => return None,
            };
            c.baseline(b == 8, v.0, v.1, B_VIS)
        };
        let (fwd, bwd, grids): (Result<Timed>, Result<Timed>, Vec<[usize; 3]>) = match &l.model.net {
            Net::Qwen(q) => {
                let vd = &q.vdims;
                let p = side_u / q.cfg.vision.patch_size;
                let grids = vec![[1, p, p]; b];
                let patches = b * p * p;
                let pixels = rng.normal_vec(patches * vd.patch_dim, 1.0);
                let dout = dev.upload_act(&rng.normal_vec(patches / vd.unit() * vd.out, 0.01))?;
                let fwd = measure(dev, set.warmup, set.vision_iters, &mut || {
                    qvision::forward(dev, vd, &q.params.vision, &[], &pixels, &grids, true).map(|_| ())
                });
                let bwd =
                    qvision::VisionParams::build(vd, &q.patch_shape, &mut |r: &ParamRef| dev.zeros_f32(r.numel()))
                        .and_then(|mut g| {
                            measure(dev, set.warmup, set.vision_iters, &mut || {
                                let (_, f) = qvision::forward(dev, vd, &q.params.vision, &[], &pixels, &grids, false)?;
                                qvision::backward(
                                    dev,
                                    qvision::Tower { dims: vd, p: &q.params.vision, lora: &[] },
                                    qvision::VisionGrads { base: Some(&mut g), lora: None },
                                    &f,
                                    &dout,
                                )
                            })
                        });
                (fwd, bwd, grids)
            }
            Net::Llava(m) => {
                let vd = &m.vdims;
                let tiles = b * m.geometries(&[(side_u, side_u)])?[0].num_tiles();
                let pixels = rng.normal_vec(tiles * vd.tile_len(), 1.0);
                let dfeat = dev.upload_act(&rng.normal_vec(tiles * vd.g * vd.g * vd.d, 0.01))?;
                let fwd = measure(dev, set.warmup, set.vision_iters, &mut || {
                    clip::forward(dev, vd, &m.params.vision, &pixels, tiles, true).map(|_| ())
                });
                let bwd = clip::ClipParams::build(vd, true, &mut |r: &ParamRef| dev.zeros_f32(r.numel())).and_then(
                    |mut g| {
                        measure(dev, set.warmup, set.vision_iters, &mut || {
                            let (_, f) = clip::forward(dev, vd, &m.params.vision, &pixels, tiles, false)?;
                            clip::backward(dev, vd, &m.params.vision, &mut g, &f, &dfeat)
                        })
                    },
                );
                (fwd, bwd, vec![[tiles, 0, 0]])
            }
        };
        let f1 = c.flops.vision_fwd(&grids);
        for (label, r, flops, is_fwd) in [("fwd", fwd, f1, true), ("fwd+bwd", bwd, 3.0 * f1, false)] {
            let name = format!("tower {label} {side}² batch {b}");
            match r {
                Ok((secs, peak)) => out.extend(throughput(
                    c,
                    "vision",
                    Run { name: &name, unit: "img/s", work: b as f64, flops, secs: &secs, peak },
                    base(is_fwd),
                    None,
                )),
                Err(e) => c.fail(&format!("vision/{name}"), e),
            }
        }
    }
    Ok(out)
}

pub fn prefill(c: &Ctx) -> Result<Vec<Figure>> {
    let (dev, set) = (c.dev, c.set);
    let l = c.subject.load(dev, 0)?;
    let m = &l.model;
    let rows = if matches!(m.net, Net::Qwen(_)) { 3 } else { 1 };
    let mut out = Vec::new();
    for &n in &set.prefill {
        if n > m.max_positions() {
            eprintln!("am3 bench: prefill {n}: longer than the model's {} positions, skipped", m.max_positions());
            continue;
        }
        let name = format!("prefill {n} tokens, one sequence");
        let ids = text_ids(m, n, n as u64);
        let pos: Vec<i32> = (0..rows).flat_map(|_| 0..n as i32).collect();
        let cu = [0, n as i32];
        let mut scratch = crate::models::common::step::StepScratch::default();
        let r = m.new_cache(dev, 1, n + 1).and_then(|mut cache| {
            measure(dev, set.warmup, set.prefill_iters, &mut || {
                cache.reset(dev, 0)?;
                m.step_ragged(
                    dev,
                    &mut cache,
                    &mut scratch,
                    crate::models::common::step::StepInput { ids: &ids, pos: &pos, cu_new: &cu, image_rows: None },
                )
                .map(|_| ())
            })
        });
        match r {
            Ok((secs, peak)) => out.extend(throughput(
                c,
                "prefill",
                Run { name: &name, unit: "tok/s", work: n as f64, flops: c.flops.lm_fwd(&[n], 1), secs: &secs, peak },
                None,
                None,
            )),
            Err(e) => c.fail(&format!("prefill/{name}"), e),
        }
    }
    Ok(out)
}
