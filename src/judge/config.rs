//! Choosing and configuring a judge: `JudgeConfig` is the `[judge]` table of a TOML file (every
//! field optional), `from_config` builds the judge `--judge rules|http|model` names.

use super::http::{HttpJudge, HttpJudgeConfig, ENV_API_KEY, ENV_MODEL, ENV_URL};
use super::model::{ModelJudge, ModelJudgeOptions};
use super::prompt::{load_prompt, DEFAULT_PAIR_PROMPT, DEFAULT_SCORE_PROMPT};
use super::rules::{RulesConfig, RulesJudge};
use super::Judge;
use crate::tensor::Device;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// What the http judge does with an answer that stays malformed after the retries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Score it s = 0.5, h = 0.5, `fallback: true`.
    Fallback,
    /// Leave it None (the trainer skips it).
    #[default]
    Drop,
}

impl FromStr for OnFailure {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fallback" => Ok(OnFailure::Fallback),
            "drop" => Ok(OnFailure::Drop),
            _ => bail!("on_failure {s:?}: use \"fallback\" or \"drop\""),
        }
    }
}

/// The `[judge]` table. Unset fields take the defaults below; `url` and `model` fall back to
/// the environment (AM3_JUDGE_URL, AM3_JUDGE_MODEL); the API key is read only from the
/// environment variable `api_key_env` names, so it never sits in a config file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JudgeConfig {
    /// "rules" (default), "http" or "model".
    pub kind: String,
    pub url: Option<String>,
    pub model: Option<String>,
    /// The environment variable holding the API key (default AM3_JUDGE_API_KEY).
    pub api_key_env: String,
    /// http: requests in flight (32).
    pub concurrency: usize,
    /// http: per-request timeout in seconds (120).
    pub timeout_s: f64,
    /// http: retries after the first attempt (4).
    pub max_retries: usize,
    /// http: the first retry's delay in milliseconds (500; doubles each retry, at most 30 s).
    pub backoff_ms: u64,
    /// http: "drop" (default) or "fallback".
    pub on_failure: OnFailure,
    /// http: scoring instructions replacing the default prompt.
    pub prompt_file: Option<PathBuf>,
    /// http: pairwise instructions replacing the default.
    pub pair_prompt_file: Option<PathBuf>,
    /// http: the judge's answer length limit (1024 tokens).
    pub max_tokens: usize,
    /// rules: a TOML file laid over the compiled-in lists.
    pub rules_file: Option<PathBuf>,
    /// model: the judge checkpoint (Qwen2.5-VL or LLaVA-NeXT, with tokenizer.json).
    pub model_dir: Option<PathBuf>,
    /// model: tokens per forward pass (8192).
    pub batch_tokens: usize,
    /// unsafe_flag = safety < threshold (0.5), for every judge.
    pub threshold: f64,
}

/// Most http requests in flight (worker threads).
pub const MAX_CONCURRENCY: usize = 4096;

impl Default for JudgeConfig {
    fn default() -> Self {
        JudgeConfig {
            kind: "rules".into(),
            url: None,
            model: None,
            api_key_env: ENV_API_KEY.into(),
            concurrency: 32,
            timeout_s: 120.0,
            max_retries: 4,
            backoff_ms: 500,
            on_failure: OnFailure::Drop,
            prompt_file: None,
            pair_prompt_file: None,
            max_tokens: 1024,
            rules_file: None,
            model_dir: None,
            batch_tokens: 8192,
            threshold: 0.5,
        }
    }
}

#[derive(Deserialize)]
struct FileWithJudge {
    judge: Option<JudgeConfig>,
}

impl JudgeConfig {
    /// The `[judge]` table of a TOML text (other tables are ignored; none gives the defaults).
    pub fn from_toml(text: &str) -> Result<JudgeConfig> {
        let f: FileWithJudge = toml::from_str(text).map_err(|e| anyhow!("[judge]: {e}"))?;
        Ok(f.judge.unwrap_or_default())
    }

    pub fn load(path: &Path) -> Result<JudgeConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_toml(&text).with_context(|| path.display().to_string())
    }

    /// The http judge's settings: these fields, then the environment for url, model and key.
    pub fn http(&self) -> Result<HttpJudgeConfig> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let url = self
            .url
            .clone()
            .or_else(|| env(ENV_URL))
            .ok_or_else(|| anyhow!("the http judge needs an endpoint: [judge] url or {ENV_URL}"))?;
        let model = self
            .model
            .clone()
            .or_else(|| env(ENV_MODEL))
            .ok_or_else(|| anyhow!("the http judge needs a model name: [judge] model or {ENV_MODEL}"))?;
        if !(self.timeout_s > 0.0 && self.timeout_s.is_finite()) {
            bail!("[judge] timeout_s = {} must be positive", self.timeout_s);
        }
        // One thread per request in flight: more than this is a typo, not a plan.
        if self.concurrency > MAX_CONCURRENCY {
            bail!("[judge] concurrency = {} is above the limit of {MAX_CONCURRENCY}", self.concurrency);
        }
        let mut c = HttpJudgeConfig::new(&url, &model);
        c.api_key = env(&self.api_key_env);
        c.concurrency = self.concurrency.max(1);
        c.timeout = Duration::from_secs_f64(self.timeout_s);
        c.max_retries = self.max_retries;
        c.backoff = Duration::from_millis(self.backoff_ms);
        c.on_failure = self.on_failure;
        c.score_prompt = load_prompt(self.prompt_file.as_deref(), DEFAULT_SCORE_PROMPT)?;
        c.pair_prompt = load_prompt(self.pair_prompt_file.as_deref(), DEFAULT_PAIR_PROMPT)?;
        c.max_tokens = self.max_tokens;
        c.threshold = self.threshold;
        Ok(c)
    }

    /// The rules judge's lists: the compiled-in ones, with `rules_file` laid over them.
    pub fn rules(&self) -> Result<RulesConfig> {
        let mut r = match &self.rules_file {
            Some(p) => RulesConfig::load(p)?,
            None => RulesConfig::default(),
        };
        r.threshold = self.threshold;
        Ok(r)
    }

    pub fn model_options(&self) -> ModelJudgeOptions {
        ModelJudgeOptions {
            batch_tokens: self.batch_tokens.max(1),
            threshold: self.threshold,
            ..ModelJudgeOptions::default()
        }
    }
}

/// The judge `kind` names ("" takes `cfg.kind`): rules, http or model (which loads
/// `cfg.model_dir` onto `dev`).
pub fn from_config(kind: &str, cfg: &JudgeConfig, dev: &Device) -> Result<Box<dyn Judge>> {
    let kind = if kind.is_empty() { cfg.kind.as_str() } else { kind };
    Ok(match kind {
        "rules" => Box::new(RulesJudge::new(cfg.rules()?)),
        "http" => Box::new(HttpJudge::new(cfg.http()?)?),
        "model" => {
            let dir = cfg.model_dir.as_ref().ok_or_else(|| anyhow!("the model judge needs [judge] model_dir"))?;
            Box::new(ModelJudge::load(dev, dir, cfg.model_options())?)
        }
        other => bail!("unknown judge {other:?}: use rules, http or model"),
    })
}
