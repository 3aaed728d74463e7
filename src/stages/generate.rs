//! `am3 generate`: regenerates every assistant turn of every dialogue of a JSONL file (or
//! answers one `--prompt`) with the rollout engine, and writes one JSON line per rollout.

use crate::data::dataset::{load_jsonl_with, LoadOptions, Purpose};
use crate::ops::sample::SampleParams;
use crate::rollout::{generate, DialogueSpec, Rollout, RolloutConfig, RolloutStats};
use crate::stages::sft::load_model;
use crate::tensor::{Device, DevicePref};
use crate::train::atomic::write_file_with;
use crate::train::progress::Progress;
use anyhow::{bail, Result};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct GenerateArgs {
    /// Model directory (HF layout). Default: the embedded tiny model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Dialogues (JSON Lines, the `am3 sft` format; assistant turns optional and ignored).
    #[arg(long, conflicts_with = "prompt")]
    pub data: Option<PathBuf>,
    /// One prompt to answer instead of a data file.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Images for `--prompt` (repeatable), shown before its text.
    #[arg(long, requires = "prompt")]
    pub image: Vec<PathBuf>,
    /// Output JSON Lines (default: stdout summary only for --prompt, generations.jsonl for --data).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Rollouts per dialogue.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub n: u64,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1] (1 = off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Keep the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Argmax decoding (temperature, top-k and top-p are ignored).
    #[arg(long)]
    pub greedy: bool,
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_new_tokens: u64,
    /// Rollouts decoded at once (KV-cache slots).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub max_batch: u64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DevicePref,
}

impl GenerateArgs {
    pub fn sample_params(&self) -> Result<SampleParams> {
        if self.greedy {
            return Ok(SampleParams::greedy());
        }
        SampleParams::new(self.temperature, self.top_k, self.top_p)
    }
}

/// One rollout as a JSON object.
pub fn rollout_json(id: &str, r: &Rollout) -> serde_json::Value {
    let turns: Vec<_> = r
        .turns
        .iter()
        .map(|t| json!({"text": t.text, "ids": t.ids, "start": t.span.start, "end": t.span.end, "stopped": t.stopped, "cut": t.cut}))
        .collect();
    json!({"id": id, "rollout": r.index, "turns": turns})
}

pub fn print_stats(s: &RolloutStats) {
    let rate = |n: usize, t: f64| if t > 0.0 { n as f64 / t } else { 0.0 };
    println!(
        "generate: {} rollouts, {} turns ({} cut), prefill {} tokens ({:.0} tok/s), decode {} tokens ({:.1} tok/s), {} steps, {:.2} s; KV cache {} slots × {} tokens ({:.1} MiB)",
        s.rollouts,
        s.turns,
        s.cut_turns,
        s.prefill_tokens,
        rate(s.prefill_tokens, s.prefill_s),
        s.decode_tokens,
        rate(s.decode_tokens, s.total_s - s.vision_s),
        s.steps,
        s.total_s,
        s.slots,
        s.max_len,
        s.cache_bytes as f64 / 1048576.0
    );
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    let dev = Device::pick(args.device)?;
    let l = load_model(&dev, args.model.as_deref(), 0)?;
    let dialogues = match (&args.data, &args.prompt) {
        (Some(path), _) => {
            let loaded = load_jsonl_with(path, LoadOptions { skip_bad: false, purpose: Purpose::Prompts })?;
            loaded.samples.iter().map(DialogueSpec::from_sample).collect::<Vec<_>>()
        }
        (None, Some(p)) => vec![DialogueSpec::single(p, args.image.clone())],
        (None, None) => bail!("give --data FILE.jsonl or --prompt TEXT"),
    };
    let cfg = RolloutConfig {
        n: args.n as usize,
        max_new_tokens: args.max_new_tokens as usize,
        sample: args.sample_params()?,
        seed: args.seed,
        max_batch: (args.max_batch as usize).max(args.n as usize),
        max_len: None,
    };
    let total = dialogues.len() * cfg.n;
    let bar = Progress::new(total as u64, "generate");
    let (rollouts, _bank, stats) =
        generate(&dev, &l.model, &l.tok, &l.pp, &dialogues, &cfg, &mut |done, _| bar.update(done as u64, ""))?;
    bar.finish("");
    let out = args.out.clone().or_else(|| args.data.as_ref().map(|_| PathBuf::from("generations.jsonl")));
    match out {
        Some(path) => {
            write_file_with(&path, |w| {
                for r in &rollouts {
                    writeln!(w, "{}", rollout_json(&dialogues[r.dialogue].id, r))?;
                }
                Ok(())
            })?;
            println!("wrote {} rollouts to {}", rollouts.len(), path.display());
        }
        None => {
            for r in &rollouts {
                for t in &r.turns {
                    println!("{}", t.text);
                }
            }
        }
    }
    print_stats(&stats);
    Ok(())
}
