//! Turn-aware rewards and group advantages for one dialogue's N rollouts, in f64, with missing
//! judge scores left out (never replaced by 0). With every score present and `Variance`
//! weighting this is the method's formula (DEVELOPERS.md; ops::grpo::cpu::turn_rewards):
//!   m_t = mean_i s_it, Var_t = (1/N) Σ_i (s_it − m_t)², U_t = Var_t + λ·max(0, τ − m_t),
//!   α = softmax_t(U), r_i = Σ_t α_t (β·h_it + s_it), A_i = (r_i − mean r) / (std r + ε)
//! with the unbiased std. A turn that no rollout has a score for is left out of the softmax; a
//! rollout missing some turns' scores takes α renormalised over the turns it has; a rollout with
//! no score at all gets the group's mean reward (advantage 0). With s ∈ [0, 1], Var_t ≤ 0.25,
//! while the shortfall term is up to λ·τ: λ sets how much an unsafe turn outweighs a
//! contested one.

use serde::{Deserialize, Serialize};

/// How turns are weighted into a rollout's reward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TurnWeighting {
    /// The paper's: α = softmax_t(Var_t + λ·max(0, τ − m_t)).
    Variance,
    /// Plain mean over turns.
    Mean,
    /// SaFeR-Steer: 0.3 · min_t + 0.7 · mean_t of the per-turn rewards.
    MinMean,
    /// The last turn only.
    Last,
}

impl std::str::FromStr for TurnWeighting {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "variance" => Self::Variance,
            "mean" => Self::Mean,
            "min-mean" => Self::MinMean,
            "last" => Self::Last,
            _ => anyhow::bail!("--turn-weighting {s:?}: expected variance, mean, min-mean or last"),
        })
    }
}

/// The reward's settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RewardHyper {
    pub lambda: f64,
    pub tau: f64,
    pub beta_help: f64,
    pub adv_eps: f64,
    pub weighting: TurnWeighting,
}

/// One group's turn statistics, weights, rewards and advantages.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GroupReward {
    /// Per turn: m_t, Var_t, U_t, α_t (NaN where no rollout has a score).
    pub turn_mean: Vec<f64>,
    pub turn_var: Vec<f64>,
    pub turn_importance: Vec<f64>,
    pub turn_weight: Vec<f64>,
    pub reward: Vec<f64>,
    pub advantage: Vec<f64>,
    /// Every reward equal: the group carries no learning signal.
    pub flat: bool,
    pub missing: usize,
}

/// Rewards of N rollouts × T turns from scores (s, h) per rollout and turn (None: missing).
pub fn group_reward(scores: &[Vec<Option<(f64, f64)>>], hp: &RewardHyper) -> GroupReward {
    let n = scores.len();
    let t = scores.iter().map(Vec::len).max().unwrap_or(0);
    let at = |i: usize, j: usize| scores[i].get(j).copied().flatten();
    let mut g = GroupReward {
        turn_mean: vec![f64::NAN; t],
        turn_var: vec![f64::NAN; t],
        turn_importance: vec![f64::NAN; t],
        turn_weight: vec![0.0; t],
        ..Default::default()
    };
    g.missing = (0..n).map(|i| (0..t).filter(|&j| at(i, j).is_none()).count()).sum();
    for j in 0..t {
        let s: Vec<f64> = (0..n).filter_map(|i| at(i, j).map(|x| x.0)).collect();
        if s.is_empty() {
            continue;
        }
        let m = s.iter().sum::<f64>() / s.len() as f64;
        let var = s.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / s.len() as f64;
        g.turn_mean[j] = m;
        g.turn_var[j] = var;
        g.turn_importance[j] = var + hp.lambda * (hp.tau - m).max(0.0);
    }
    let scored: Vec<usize> = (0..t).filter(|&j| !g.turn_mean[j].is_nan()).collect();
    match hp.weighting {
        TurnWeighting::Variance => {
            let mx = scored.iter().map(|&j| g.turn_importance[j]).fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = scored.iter().map(|&j| (g.turn_importance[j] - mx).exp()).sum();
            for &j in &scored {
                g.turn_weight[j] = (g.turn_importance[j] - mx).exp() / z;
            }
        }
        TurnWeighting::Mean | TurnWeighting::MinMean => {
            scored.iter().for_each(|&j| g.turn_weight[j] = 1.0 / scored.len() as f64)
        }
        TurnWeighting::Last => {
            if let Some(&j) = scored.last() {
                g.turn_weight[j] = 1.0;
            }
        }
    }
    let mut reward: Vec<Option<f64>> = Vec::with_capacity(n);
    for i in 0..n {
        let per: Vec<(usize, f64)> = (0..t).filter_map(|j| at(i, j).map(|(s, h)| (j, hp.beta_help * h + s))).collect();
        let wsum: f64 = per.iter().map(|&(j, _)| g.turn_weight[j]).sum();
        reward.push(if per.is_empty() || wsum <= 0.0 {
            None
        } else {
            let weighted = per.iter().map(|&(j, r)| g.turn_weight[j] * r).sum::<f64>() / wsum;
            Some(match hp.weighting {
                TurnWeighting::MinMean => 0.3 * per.iter().map(|x| x.1).fold(f64::INFINITY, f64::min) + 0.7 * weighted,
                _ => weighted,
            })
        });
    }
    let have: Vec<f64> = reward.iter().flatten().copied().collect();
    let mean = if have.is_empty() { 0.0 } else { have.iter().sum::<f64>() / have.len() as f64 };
    g.reward = reward.iter().map(|r| r.unwrap_or(mean)).collect();
    let std = if n > 1 {
        (g.reward.iter().map(|r| (r - mean) * (r - mean)).sum::<f64>() / (n - 1) as f64).sqrt()
    } else {
        0.0
    };
    g.advantage = g.reward.iter().map(|r| if n > 1 { (r - mean) / (std + hp.adv_eps) } else { 0.0 }).collect();
    g.flat = g.reward.iter().all(|&r| r == g.reward[0]);
    g
}

/// Entropy, min and max of α over the scored turns (for the metrics).
pub fn weight_stats(g: &GroupReward) -> (f64, f64, f64) {
    let w: Vec<f64> = g.turn_weight.iter().zip(&g.turn_mean).filter(|(_, m)| !m.is_nan()).map(|(w, _)| *w).collect();
    let ent = -w.iter().filter(|&&x| x > 0.0).map(|x| x * x.ln()).sum::<f64>();
    (ent, w.iter().copied().fold(f64::INFINITY, f64::min), w.iter().copied().fold(f64::NEG_INFINITY, f64::max))
}
