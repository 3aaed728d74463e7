//! Learning-rate schedules: constant, linear decay or cosine decay, after a linear warm-up, down
//! to `min_lr_ratio × peak`. Steps count from 0 (the first optimizer update is step 0), and the
//! warm-up uses `(step + 1) / warmup` so that no update is wasted at lr 0.
//!
//!   warm-up  (step < W):      lr = peak · (step + 1) / W
//!   decay    (W ≤ step < T):  p = (step − W) / (T − W)
//!     constant: peak;   linear: min + (peak − min)(1 − p);   cosine: min + (peak − min)(1 + cos πp)/2
//!   after T:                  the value at p = 1 (min, or peak for constant)

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::f64::consts::PI;
use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LrKind {
    Constant,
    Linear,
    Cosine,
}

impl FromStr for LrKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "constant" => Ok(LrKind::Constant),
            "linear" => Ok(LrKind::Linear),
            "cosine" => Ok(LrKind::Cosine),
            _ => bail!("unknown learning-rate schedule {s:?} (expected constant, linear or cosine)"),
        }
    }
}

impl fmt::Display for LrKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LrKind::Constant => "constant",
            LrKind::Linear => "linear",
            LrKind::Cosine => "cosine",
        })
    }
}

/// A validated schedule; build it with [`LrSchedule::new`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub kind: LrKind,
    /// The learning rate reached at the end of warm-up.
    pub peak_lr: f64,
    pub warmup_steps: u64,
    /// All optimizer steps, warm-up included.
    pub total_steps: u64,
    /// The floor of the decay as a fraction of `peak_lr`, in [0, 1].
    pub min_lr_ratio: f64,
}

impl LrSchedule {
    pub fn new(
        kind: LrKind, peak_lr: f64, warmup_steps: u64, total_steps: u64, min_lr_ratio: f64,
    ) -> Result<LrSchedule> {
        let s = LrSchedule { kind, peak_lr, warmup_steps, total_steps, min_lr_ratio };
        s.validate()?;
        Ok(s)
    }

    /// Checks a schedule that came from a config file.
    pub fn validate(&self) -> Result<()> {
        if !(self.peak_lr.is_finite() && self.peak_lr > 0.0) {
            bail!("learning rate must be a positive number, got {}", self.peak_lr);
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            bail!("min-lr ratio must be in [0, 1], got {}", self.min_lr_ratio);
        }
        if self.total_steps == 0 {
            bail!("the schedule needs at least one step");
        }
        if self.warmup_steps > self.total_steps {
            bail!("warm-up steps ({}) exceed the total steps ({})", self.warmup_steps, self.total_steps);
        }
        Ok(())
    }

    pub fn min_lr(&self) -> f64 {
        self.peak_lr * self.min_lr_ratio
    }

    /// The learning rate for optimizer step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps);
        // With no decay phase (warm-up == total), the remaining steps sit at the decay's end.
        let p = if decay_steps == 0 { 1.0 } else { ((step - self.warmup_steps) as f64 / decay_steps as f64).min(1.0) };
        let (peak, min) = (self.peak_lr, self.min_lr());
        match self.kind {
            LrKind::Constant => peak,
            LrKind::Linear => min + (peak - min) * (1.0 - p),
            LrKind::Cosine => min + (peak - min) * 0.5 * (1.0 + (PI * p).cos()),
        }
    }
}
