//! The memory plan of a GRPO run, predicted before anything large is allocated: weights, f32
//! masters and AdamW moments, gradients (by their storage dtype), the reference copy, the KV
//! cache of the rollout phase (freed before the update), activations of one micro-batch and
//! the log-prob scratch. On a GPU the run fails with these numbers when the peak does not fit.

use crate::models::common::params::GradStore;
use crate::stages::model::VlModel;
use crate::tensor::Device;
use anyhow::{bail, Result};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct MemoryPlan {
    pub weights: usize,
    pub optimizer: usize,
    pub grads: usize,
    pub reference: usize,
    pub kv_cache: usize,
    pub activations: usize,
    pub logprob_scratch: usize,
}

fn gib(b: usize) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// What a GRPO run's memory depends on besides the model: see `MemoryPlan::new`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemoryInput {
    /// Trainable parameters (they get f32 masters, AdamW moments and gradients).
    pub trainable: usize,
    /// A frozen reference copy of the weights is kept.
    pub reference: bool,
    /// Bytes of the rollout engine's KV cache.
    pub kv_cache: usize,
    /// Tokens of one update micro-batch.
    pub batch_tokens: usize,
    /// Activations recomputed in the backward (one layer's kept instead of every layer's).
    pub recompute: bool,
    /// The gradients' storage dtype.
    pub store: GradStore,
}

impl MemoryPlan {
    /// `trainable` parameters get masters, moments and gradients; `kv_cache` bytes come from the
    /// engine's plan; activations are those of `batch_tokens` tokens (one layer's with
    /// recompute, every layer's without).
    pub fn new(dev: &Device, model: &VlModel, input: MemoryInput) -> MemoryPlan {
        let MemoryInput { trainable, reference, kv_cache, batch_tokens, recompute, store } = input;
        let elem = if dev.is_cuda() { 2 } else { 4 };
        let weights: usize = model.param_entries().iter().map(|(r, b)| r.numel() * b.dtype().size()).sum();
        let refs: Vec<_> = model.trainable_entries().iter().map(|(r, _)| r.clone()).collect();
        let grads = store.bytes(dev, &refs).min(trainable * 4);
        let t = model.tdims();
        let l = &t.layer;
        let per_layer =
            batch_tokens * (4 * l.d + 2 * l.q_dim() + 2 * l.kv_dim() + 3 * l.inter) * elem + 2 * batch_tokens * 4;
        let streams = (t.n_layers + 1) * batch_tokens * l.d * elem;
        let activations = streams + if recompute { per_layer } else { per_layer * t.n_layers };
        MemoryPlan {
            weights,
            optimizer: trainable * 12,
            grads,
            reference: if reference { weights } else { 0 },
            kv_cache,
            activations,
            logprob_scratch: if dev.is_cuda() { 900 << 20 } else { batch_tokens * t.vocab.min(1 << 16) * 4 },
        }
    }

    /// The plan with `--optim-step per-layer`: the decoder layers' gradients but one are not
    /// stored (one layer's gradient is reused down the stack).
    pub fn per_layer(mut self, dev: &Device, model: &VlModel) -> MemoryPlan {
        let t = model.tdims();
        let store = model.grad_store();
        let layer: usize = crate::models::common::decoder::LayerParams::shapes(&t.layer, t.flags)
            .iter()
            .map(|(_, sh)| {
                let lin = sh.len() == 2 && store == GradStore::Bf16Linear && dev.is_cuda();
                sh.iter().product::<usize>() * if lin { 2 } else { 4 }
            })
            .sum();
        self.grads = self.grads.saturating_sub(t.n_layers.saturating_sub(1) * layer);
        self
    }

    /// The rollout phase (cache, no gradients' activations) or the update (activations,
    /// scratch), whichever is larger, over what both hold.
    pub fn peak(&self) -> usize {
        let resident = self.weights + self.optimizer + self.grads + self.reference;
        resident + self.kv_cache.max(self.activations + self.logprob_scratch)
    }

    pub fn describe(&self) -> String {
        format!(
            "weights {:.2} GiB, masters+AdamW {:.2} GiB, grads {:.2} GiB, reference {:.2} GiB, KV cache {:.2} GiB (rollouts only), activations {:.2} GiB + log-prob scratch {:.2} GiB (update only): peak {:.2} GiB",
            gib(self.weights),
            gib(self.optimizer),
            gib(self.grads),
            gib(self.reference),
            gib(self.kv_cache),
            gib(self.activations),
            gib(self.logprob_scratch),
            gib(self.peak())
        )
    }

    /// On a GPU: the part not yet allocated must fit in the free memory.
    pub fn check(&self, dev: &Device, already: usize) -> Result<()> {
        if let Device::Cuda(g) = dev {
            let (free, total) = g.mem_info();
            let need = self.peak().saturating_sub(already);
            if need > free {
                bail!(
                    "not enough GPU memory for GRPO: {}; {:.2} GiB more are needed, {:.2} of {:.2} GiB are free on {}. Use --lora-rank R, --beta-kl 0 (no reference copy), --recompute true, a smaller --batch-tokens, --max-batch or --max-new-tokens",
                    self.describe(),
                    gib(need),
                    gib(free),
                    gib(total),
                    g.name
                );
            }
        }
        Ok(())
    }
}
