//! `am3 eval`: generate answers to a file's dialogues with the rollout engine, judge them, and
//! report the safety figures of `src/eval/` (optionally against a baseline model, with pairwise
//! win rates taken in both orders).
//!
//! `--history given` keeps the data's scripted history: the data's assistant turns (or, for
//! SafeMT, `meta.scripted_replies`) are the previous answers and only the last user turn is
//! answered: the rollout engine takes the scripted replies as the dialogue's history
//! (`DialogueSpec::history`, see [`generate_given`]), prefills them as one prompt and decodes only
//! the last reply.

use crate::data::dataset::{load_jsonl_with, LoadOptions, Purpose, Role, Sample};
use crate::data::safemt::load_safemt;
use crate::eval::{
    compute_metrics, metrics_table, write_answers_jsonl, write_report, write_turn_chart, EvalConfig, EvalRecord,
    HistoryMode, Metrics, PairRecord, Report,
};
use crate::judge::{from_config, Judge, JudgeConfig, JudgeDialogue, PairQuery, PairVerdict, TurnScore};
use crate::ops::sample::SampleParams;
use crate::rollout::{generate, DialogueSpec, ImageBank, Rollout, RolloutConfig, RolloutStats};
use crate::stages::model::{Processor, VlModel};
use crate::stages::sft::load_model;
use crate::tensor::{Device, DevicePref};
use crate::train::atomic::write_file_with;
use crate::train::progress::Progress;
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// Input layouts `--format` reads.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DataFormat {
    /// This crate's JSONL (the `am3 sft` format; assistant turns optional).
    #[default]
    Jsonl,
    /// The SafeMT benchmark layout (a JSON list or JSONL of records).
    Safemt,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum History {
    /// The model answers every turn; its own answers are the history.
    #[default]
    Generated,
    /// The data's assistant turns are the history; only the last user turn is answered.
    Given,
}

impl From<History> for HistoryMode {
    fn from(h: History) -> HistoryMode {
        match h {
            History::Generated => HistoryMode::Generated,
            History::Given => HistoryMode::Given,
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// Model directory (HF layout). Default: the embedded tiny model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Dialogues to answer (default: the bundled data/demo/eval.jsonl).
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "jsonl")]
    pub format: DataFormat,
    /// Leave invalid data lines out (each still reported) instead of stopping.
    #[arg(long)]
    pub skip_bad: bool,
    /// rules | http | model (default: the config's `kind`, else rules).
    #[arg(long, value_parser = ["rules", "http", "model"])]
    pub judge: Option<String>,
    /// A TOML file with a `[judge]` table.
    #[arg(long)]
    pub judge_config: Option<PathBuf>,
    /// A second model answering the same dialogues: its metrics and pairwise win rates.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// Rollouts per dialogue (more than 1 samples; see --temperature).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub n: u64,
    #[arg(long, default_value = "runs/eval")]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "generated")]
    pub history: History,
    /// A turn is also unsafe when its safety s is below this.
    #[arg(long, allow_negative_numbers = true)]
    pub threshold: Option<f64>,
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_new_tokens: u64,
    /// Sampling temperature (default 1 when sampling).
    #[arg(long, allow_negative_numbers = true, conflicts_with = "greedy")]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass in (0, 1] (1 = off).
    #[arg(long, allow_negative_numbers = true, conflicts_with = "greedy")]
    pub top_p: Option<f32>,
    /// Keep the k most likely tokens (0 = off).
    #[arg(long, conflicts_with = "greedy")]
    pub top_k: Option<usize>,
    /// Argmax decoding (the default with --n 1 and no sampling flag).
    #[arg(long)]
    pub greedy: bool,
    /// Rollouts decoded at once (KV-cache slots).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub max_batch: u64,
    /// Sampling and bootstrap seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DevicePref,
    /// Bootstrap resamples for the 95 % intervals (0: none).
    #[arg(long, default_value_t = 1000)]
    pub bootstrap: usize,
}

impl EvalArgs {
    /// Greedy unless N > 1 or a sampling flag is given.
    pub fn sample_params(&self) -> Result<SampleParams> {
        let sampling = self.temperature.is_some() || self.top_p.is_some() || self.top_k.is_some() || self.n > 1;
        if self.greedy || !sampling {
            return Ok(SampleParams::greedy());
        }
        SampleParams::new(self.temperature.unwrap_or(1.0), self.top_k.unwrap_or(0), self.top_p.unwrap_or(1.0))
    }

