//! Building blocks shared by the model families: the pre-norm transformer block (Qwen2 / Llama /
//! Mistral decoders and the Qwen2.5-VL vision tower) with its explicit backward, the decoder-only
//! LM built from it, its preallocated rollout step, and parameters keyed by checkpoint name.

pub mod decoder; // LayerDims, LayerFlags, RopeKind, LayerParams (+ Slot), LayerActs, StepActs, Block (fwd, bwd, cached fwd), stack_forward / stack_backward (with recompute)
pub mod head; // LogpGrad, logprobs / logprobs_bwd (the fused log-prob head), backward_stepped (head + LM, per-layer step), head_grad, Lm::extend_logits
pub mod lm; // LmDims, LmNames, LmParams, LmFwd, Lm (dims, weights, adapters: forward / backward / logits / extend), Tokens, LmGrads, Stepped + backward_stepped, LmCache
pub mod lora; // LoraConfig (rank, alpha, targets), LayerLora (one block's adapters), LoraState (a model's adapters: grads, merge, PEFT adapter files)
pub mod params; // ParamRef (a checkpoint tensor or row range of one), read_piece, assemble (gradients by name), NamedTensors
pub mod step; // StepScratch (a ragged step's preallocated buffers), Lm::step_logits (the rollout engine's step)
pub mod train_state; // TrainState (trainable entries, merged weights, gradients by name: the glue both families share)
