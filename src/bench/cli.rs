//! `am3 bench`: the kernel suites (no `--shape`/`--model`; GPU only), the workload suites on a
//! shape or checkpoint (`--shape tiny|qwen2.5-vl-7b|llava-next-7b`, `--model DIR`; any device),
//! the memory plan alone (`--plan`), and `--compare A.json B.json`.

use super::grpo_step;
use super::measure::{card, driver, git_commit, memory_source};
use super::plan::{Plan, PlanInput};
use super::report::{compare, PlanCheck, PlanLine, Report};
use super::rollout;
use super::shape::{FlopModel, Subject};
use super::synth::TempDir;
use super::workloads::{self, Ctx, Measured, Settings};
use super::{format_table, run_suites, SUITES};
use crate::tensor::{Device, DevicePref};
use anyhow::{bail, Result};
use serde_json::json;
use std::cell::RefCell;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Smaller sizes and fewer runs.
    #[arg(long)]
    pub quick: bool,
    /// Run the workload suites on random weights of this shape: tiny, qwen2.5-vl-7b, llava-next-7b.
    #[arg(long)]
    pub shape: Option<String>,
    /// Run the workload suites on this checkpoint (HF layout) instead.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Tokens of the train suite's step (default 4096 on a GPU, 256 on the CPU).
    #[arg(long)]
    pub seq: Option<usize>,
    /// Write the card, driver, commit, shape and every figure (with --plan: the plan) as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Print B/A for every figure two --json files share.
    #[arg(long, num_args = 2, value_names = ["A", "B"])]
    pub compare: Option<Vec<PathBuf>>,
    /// Print the memory plan of the shape (or --model) and stop; nothing is allocated.
    #[arg(long)]
    pub plan: bool,
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DevicePref,
    /// Suites to run (default all). Without --shape/--model the kernel suites: norms,
    /// elementwise, attention, patch_embed, logprob, train7b, lora, rollout. With them the
    /// workload suites: train, vision, prefill, rollout, grpo.
    pub suites: Vec<String>,
}