    pub fn options(&self) -> Result<EvalOptions> {
        let n = self.n as usize;
        Ok(EvalOptions {
            rollout: RolloutConfig {
                n,
                max_new_tokens: self.max_new_tokens as usize,
                sample: self.sample_params()?,
                seed: self.seed,
                max_batch: (self.max_batch as usize).max(n),
                max_len: None,
            },
            eval: EvalConfig {
                threshold: self.threshold,
                history: self.history.into(),
                resamples: self.bootstrap,
                seed: self.seed,
                ..EvalConfig::default()
            },
            progress: true,
        })
    }
}

/// How to generate and what counts.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    pub rollout: RolloutConfig,
    /// Its `history` also decides how answers are generated.
    pub eval: EvalConfig,
    /// Show progress bars (or log lines) on stderr.
    pub progress: bool,
}

impl Default for EvalOptions {
    /// Greedy, one rollout, 64 new tokens, generated history, 1000 resamples.
    fn default() -> Self {
        EvalOptions {
            rollout: RolloutConfig {
                n: 1,
                max_new_tokens: 64,
                sample: SampleParams::greedy(),
                seed: 0,
                max_batch: 64,
                max_len: None,
            },
            eval: EvalConfig::default(),
            progress: true,
        }
    }
}

/// The bundled eval dialogues (`AM3_DEMO_EVAL`, else data/demo/eval.jsonl here or in the
/// source tree).
pub fn demo_eval_data() -> PathBuf {
    if let Ok(p) = std::env::var("AM3_DEMO_EVAL") {
        return PathBuf::from(p);
    }
    let local = PathBuf::from("data/demo/eval.jsonl");
    if local.is_file() {
        return local;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/demo/eval.jsonl")
}

/// Reads the dialogues (prompt purpose: assistant turns optional). Bad lines are errors as
/// `file:line: reason`, or with `skip_bad` are printed and left out.
pub fn load_dialogues(path: &Path, format: DataFormat, skip_bad: bool) -> Result<Vec<Sample>> {
    match format {
        DataFormat::Jsonl => {
            let loaded = load_jsonl_with(path, LoadOptions { skip_bad, purpose: Purpose::Prompts })?;
            for e in &loaded.errors {
                eprintln!("am3 eval: skipped {e}");
            }
            Ok(loaded.samples)
        }
        DataFormat::Safemt => load_safemt(path),
    }
}

/// The scripted answers to every user turn but the last: the assistant message after each user
/// turn, else `meta.scripted_replies` (SafeMT).
pub fn scripted_history(s: &Sample) -> Result<Vec<String>> {
    let users: Vec<usize> =
        s.messages.iter().enumerate().filter(|(_, m)| m.role == Role::User).map(|(j, _)| j).collect();
    let need = users.len().saturating_sub(1);
    let meta: Vec<String> = s
        .meta
        .as_ref()
        .and_then(|m| m.get("scripted_replies"))
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect())
        .unwrap_or_default();
    let mut out = Vec::with_capacity(need);
    for (k, &j) in users.iter().take(need).enumerate() {
        let reply = s
            .messages
            .get(j + 1)
            .filter(|m| m.role == Role::Assistant)
            .map(|m| m.content.clone())
            .or_else(|| meta.get(k).cloned());
        match reply {
            Some(r) => out.push(r),
            None => bail!(
                "dialogue {} ({}): --history given needs the scripted answer to user turn {} (an assistant turn after it, or meta.scripted_replies)",
                s.id,
                s.origin,
                k + 1
            ),
        }
    }
    Ok(out)
}

pub use crate::grpo::judged::judge_dialogue;

/// A dialogue for [`generate_given`]: its user turns and the scripted answers to all but the last.
#[derive(Clone, Debug, PartialEq)]
pub struct GivenSpec {
    pub dialogue: DialogueSpec,
    /// history[k] answers user turn k; one fewer than the turns.
    pub history: Vec<String>,
}

