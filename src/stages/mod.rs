//! Training stages: each drives a model through the ops; none touches kernels directly.

pub mod data_cmd; // defines: am3 data convert
pub mod demo; // defines: am3 demo (sft → eval → grpo → eval on the tiny default, before/after table)
pub mod eval; // defines: am3 eval (EvalArgs, run, evaluate, generate_given for --history given)
pub mod examples; // defines: Example (encoded sample), Packed (varlen batch), pack, micro_batches
pub mod export; // defines: am3 export (the tiny default as a full HF checkpoint), the tiny default's HF side files, adapter bases
pub mod forward; // defines: am3 forward (logits, log-probs, objective, grads of an inputs file)
pub mod generate; // defines: am3 generate (rollout engine over a JSONL file or one prompt)
pub mod grpo; // defines: am3 grpo (multi-turn GRPO with turn-aware rewards), GrpoArgs/GrpoPlan, Trainer
pub mod lora; // defines: LoraSave (merged | adapter), VlModel::{enable_lora, trainable_entries, save_merged, save_lora_adapter, save_trained}
pub mod model; // defines: VlModel (Qwen2.5-VL or LLaVA-NeXT), Processor, Encoder, save_weights
pub mod sft; // defines: SftArgs, run (cold-start refusal SFT), checkpoints and resume
