//! AM3Safety's second stage: GRPO over whole dialogues with turn-aware dual-objective rewards.
//! `reward`: turn weights, rewards and group advantages (missing scores left out);
//! `update`: old/reference log-probs and the clipped-surrogate + k3-KL update over packed
//! rollouts; `judged`: finished rollouts as the judges' input.

pub mod judged;
pub mod memory;
pub mod reward;
pub mod update;
