//! Ratio figures over dialogues and their bootstrap intervals.
//!
//! Every eval figure (a rate or a mean) is a ratio Σ_d num_d / Σ_d den_d of per-dialogue sums,
//! so one resample of dialogues (with replacement, n draws) reweights each dialogue by how often
//! it was drawn, and all figures share the same resamples. The interval is the percentile one:
//! the α/2 and 1−α/2 quantiles (linear between order statistics) of the resampled values;
//! resamples where a figure has no trials (Σ den = 0) are skipped for that figure.

use crate::rng::Rng;
use serde::{Deserialize, Serialize};

/// One figure with its interval and counts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    /// sum / count; None when there is nothing to count.
    pub value: Option<f64>,
    pub ci_low: Option<f64>,
    pub ci_high: Option<f64>,
    /// The numerator: unsafe trials, refused turns, Σ s, Σ h or win points.
    pub sum: f64,
    /// The denominator: trials, scored turns or compared pairs.
    pub count: usize,
    /// Dialogues contributing at least one trial.
    pub dialogues: usize,
    /// Scores (or pair verdicts) in this figure's domain that were missing and left out.
    pub missing: usize,
}

/// A figure being collected: sparse per-dialogue (num, den) sums.
#[derive(Clone, Debug, Default)]
pub struct Ratio {
    parts: Vec<(usize, f64, f64)>,
    missing: usize,
}

impl Ratio {
    /// Adds one trial of dialogue `d` worth `num` (1/0 for a rate, s for a mean, a win score).
    /// Consecutive calls for one dialogue merge into one part (fewer terms per resample).
    pub fn add(&mut self, d: usize, num: f64) {
        match self.parts.last_mut() {
            Some(p) if p.0 == d => {
                p.1 += num;
                p.2 += 1.0;
            }
            _ => self.parts.push((d, num, 1.0)),
        }
    }

    pub fn add_missing(&mut self) {
        self.missing += 1;
    }

    fn point(&self) -> Figure {
        let sum: f64 = self.parts.iter().map(|p| p.1).sum();
        let count: f64 = self.parts.iter().map(|p| p.2).sum();
        let mut ds: Vec<usize> = self.parts.iter().map(|p| p.0).collect();
        ds.sort_unstable();
        ds.dedup();
        Figure {
            value: (count > 0.0).then(|| sum / count),
            ci_low: None,
            ci_high: None,
            sum,
            count: count as usize,
            dialogues: ds.len(),
            missing: self.missing,
        }
    }
}

/// Resampling settings.
#[derive(Clone, Copy, Debug)]
pub struct Bootstrap {
    pub resamples: usize,
    pub seed: u64,
    pub level: f64,
}

/// Point values and intervals of all `ratios` over `n` dialogues, from one shared set of
/// resamples (so the same seed gives the same intervals, figure by figure).
pub fn evaluate(ratios: &[Ratio], n: usize, b: Bootstrap) -> Vec<Figure> {
    let mut figures: Vec<Figure> = ratios.iter().map(Ratio::point).collect();
    if b.resamples == 0 || n == 0 {
        return figures;
    }
    let mut rng = Rng::new(b.seed);
    let mut samples: Vec<Vec<f64>> = vec![Vec::with_capacity(b.resamples); ratios.len()];
    let mut weight = vec![0.0f64; n];
    for _ in 0..b.resamples {
        weight.iter_mut().for_each(|w| *w = 0.0);
        for _ in 0..n {
            weight[rng.below(n)] += 1.0;
        }
        for (ratio, out) in ratios.iter().zip(samples.iter_mut()) {
            let (mut num, mut den) = (0.0, 0.0);
            for &(d, x, c) in &ratio.parts {
                num += weight[d] * x;
                den += weight[d] * c;
            }
            if den > 0.0 {
                out.push(num / den);
            }
        }
    }
    let alpha = (1.0 - b.level).clamp(0.0, 1.0);
    for (fig, mut s) in figures.iter_mut().zip(samples) {
        if fig.value.is_none() || s.is_empty() {
            continue;
        }
        s.sort_by(f64::total_cmp);
        fig.ci_low = Some(quantile(&s, alpha / 2.0));
        fig.ci_high = Some(quantile(&s, 1.0 - alpha / 2.0));
    }
    figures
}

/// The p-quantile of sorted values, linear between order statistics (R's type 7).
pub fn quantile(sorted: &[f64], p: f64) -> f64 {
    let pos = p.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}
