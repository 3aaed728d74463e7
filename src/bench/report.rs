//! What the workload suites measure and how it is shown: one `Figure` per measured quantity
//! (median and min–max over the timed runs), the table with the baseline column, the JSON file
//! (`--json`) and the ratios between two such files (`--compare`).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// A published or earlier-measured figure to set a result against.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Baseline {
    /// The number the ratio uses (the middle of a range).
    pub value: f64,
    /// As published ("1,200–1,400").
    pub text: String,
    /// What it measured, and where.
    pub source: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Figure {
    pub suite: String,
    /// Unique within the suite (the key `--compare` matches on).
    pub name: String,
    pub unit: String,
    /// Median over the timed runs.
    pub value: f64,
    pub min: f64,
    pub max: f64,
    /// Timed runs behind the figure (1 for counted quantities).
    pub runs: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Baseline>,
    #[serde(default)]
    pub note: String,
}

impl Figure {
    /// A counted or single-sample quantity.
    pub fn single(suite: &str, name: &str, unit: &str, value: f64) -> Figure {
        Figure {
            suite: suite.into(),
            name: name.into(),
            unit: unit.into(),
            value,
            min: value,
            max: value,
            runs: 1,
            baseline: None,
            note: String::new(),
        }
    }

    /// `work / t` for each run time `t` (seconds): the median rate and its min–max.
    pub fn rate(suite: &str, name: &str, unit: &str, work: f64, secs: &[f64]) -> Figure {
        let (med, lo, hi) = stats(secs);
        Figure {
            suite: suite.into(),
            name: name.into(),
            unit: unit.into(),
            value: work / med,
            min: work / hi,
            max: work / lo,
            runs: secs.len(),
            baseline: None,
            note: String::new(),
        }
    }

    /// The samples themselves (seconds, bytes, …): median and min–max.
    pub fn of(suite: &str, name: &str, unit: &str, samples: &[f64]) -> Figure {
        let (med, lo, hi) = stats(samples);
        Figure {
            suite: suite.into(),
            name: name.into(),
            unit: unit.into(),
            value: med,
            min: lo,
            max: hi,
            runs: samples.len(),
            baseline: None,
            note: String::new(),
        }
    }

    pub fn with_baseline(mut self, b: Option<Baseline>) -> Figure {
        self.baseline = b;
        self
    }

    pub fn note(mut self, n: impl Into<String>) -> Figure {
        self.note = n.into();
        self
    }

    pub fn key(&self) -> String {
        format!("{}/{}", self.suite, self.name)
    }
}

/// (median, min, max); the median of an even count is the mean of the middle two.
pub fn stats(v: &[f64]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    let med = if n % 2 == 1 { s[n / 2] } else { 0.5 * (s[n / 2 - 1] + s[n / 2]) };
    (med, s[0], s[n - 1])
}

/// One planned component against the bytes of the buffers the run allocated for it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PlanLine {
    pub name: String,
    pub plan_bytes: f64,
    pub measured_bytes: f64,
}

/// The memory plan checked against the run.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PlanCheck {
    /// Planned vs allocated bytes of the buffers the suites create (weights, optimizer state,
    /// gradients, KV cache), summed over the allocated objects.
    pub buffers: Vec<PlanLine>,
    pub plan_total: f64,
    pub measured_total: f64,
    /// measured_total / plan_total.
    pub ratio: f64,
    /// Predicted peaks against the measured ones (device memory in use on a GPU, process RSS
    /// on the CPU, which also holds the program itself).
    pub peaks: Vec<PlanLine>,
    pub peak_source: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// The GPU's name, or "cpu".
    pub card: String,
    pub driver: String,
    pub commit: String,
    pub shape: String,
    pub device: String,
    #[serde(default)]
    pub settings: Value,
    /// How model FLOPs were counted, and the per-token / per-image counts.
    #[serde(default)]
    pub flops: Value,
    /// The plan computed from the config before anything was allocated.
    #[serde(default)]
    pub plan: Value,
    #[serde(default)]
    pub plan_check: Option<PlanCheck>,
    pub figures: Vec<Figure>,
    /// Cases that did not run (out of memory, …): "suite/case: reason".
    #[serde(default)]
    pub failures: Vec<String>,
}

/// Numbers in the table: 4 significant digits, thousands kept readable.
pub fn num(x: f64) -> String {
    if !x.is_finite() {
        return format!("{x}");
    }
    let a = x.abs();
    if a >= 1e5 {
        format!("{x:.0}")
    } else if a >= 100.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.3}")
    } else if a >= 1e-3 {
        format!("{x:.4}")
    } else {
        format!("{x:.3e}")
    }
}

