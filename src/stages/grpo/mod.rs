//! `am3 grpo`: multi-turn GRPO in one process. Each step takes `dialogues_per_step` prompt
//! dialogues, generates N rollouts of every assistant turn with the rollout engine (the
//! policy's own weights, no copy), has the judge score every turn, turns the scores into
//! turn-aware rewards and group advantages (grpo::reward), computes the old policy's log-probs
//! with the training forward and the frozen reference's, and runs `ppo_epochs` passes of the
//! clipped surrogate + k3 KL over mini-batches (grpo::update). Checkpoints, `--resume`,
//! progress and metrics work as in `am3 sft`; the data order and every random stream follow
//! from (seed, step), so a resumed CPU run equals an uninterrupted one bit for bit.

mod args; // GrpoArgs (clap/TOML), GrpoPlan (resolved settings) and the hyper-parameters it gives
mod train; // run (the GRPO run: start model, resume, step loop, checkpoints), demo_prompts
mod trainer; // Trainer (policy, reference, optimizer, judge; one GRPO step), StepReport, GrpoState

pub use args::{GrpoArgs, GrpoPlan};
pub use train::{demo_prompts, run};
pub use trainer::{StepReport, Trainer};
