//! Judges: score every assistant turn of every rollout for safety s ∈ [0, 1] and helpfulness
//! h ∈ [0, 1] (the GRPO reward and `am3 eval` read these), and compare two answers to the same
//! turn (eval win rates). Three implementations behind one trait, chosen by `--judge`:
//! `rules` (deterministic keyword rules), `http` (any OpenAI-compatible chat endpoint) and
//! `model` (a local Qwen2.5-VL / LLaVA-NeXT checkpoint run by this crate, scored from one
//! forward pass). `from_config` builds the one a `[judge]` table or `--judge` names.
//!
//! Files: `config.rs` (JudgeConfig, from_config), `rules.rs` (+ `rules_default.toml`, the
//! compiled-in lists), `text.rs` (normalising, refusal/keyword matching, unigram F1),
//! `parse.rs` (reading a judge model's free-text answer), `prompt.rs` (the http judge's
//! prompts), `pool.rs` (worker threads), `http.rs`, `model.rs` + `model_prompt.rs`.

use anyhow::{bail, Result};
use std::path::PathBuf;

pub mod config;
pub mod http;
pub mod model;
pub mod model_prompt;
pub mod parse;
pub mod pool;
pub mod prompt;
pub mod rules;
pub mod stream;
pub mod text;

pub use config::{from_config, JudgeConfig, OnFailure};

/// One scripted user turn, as a judge sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct JudgeTurn {
    /// The user's text, with its `<image>` markers where the images stand.
    pub user: String,
    /// The images this turn's markers refer to, in order.
    pub images: Vec<PathBuf>,
    /// A harmful request (refusing is the safe answer) or a benign one (refusing is over-refusal).
    pub harmful: bool,
    /// A reference answer for helpfulness, when the data has one.
    pub reference: Option<String>,
}

/// A finished dialogue: the scripted turns and every rollout's answers.
#[derive(Clone, Debug, PartialEq)]
pub struct JudgeDialogue {
    pub id: String,
    pub category: Option<String>,
    pub system: Option<String>,
    pub turns: Vec<JudgeTurn>,
    /// answers[rollout][turn]; a rollout may hold fewer turns than `turns` (it was cut).
    pub answers: Vec<Vec<String>>,
}

/// A judge's verdict on one assistant turn.
#[derive(Clone, Debug, PartialEq)]
pub struct TurnScore {
    /// Safety in [0, 1] (1 = safe).
    pub safety: f64,
    /// Helpfulness in [0, 1].
    pub help: f64,
    /// The judge's binary call (safety below its threshold, or an explicit "unsafe").
    pub unsafe_flag: bool,
    /// Did the answer refuse (for the over-refusal metric)?
    pub refused: bool,
    /// The judge's raw answer, for the logs (the rules judge: the rule that fired).
    pub raw: String,
    /// Scored by the documented fallback after the judge's answer stayed malformed.
    pub fallback: bool,
}

/// Scores of a batch: scores[dialogue][rollout][turn], always `turns.len()` entries per rollout;
/// None where the judge gave no score (a turn the rollout never reached, or a failure in
/// "drop" mode): the trainer leaves it out of the turn statistics, never replaces it by 0.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JudgeOutput {
    pub scores: Vec<Vec<Vec<Option<TurnScore>>>>,
    /// Turns scored (rules), requests (http: one per dialogue × rollout, retries not
    /// included) or forward passes (model).
    pub requests: usize,
    /// Answers that stayed malformed after the retries (counted into the metrics).
    pub failures: usize,
    /// Extra attempts after a failed or malformed one (http).
    pub retries: usize,
}

/// Which of two answers a judge prefers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preference {
    First,
    Second,
    Tie,
}

/// Two answers to the same turn of a dialogue (the history before it is `dialogue.answers[0]`
/// up to `turn`, or empty).
#[derive(Clone, Debug, PartialEq)]
pub struct PairQuery {
    pub dialogue: JudgeDialogue,
    pub turn: usize,
    pub first: String,
    pub second: String,
}

/// A pairwise verdict: which answer is more helpful, which is more harmless.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PairVerdict {
    pub helpful: Preference,
    pub harmless: Preference,
}

impl JudgeDialogue {
    /// Checks the shape every judge relies on: at least one turn, no rollout longer than the
    /// script.
    pub fn validate(&self) -> Result<()> {
        if self.turns.is_empty() {
            bail!("dialogue {}: no turns to judge", self.id);
        }
        for (r, a) in self.answers.iter().enumerate() {
            if a.len() > self.turns.len() {
                bail!("dialogue {}: rollout {r} has {} answers for {} turns", self.id, a.len(), self.turns.len());
            }
        }
        Ok(())
    }

    /// The images of turns 0..=turn, in order (what a judge shows with the transcript).
    pub fn images_through(&self, turn: usize) -> Vec<PathBuf> {
        self.turns.iter().take(turn + 1).flat_map(|t| t.images.iter().cloned()).collect()
    }
}

impl JudgeOutput {
    /// Appends another batch's scores and counters (for judges that work in pieces).
    pub fn extend(&mut self, other: JudgeOutput) {
        self.scores.extend(other.scores);
        self.requests += other.requests;
        self.failures += other.failures;
        self.retries += other.retries;
    }
}

/// The interface every judge implements.
pub trait Judge {
    /// A short name for logs and reports (`rules`, `http:<model>`, `model:<dir>`).
    fn name(&self) -> String;
    /// Scores every turn of every rollout.
    fn score(&mut self, dialogues: &[JudgeDialogue]) -> Result<JudgeOutput>;
    /// Pairwise verdicts, one per query, in order.
    fn compare(&mut self, pairs: &[PairQuery]) -> Result<Vec<PairVerdict>>;
    /// The http judge, which can score a dialogue in the background (see `stream::Streaming`).
    fn as_http(&self) -> Option<&http::HttpJudge> {
        None
    }
}
