//! `report.json` (every figure with its interval and counts) and the per-dialogue
//! answers-and-scores JSONL, both written atomically (temp file, then rename) so a killed eval
//! never leaves a half-written report behind.

use super::metrics::Metrics;
use super::record::{EvalConfig, EvalRecord};
use crate::judge::TurnScore;
use crate::train::atomic;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

/// The whole eval report: the model's metrics and, when compared, the baseline's.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The evaluated model (a checkpoint path or name).
    pub model: String,
    /// The judge's name (`Judge::name`).
    #[serde(default)]
    pub judge: Option<String>,
    pub metrics: Metrics,
    #[serde(default)]
    pub baseline: Option<String>,
    #[serde(default)]
    pub baseline_metrics: Option<Metrics>,
}

/// Writes `report` as pretty JSON to `path`, atomically.
pub fn write_report(path: impl AsRef<Path>, report: &Report) -> Result<()> {
    let json = serde_json::to_vec_pretty(report).context("serializing the eval report")?;
    atomic::write_file(path, &json)
}

pub fn read_report(path: impl AsRef<Path>) -> Result<Report> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

#[derive(Serialize)]
struct ScoreLine<'a> {
    safety: f64,
    help: f64,
    unsafe_flag: bool,
    refused: bool,
    fallback: bool,
    raw: &'a str,
}

#[derive(Serialize)]
struct TurnLine<'a> {
    turn_index: usize,
    harmful: bool,
    answer: Option<&'a str>,
    score: Option<ScoreLine<'a>>,
    /// Unsafe by the eval's rule (flag or s < threshold); None without a score.
    #[serde(rename = "unsafe")]
    is_unsafe: Option<bool>,
}

#[derive(Serialize)]
struct DialogueLine<'a> {
    id: &'a str,
    category: Option<&'a str>,
    harmful: bool,
    labels: &'a [bool],
    /// rollouts[r] = that rollout's turns (a cut rollout has fewer).
    rollouts: Vec<Vec<TurnLine<'a>>>,
}

fn score_line(s: &TurnScore) -> ScoreLine<'_> {
    ScoreLine {
        safety: s.safety,
        help: s.help,
        unsafe_flag: s.unsafe_flag,
        refused: s.refused,
        fallback: s.fallback,
        raw: &s.raw,
    }
}

/// One JSON line per dialogue: its labels and every rollout's answers and scores.
pub fn write_answers_jsonl(path: impl AsRef<Path>, records: &[EvalRecord], config: &EvalConfig) -> Result<()> {
    atomic::write_file_with(path, |w| {
        for rec in records {
            let rollouts = rec
                .scores
                .iter()
                .enumerate()
                .map(|(r, scores)| {
                    let answers = rec.answers.get(r).map(Vec::as_slice).unwrap_or(&[]);
                    (0..scores.len().max(answers.len()))
                        .map(|t| {
                            let score = scores.get(t).and_then(Option::as_ref);
                            TurnLine {
                                turn_index: t,
                                harmful: rec.labels.get(t).copied().unwrap_or(false),
                                answer: answers.get(t).map(String::as_str),
                                score: score.map(score_line),
                                is_unsafe: score.map(|s| config.is_unsafe(s)),
                            }
                        })
                        .collect()
                })
                .collect();
            let line = DialogueLine {
                id: &rec.id,
                category: rec.category.as_deref(),
                harmful: rec.is_harmful(),
                labels: &rec.labels,
                rollouts,
            };
            serde_json::to_writer(&mut *w, &line)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    })
}
