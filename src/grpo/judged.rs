//! Samples and finished rollouts as a judge's input: the dialogue's scripted user turns (text,
//! images, harmful/benign label, reference answer) and each rollout's answers.

use crate::data::dataset::Sample;
use crate::judge::{JudgeDialogue, JudgeTurn};
use crate::rollout::Rollout;

/// The judge's view of a sample, with no answers yet.
pub fn judge_dialogue(s: &Sample) -> JudgeDialogue {
    let turns = s
        .user_turns()
        .into_iter()
        .map(|u| JudgeTurn { user: u.text, images: u.images, harmful: u.label.is_harmful(), reference: u.reference })
        .collect();
    JudgeDialogue {
        id: s.id.clone(),
        category: s.category.clone(),
        system: s.system().map(String::from),
        turns,
        answers: Vec::new(),
    }
}

/// The judge's view of a sample answered by `rollouts` (one answer list per rollout).
pub fn judged_rollouts(s: &Sample, rollouts: &[&Rollout]) -> JudgeDialogue {
    JudgeDialogue {
        answers: rollouts.iter().map(|r| r.turns.iter().map(|t| t.text.clone()).collect()).collect(),
        ..judge_dialogue(s)
    }
}