impl Report {
    pub fn table(&self) -> String {
        let mut s = format!(
            "card: {}   driver: {}   commit: {}   shape: {}   device: {}\n",
            self.card, self.driver, self.commit, self.shape, self.device
        );
        let w = self.figures.iter().map(|f| f.name.chars().count()).max().unwrap_or(6).max(6);
        s.push_str(&format!(
            "{:<9} {:<w$} {:>12} {:>25} {:<7} {:>16} {:>8}  {}\n",
            "suite", "figure", "median", "min–max", "unit", "baseline (H200)", "×base", "note"
        ));
        for f in &self.figures {
            let (b, r) = match &f.baseline {
                Some(b) => (b.text.clone(), format!("{:.2}", f.value / b.value)),
                None => ("-".into(), "-".into()),
            };
            let range = if f.runs > 1 { format!("{} – {}", num(f.min), num(f.max)) } else { "-".into() };
            // Pad by characters: names hold multi-byte ² and ×.
            let pad = " ".repeat(w.saturating_sub(f.name.chars().count()));
            s.push_str(&format!(
                "{:<9} {}{pad} {:>12} {:>25} {:<7} {:>16} {:>8}  {}\n",
                f.suite,
                f.name,
                num(f.value),
                range,
                f.unit,
                b,
                r,
                f.note
            ));
        }
        if let Some(p) = &self.plan_check {
            if !p.buffers.is_empty() {
                s.push_str(
                    "\nmemory plan against the buffers this run allocated (bytes summed over the allocated objects):\n",
                );
                for l in &p.buffers {
                    s.push_str(&format!(
                        "  {:<44} plan {:>14} B   allocated {:>14} B   {:.3}\n",
                        l.name,
                        l.plan_bytes as u64,
                        l.measured_bytes as u64,
                        l.measured_bytes / l.plan_bytes.max(1.0)
                    ));
                }
                s.push_str(&format!(
                    "  {:<44} plan {:>14} B   allocated {:>14} B   {:.3}\n",
                    "total", p.plan_total as u64, p.measured_total as u64, p.ratio
                ));
            }
            if !p.peaks.is_empty() {
                s.push_str(&format!("predicted peaks against the measured peaks ({}):\n", p.peak_source));
                for l in &p.peaks {
                    s.push_str(&format!(
                        "  {:<44} plan {:>10.3} GiB   measured {:>10.3} GiB\n",
                        l.name,
                        gib(l.plan_bytes),
                        gib(l.measured_bytes)
                    ));
                }
            }
        }
        for f in &self.failures {
            s.push_str(&format!("not run: {f}\n"));
        }
        s
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    pub fn load(path: &Path) -> Result<Report> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not an `am3 bench --json` file", path.display()))
    }
}

pub fn gib(b: f64) -> f64 {
    b / (1u64 << 30) as f64
}

/// B / A for every figure both files have (matched by suite, name and unit), then the
/// figures only one of them has.
pub fn compare(a: &Report, b: &Report, a_name: &str, b_name: &str) -> Result<String> {
    let key = |f: &Figure| format!("{} [{}]", f.key(), f.unit);
    let ib: BTreeMap<String, &Figure> = b.figures.iter().map(|f| (key(f), f)).collect();
    if a.figures.is_empty() || ib.is_empty() {
        bail!("--compare: {} has no figures", if a.figures.is_empty() { a_name } else { b_name });
    }
    let mut s = format!(
        "A: {a_name} ({}, {}, shape {}, commit {})\nB: {b_name} ({}, {}, shape {}, commit {})\n",
        a.card, a.driver, a.shape, a.commit, b.card, b.driver, b.shape, b.commit
    );
    let w = a.figures.iter().map(|f| key(f).chars().count()).max().unwrap_or(6);
    s.push_str(&format!("{:<w$} {:>12} {:>12} {:>8}\n", "figure", "A", "B", "B/A"));
    let mut only = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    // In A's order (suite by suite, as the bench printed them).
    for fa in &a.figures {
        let k = key(fa);
        seen.insert(k.clone());
        match ib.get(&k) {
            Some(fb) => {
                let ratio = if fa.value != 0.0 { format!("{:.2}", fb.value / fa.value) } else { "-".into() };
                s.push_str(&format!("{:<w$} {:>12} {:>12} {:>8}\n", k, num(fa.value), num(fb.value), ratio));
            }
            None => only.push(format!("only in A: {k}")),
        }
    }
    only.extend(b.figures.iter().map(key).filter(|k| !seen.contains(k)).map(|k| format!("only in B: {k}")));
    for o in only {
        s.push_str(&o);
        s.push('\n');
    }
    Ok(s)
}