/// The last turn of every dialogue, answered `cfg.n` times after its scripted history, by the
/// rollout engine (`DialogueSpec::history`: the prompt is the engine's multi-turn layout with the
/// scripted replies in place of generated ones). Returns rollouts with one turn each (the last),
/// ordered by (dialogue, index).
pub fn generate_given(
    dev: &Device, model: &VlModel, tok: &Tokenizer, pp: &Processor, specs: &[GivenSpec], cfg: &RolloutConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<Rollout>, ImageBank, RolloutStats)> {
    let dialogues: Vec<DialogueSpec> =
        specs.iter().map(|g| DialogueSpec { history: g.history.clone(), ..g.dialogue.clone() }).collect();
    generate(dev, model, tok, pp, &dialogues, cfg, progress)
}

/// Generates the answers of `model` to every sample: JudgeDialogues with `answers[rollout]`
/// filled (with given history: the scripted answers, then the generated last one).
pub fn generate_answers(
    dev: &Device, model: &VlModel, tok: &Tokenizer, pp: &Processor, samples: &[Sample], opts: &EvalOptions, label: &str,
) -> Result<Vec<JudgeDialogue>> {
    let mut dialogues: Vec<JudgeDialogue> = samples.iter().map(judge_dialogue).collect();
    let total = samples.len() * opts.rollout.n;
    let bar = opts.progress.then(|| Progress::new(total as u64, label));
    let mut tick = |done: usize, _: usize| {
        if let Some(b) = &bar {
            b.update(done as u64, "")
        }
    };
    match opts.eval.history {
        HistoryMode::Generated => {
            let specs: Vec<DialogueSpec> = samples.iter().map(DialogueSpec::from_sample).collect();
            let (rollouts, _, _) = generate(dev, model, tok, pp, &specs, &opts.rollout, &mut tick)?;
            for r in rollouts {
                dialogues[r.dialogue].answers.push(r.turns.into_iter().map(|t| t.text).collect());
            }
        }
        HistoryMode::Given => {
            let mut specs = Vec::with_capacity(samples.len());
            for s in samples {
                specs.push(GivenSpec { dialogue: DialogueSpec::from_sample(s), history: scripted_history(s)? });
            }
            let (rollouts, _, _) = generate_given(dev, model, tok, pp, &specs, &opts.rollout, &mut tick)?;
            for r in rollouts {
                let mut a = specs[r.dialogue].history.clone();
                a.extend(r.turns.into_iter().map(|t| t.text));
                dialogues[r.dialogue].answers.push(a);
            }
        }
    }
    if let Some(b) = &bar {
        b.finish("");
    }
    Ok(dialogues)
}

/// Answers judged per call, so the progress bar moves while an http judge keeps its requests
/// in flight.
const JUDGE_CHUNK: usize = 128;

/// Scores every dialogue's answers and returns their EvalRecords.
pub fn judge_records(
    judge: &mut dyn Judge, dialogues: &[JudgeDialogue], progress: Option<&str>,
) -> Result<Vec<EvalRecord>> {
    let bar = progress.map(|label| Progress::new(dialogues.len() as u64, label));
    let mut records = Vec::with_capacity(dialogues.len());
    let mut start = 0;
    while start < dialogues.len() {
        let mut end = start;
        let mut answers = 0;
        while end < dialogues.len() && (end == start || answers < JUDGE_CHUNK) {
            answers += dialogues[end].answers.iter().map(Vec::len).sum::<usize>();
            end += 1;
        }
        let chunk = &dialogues[start..end];
        let out = judge.score(chunk).with_context(|| format!("judge {}", judge.name()))?;
        if out.scores.len() != chunk.len() {
            bail!("judge {} gave scores for {} of {} dialogues", judge.name(), out.scores.len(), chunk.len());
        }
        for (d, scores) in chunk.iter().zip(out.scores) {
            records.push(EvalRecord::from_judged(d, trim_scores(d, scores)?));
        }
        start = end;
        if let Some(b) = &bar {
            b.update(start as u64, "");
        }
    }
    if let Some(b) = &bar {
        b.finish("");
    }
    Ok(records)
}

/// A judge returns one entry per scripted turn; turns a rollout never reached are unanswered,
/// not missing scores, so each rollout keeps only as many as it has answers.
fn trim_scores(d: &JudgeDialogue, mut scores: Vec<Vec<Option<TurnScore>>>) -> Result<Vec<Vec<Option<TurnScore>>>> {
    if scores.len() != d.answers.len() {
        bail!("dialogue {}: the judge scored {} rollouts of {}", d.id, scores.len(), d.answers.len());
    }
    for (s, a) in scores.iter_mut().zip(&d.answers) {
        s.truncate(a.len());
    }
    Ok(scores)
}

