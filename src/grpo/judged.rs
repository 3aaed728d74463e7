//! Finished rollouts as a judge's input: the dialogue's scripted user turns (text, images,
//! harmful/benign label, reference answer) and each rollout's answers.

use crate::data::dataset::{Sample, TurnLabel};
use crate::judge::{JudgeDialogue, JudgeTurn};
use crate::rollout::Rollout;

pub fn judge_dialogue(s: &Sample, rollouts: &[&Rollout]) -> JudgeDialogue {
    let turns = s
        .user_turns()
        .into_iter()
        .map(|u| JudgeTurn { user: u.text, images: u.images, harmful: u.label == TurnLabel::Harmful, reference: u.reference })
        .collect();
    JudgeDialogue {
        id: s.id.clone(),
        category: s.category().map(str::to_string),
        system: s.system().map(str::to_string),
        turns,
        answers: rollouts.iter().map(|r| r.turns.iter().map(|t| t.text.clone()).collect()).collect(),
    }
}