type Workload = (&'static str, fn(&Ctx) -> Result<Vec<super::report::Figure>>);

pub const WORKLOADS: [Workload; 5] = [
    ("train", workloads::train),
    ("vision", workloads::vision),
    ("prefill", workloads::prefill),
    ("rollout", rollout::suite),
    ("grpo", grpo_step::suite),
];

pub fn run(a: &BenchArgs) -> Result<()> {
    if let Some(files) = &a.compare {
        let (x, y) = (Report::load(&files[0])?, Report::load(&files[1])?);
        print!("{}", compare(&x, &y, &files[0].display().to_string(), &files[1].display().to_string())?);
        return Ok(());
    }
    if a.shape.is_none() && a.model.is_none() && !a.plan {
        for s in &a.suites {
            if !SUITES.iter().any(|k| k.0 == s) {
                bail!(
                    "unknown kernel suite {s:?} (kernel suites: {}; workload suites need --shape or --model)",
                    SUITES.iter().map(|k| k.0).collect::<Vec<_>>().join(", ")
                );
            }
        }
        let dev = Device::pick(a.device)?;
        if !dev.is_cuda() {
            println!("bench: skipped: no CUDA device");
            return Ok(());
        }
        println!("device: {}", dev.name());
        print!("{}", format_table(&run_suites(&dev, a.quick, &a.suites)?));
        return Ok(());
    }
    let shape = a.shape.as_deref().or(if a.model.is_none() { Some("tiny") } else { None });
    let subject = Subject::new(shape, a.model.as_deref())?;
    let dev = Device::pick(a.device)?;
    let skeleton = subject.skeleton()?;
    // A 7B model runs on a GPU: its plan uses the GPU's sizes wherever it is printed.
    let params: usize = skeleton.param_entries().iter().map(|(r, _)| r.numel()).sum();
    let set = Settings::new(dev.is_cuda() || params > 1_000_000_000, a.quick, a.seq);
    if set.seq < 16 || set.seq > skeleton.max_positions() {
        bail!(
            "--seq {} is out of range: allowed [16, {}] (the model's max_position_embeddings)",
            set.seq,
            skeleton.max_positions()
        );
    }
    let kv_slots = set.decode_batches.iter().copied().max().unwrap_or(1);
    let plan = Plan::new(&skeleton, PlanInput { seq: set.seq, kv_slots, kv_len: set.decode_len() });
    let free = dev.available_memory().map(|(f, src)| (f, src.to_string()));
    println!(
        "memory plan of {} (from the config; nothing allocated yet):\n{}",
        subject.name,
        plan.describe(free.clone(), dev.is_cuda())
    );
    if a.plan {
        if let Some(p) = &a.json {
            let v = json!({"card": card(&dev), "driver": driver(&dev), "commit": git_commit(), "shape": subject.name, "device": dev.name(), "free_bytes": free.map(|f| f.0), "plan": plan.to_json()});
            std::fs::write(p, serde_json::to_string_pretty(&v)?)?;
        }
        return Ok(());
    }
    if !dev.is_cuda() {
        let need = plan.cpu.resident(false) as u64;
        if let Some((f, src)) = &free {
            if need > *f {
                bail!("the {} workloads need {:.1} GiB of host memory for weights, gradients and AdamW state alone ({src}: {:.1} GiB free); run them on a GPU, or see the plan above", subject.name, need as f64 / (1u64 << 30) as f64, *f as f64 / (1u64 << 30) as f64);
            }
        }
    }
    let selected: Vec<&Workload> = if a.suites.is_empty() {
        WORKLOADS.iter().collect()
    } else {
        let mut v = Vec::new();
        for s in &a.suites {
            match WORKLOADS.iter().find(|w| w.0 == s) {
                Some(w) => v.push(w),
                None => bail!("unknown workload suite {s:?} (train, vision, prefill, rollout, grpo)"),
            }
        }
        v
    };
    let tmp = TempDir::new("bench")?;
    let c = Ctx {
        dev: &dev,
        subject: &subject,
        skeleton: &skeleton,
        set: &set,
        tmp: &tmp.0,
        flops: FlopModel::of(&skeleton),
        qwen7b: subject.baselines_apply(&skeleton),
        failures: RefCell::new(Vec::new()),
        measured: RefCell::new(Measured::default()),
    };
    let mut figures = Vec::new();
    for (name, f) in selected {
        let t = Instant::now();
        eprintln!("am3 bench: {name} on {} ({})", subject.name, dev.name());
        match f(&c) {
            Ok(v) => figures.extend(v),
            Err(e) => c.fail(name, e),
        }
        eprintln!("am3 bench: {name} done in {:.1} s", t.elapsed().as_secs_f64());
    }
    let report = Report {
        card: card(&dev),
        driver: driver(&dev),
        commit: git_commit(),
        shape: subject.name.clone(),
        device: dev.name(),
        settings: serde_json::to_value(&set)?,
        flops: c.flops.describe(),
        plan: plan.to_json(),
        plan_check: plan_check(&plan, &c.measured.borrow(), &dev),
        figures,
        failures: c.failures.borrow().clone(),
    };
    print!("{}", report.table());
    if let Some(p) = &a.json {
        report.save(p)?;
        println!("wrote {}", p.display());
    }
    Ok(())
}

/// The plan's components against the buffers the suites allocated, and its peaks against the
/// measured ones.
fn plan_check(plan: &Plan, m: &Measured, dev: &Device) -> Option<PlanCheck> {
    let cuda = dev.is_cuda();
    let p = plan.layout(cuda);
    let mut buffers = Vec::new();
    let mut line = |name: &str, plan_b: usize, got: Option<usize>| {
        if let Some(g) = got {
            buffers.push(PlanLine { name: name.into(), plan_bytes: plan_b as f64, measured_bytes: g as f64 });
        }
    };
    line("weights", p.weights, m.weights);
    line("f32 master + AdamW moments", p.master + p.adamw, m.optimizer);
    line(if cuda { "gradients (bf16 linear weights, f32 rest)" } else { "gradients (f32)" }, p.grads(cuda), m.grads);
    line("KV cache (decode suite, largest batch)", p.kv_cache, m.kv_cache);
    let plan_total: f64 = buffers.iter().map(|l| l.plan_bytes).sum();
    let measured_total: f64 = buffers.iter().map(|l| l.measured_bytes).sum();
    let mut peaks = Vec::new();
    if let Some(pk) = m.sft_peak {
        peaks.push(PlanLine {
            name: "SFT step, recompute, vision trained".into(),
            plan_bytes: p.sft_step(cuda, true) as f64,
            measured_bytes: pk as f64,
        });
    }
    if let Some((pl, pk)) = m.grpo_peak {
        peaks.push(PlanLine {
            name: "GRPO step (the stage's MemoryPlan)".into(),
            plan_bytes: pl as f64,
            measured_bytes: pk as f64,
        });
    }
    if buffers.is_empty() && peaks.is_empty() {
        return None;
    }
    Some(PlanCheck {
        buffers,
        plan_total,
        measured_total,
        ratio: measured_total / plan_total.max(1.0),
        peaks,
        peak_source: memory_source(dev).into(),
    })
}