/// Pairwise verdicts of the model's against the baseline's answers, both orders, for every
/// judged (dialogue, turn) and rollout r of each (r-th against r-th). Both orders show the
/// model's rollout as the history, so the orders differ only in position.
pub fn compare_pairs(
    judge: &mut dyn Judge, model: &[JudgeDialogue], baseline: &[JudgeDialogue], history: HistoryMode,
    show_progress: bool,
) -> Result<Vec<PairRecord>> {
    if model.len() != baseline.len() {
        bail!("compare: {} model dialogues, {} baseline dialogues", model.len(), baseline.len());
    }
    // (record index, query index of the model-first order or None when an answer is missing).
    let mut records: Vec<(PairRecord, Option<usize>)> = Vec::new();
    let mut queries: Vec<PairQuery> = Vec::new();
    for (m, b) in model.iter().zip(baseline) {
        if m.id != b.id {
            bail!("compare: dialogue {} against {}", m.id, b.id);
        }
        let k = m.turns.len();
        let turns = match history {
            HistoryMode::Generated => 0..k,
            HistoryMode::Given => k.saturating_sub(1)..k,
        };
        for r in 0..m.answers.len().min(b.answers.len()) {
            let mut d = m.clone();
            d.answers = vec![m.answers[r].clone()];
            for t in turns.clone() {
                let rec = PairRecord { id: m.id.clone(), turn: t, model_first: None, baseline_first: None };
                match (m.answers[r].get(t), b.answers[r].get(t)) {
                    (Some(x), Some(y)) => {
                        records.push((rec, Some(queries.len())));
                        queries.push(PairQuery { dialogue: d.clone(), turn: t, first: x.clone(), second: y.clone() });
                        queries.push(PairQuery { dialogue: d.clone(), turn: t, first: y.clone(), second: x.clone() });
                    }
                    _ => records.push((rec, None)),
                }
            }
        }
    }
    let bar = show_progress.then(|| Progress::new(queries.len() as u64, "compare"));
    let mut verdicts: Vec<PairVerdict> = Vec::with_capacity(queries.len());
    for chunk in queries.chunks(JUDGE_CHUNK) {
        let v = judge.compare(chunk).with_context(|| format!("judge {} (pairwise)", judge.name()))?;
        if v.len() != chunk.len() {
            bail!("judge {} gave {} verdicts for {} pairs", judge.name(), v.len(), chunk.len());
        }
        verdicts.extend(v);
        if let Some(b) = &bar {
            b.update(verdicts.len() as u64, "");
        }
    }
    if let Some(b) = &bar {
        b.finish("");
    }
    Ok(records
        .into_iter()
        .map(|(mut rec, q)| {
            if let Some(q) = q {
                rec.model_first = Some(verdicts[q]);
                rec.baseline_first = Some(verdicts[q + 1]);
            }
            rec
        })
        .collect())
}

/// Generates, judges and measures one model on `samples` (no baseline): the metrics and the
/// judged records. For callers holding a model in memory (`am3 demo` before and after GRPO).
pub fn evaluate(
    dev: &Device, model: &VlModel, tok: &Tokenizer, pp: &Processor, samples: &[Sample], judge: &mut dyn Judge,
    opts: &EvalOptions,
) -> Result<(Metrics, Vec<EvalRecord>)> {
    let dialogues = generate_answers(dev, model, tok, pp, samples, opts, "generate")?;
    let records = judge_records(judge, &dialogues, opts.progress.then_some("judge"))?;
    let metrics = compute_metrics(&records, &[], &opts.eval)?;
    Ok((metrics, records))
}

/// The judge `--judge` and `--judge-config` name.
pub fn judge_config(args: &EvalArgs) -> Result<(String, JudgeConfig)> {
    let cfg = match &args.judge_config {
        Some(p) => JudgeConfig::load(p)?,
        None => JudgeConfig::default(),
    };
    let kind = args.judge.clone().unwrap_or_else(|| cfg.kind.clone());
    // Fail before generating rather than after.
    match kind.as_str() {
        "rules" => drop(cfg.rules()?),
        "http" => drop(cfg.http()?),
        "model" if cfg.model_dir.is_none() => bail!("--judge model needs [judge] model_dir in --judge-config"),
        "model" => {}
        other => bail!("unknown judge {other:?}: use rules, http or model"),
    }
    Ok((kind, cfg))
}

fn model_name(dir: Option<&Path>) -> String {
    dir.map(|d| d.display().to_string()).unwrap_or_else(|| "tiny (embedded)".to_string())
}

/// `am3 eval`: writes report.json, answers.jsonl (and baseline_answers.jsonl, pairs.jsonl with a
/// baseline) and turns.svg under `--out`, prints the table, and returns the report.
pub fn run(args: &EvalArgs) -> Result<Report> {
    let dev = Device::pick(args.device)?;
    let opts = args.options()?;
    let (kind, jcfg) = judge_config(args)?;
    let data = args.data.clone().unwrap_or_else(demo_eval_data);
    let samples = load_dialogues(&data, args.format, args.skip_bad)?;
    if samples.is_empty() {
        bail!("{}: no dialogues", data.display());
    }
    let history = opts.eval.history;
    if history == HistoryMode::Given {
        // Check every dialogue's history before loading a model.
        for s in &samples {
            scripted_history(s)?;
        }
    }
    let name = model_name(args.model.as_deref());
    println!(
        "am3 eval: {} dialogues from {}, model {name}, judge {kind}, history {history:?}",
        samples.len(),
        data.display()
    );

    let answers = {
        let l = load_model(&dev, args.model.as_deref(), 0)?;
        generate_answers(&dev, &l.model, &l.tok, &l.pp, &samples, &opts, "generate")?
    };
    let base = match &args.baseline {
        Some(dir) => {
            let l = load_model(&dev, Some(dir), 0)?;
            Some((model_name(Some(dir)), generate_answers(&dev, &l.model, &l.tok, &l.pp, &samples, &opts, "baseline")?))
        }
        None => None,
    };

    let mut judge = from_config(&kind, &jcfg, &dev)?;
    let records = judge_records(judge.as_mut(), &answers, opts.progress.then_some("judge"))?;
    let (base_records, pairs) = match &base {
        Some((_, b)) => (
            Some(judge_records(judge.as_mut(), b, opts.progress.then_some("judge baseline"))?),
            compare_pairs(judge.as_mut(), &answers, b, history, opts.progress)?,
        ),
        None => (None, Vec::new()),
    };
    let metrics = compute_metrics(&records, &pairs, &opts.eval)?;
    let base_metrics = base_records.as_ref().map(|r| compute_metrics(r, &[], &opts.eval)).transpose()?;

    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let report = Report {
        model: name.clone(),
        judge: Some(judge.name()),
        metrics,
        baseline: base.as_ref().map(|b| b.0.clone()),
        baseline_metrics: base_metrics,
    };
    write_report(args.out.join("report.json"), &report)?;
    write_answers_jsonl(args.out.join("answers.jsonl"), &records, &opts.eval)?;
    if let Some(r) = &base_records {
        write_answers_jsonl(args.out.join("baseline_answers.jsonl"), r, &opts.eval)?;
        write_pairs_jsonl(&args.out.join("pairs.jsonl"), &pairs)?;
    }
    let baseline_view = base.as_ref().zip(report.baseline_metrics.as_ref()).map(|(b, m)| (b.0.as_str(), m));
    write_turn_chart(args.out.join("turns.svg"), (&name, &report.metrics), baseline_view)?;
    print!("{}", metrics_table(&name, &report.metrics, baseline_view));
    println!("wrote {}/{{report.json, answers.jsonl, turns.svg}}", args.out.display());
    Ok(report)
}

fn pref(p: crate::judge::Preference) -> &'static str {
    match p {
        crate::judge::Preference::First => "first",
        crate::judge::Preference::Second => "second",
        crate::judge::Preference::Tie => "tie",
    }
}

/// One line per compared (dialogue, turn, rollout): the verdicts of both orders.
fn write_pairs_jsonl(path: &Path, pairs: &[PairRecord]) -> Result<()> {
    let v = |x: &Option<PairVerdict>| x.map(|v| json!({"helpful": pref(v.helpful), "harmless": pref(v.harmless)}));
    write_file_with(path, |w| {
        for p in pairs {
            writeln!(
                w,
                "{}",
                json!({"id": p.id, "turn_index": p.turn, "model_first": v(&p.model_first), "baseline_first": v(&p.baseline_first)})
            )?;
        }
        Ok(())
    })
}
