//! The memory plan of the workloads, from the config alone (a skeleton model: names and shapes,
//! nothing allocated): weights, f32 masters, AdamW moments, gradients by storage dtype, the
//! reference copy, the KV cache, activations with and without recompute and the log-prob
//! scratch, for the CUDA layout (bf16 weights and activations) and the CPU one (f32). The
//! activation and scratch terms are `grpo::memory::MemoryPlan`'s formulas, so the two agree.

use super::report::gib;
use super::shape::grad_refs;
use crate::models::common::params::is_linear_weight;
use crate::stages::model::VlModel;
use serde_json::{json, Value};

/// What the suites will allocate.
#[derive(Clone, Debug)]
pub struct PlanInput {
    /// Tokens of one training step.
    pub seq: usize,
    /// The largest KV cache a suite makes: slots × tokens per slot.
    pub kv_slots: usize,
    pub kv_len: usize,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Components {
    pub weights: usize,
    pub master: usize,
    pub adamw: usize,
    pub grads_f32: usize,
    /// Linear-layer weight gradients in bf16, the rest f32 (the CUDA full fine-tune's store;
    /// the CPU stores f32 only).
    pub grads_bf16_linear: usize,
    /// `--optim-step per-layer`: the gradients outside the decoder layers plus one layer's
    /// (f32, and with bf16 linear weights on CUDA).
    pub grads_per_layer_f32: usize,
    pub grads_per_layer_bf16_linear: usize,
    pub reference: usize,
    pub kv_cache: usize,
    pub act_keep: usize,
    pub act_recompute: usize,
    pub logprob_scratch: usize,
}

impl Components {
    /// The gradients the train suite stores on this layout.
    pub fn grads(&self, cuda: bool) -> usize {
        if cuda {
            self.grads_bf16_linear
        } else {
            self.grads_f32
        }
    }
    /// As `grads` with the per-layer optimizer step.
    pub fn grads_per_layer(&self, cuda: bool) -> usize {
        if cuda {
            self.grads_per_layer_bf16_linear
        } else {
            self.grads_per_layer_f32
        }
    }
    pub fn resident(&self, cuda: bool) -> usize {
        self.weights + self.master + self.adamw + self.grads(cuda)
    }
    /// The recompute SFT step with the per-layer optimizer step.
    pub fn sft_step_per_layer(&self, cuda: bool) -> usize {
        self.sft_step(cuda, true) - self.grads(cuda) + self.grads_per_layer(cuda)
    }
    /// A full fine-tune GRPO step with the per-layer optimizer step and recompute: the resident
    /// state, the reference copy, then the larger of the rollouts' KV cache and the update's
    /// activations and log-prob scratch (the cache is freed before the update).
    pub fn grpo_step_per_layer(&self, cuda: bool) -> usize {
        self.resident(cuda) - self.grads(cuda)
            + self.grads_per_layer(cuda)
            + self.reference
            + self.kv_cache.max(self.act_recompute + self.logprob_scratch)
    }
    pub fn sft_step(&self, cuda: bool, recompute: bool) -> usize {
        self.resident(cuda) + if recompute { self.act_recompute } else { self.act_keep } + self.logprob_scratch
    }
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub params: usize,
    pub trainable: usize,
    pub input: PlanInput,
    pub cuda: Components,
    pub cpu: Components,
}

fn components(m: &VlModel, inp: &PlanInput, elem: usize, cuda: bool) -> Components {
    let params: usize = m.param_entries().iter().map(|(r, _)| r.numel()).sum();
    let refs = grad_refs(m);
    let trainable: usize = refs.iter().map(|r| r.numel()).sum();
    let grads_bf16_linear: usize =
        refs.iter().map(|r| r.numel() * if cuda && is_linear_weight(r) { 2 } else { 4 }).sum();
    let t = m.tdims();
    let l = &t.layer;
    let s = inp.seq;
    // One decoder layer's gradient (its 2-D tensors are all linear weights); the per-layer step
    // keeps one instead of n_layers.
    let shapes = crate::models::common::decoder::LayerParams::shapes(l, t.flags);
    let layer_bytes = |lin: usize| -> usize {
        shapes.iter().map(|(_, sh)| sh.iter().product::<usize>() * if sh.len() == 2 { lin } else { 4 }).sum()
    };
    let drop_layers = t.n_layers.saturating_sub(1);
    // As grpo::memory::MemoryPlan: per layer the norms' inputs, q/k/v/o, the MLP's three
    // [S, inter] tensors and two f32 statistics; plus one residual stream per layer.
    let per_layer = s * (4 * l.d + 2 * l.q_dim() + 2 * l.kv_dim() + 3 * l.inter) * elem + 2 * s * 4;
    let streams = (t.n_layers + 1) * s * l.d * elem;
    Components {
        weights: params * elem,
        master: trainable * 4,
        adamw: trainable * 8,
        grads_f32: trainable * 4,
        grads_bf16_linear,
        grads_per_layer_f32: (trainable * 4).saturating_sub(drop_layers * layer_bytes(4)),
        grads_per_layer_bf16_linear: grads_bf16_linear
            .saturating_sub(drop_layers * layer_bytes(if cuda { 2 } else { 4 })),
        reference: params * elem,
        kv_cache: 2 * t.n_layers * inp.kv_slots * inp.kv_len * l.kv_heads * l.head_dim * elem,
        act_keep: streams + per_layer * t.n_layers,
        act_recompute: streams + per_layer,
        logprob_scratch: if cuda { 900 << 20 } else { s * t.vocab.min(1 << 16) * 4 },
    }
}

fn count(n: usize) -> String {
    if n >= 1_000_000_000 {
        format!("{:.3} B", n as f64 / 1e9)
    } else {
        format!("{:.3} M", n as f64 / 1e6)
    }
}

impl Plan {
    pub fn new(m: &VlModel, input: PlanInput) -> Plan {
        let params = m.param_entries().iter().map(|(r, _)| r.numel()).sum();
        let trainable = grad_refs(m).iter().map(|r| r.numel()).sum();
        let cuda = components(m, &input, 2, true);
        let cpu = components(m, &input, 4, false);
        Plan { params, trainable, input, cuda, cpu }
    }

    pub fn layout(&self, cuda: bool) -> &Components {
        if cuda {
            &self.cuda
        } else {
            &self.cpu
        }
    }

    fn rows(&self) -> Vec<(String, usize, usize)> {
        let (g, c) = (&self.cuda, &self.cpu);
        let i = &self.input;
        vec![
            (format!("weights ({} params)", count(self.params)), g.weights, c.weights),
            (format!("f32 master ({} trainable)", count(self.trainable)), g.master, c.master),
            ("AdamW moments (2 × f32)".into(), g.adamw, c.adamw),
            ("gradients, all f32".into(), g.grads_f32, c.grads_f32),
            ("gradients, bf16 linear weights + f32 rest".into(), g.grads_bf16_linear, c.grads_bf16_linear),
            ("gradients, per-layer step (one layer + rest)".into(), g.grads_per_layer(true), c.grads_per_layer(false)),
            ("reference copy (GRPO, β_kl > 0)".into(), g.reference, c.reference),
            (format!("KV cache ({} slots × {} tokens)", i.kv_slots, i.kv_len), g.kv_cache, c.kv_cache),
            (format!("activations, S = {}, kept", i.seq), g.act_keep, c.act_keep),
            (format!("activations, S = {}, recompute", i.seq), g.act_recompute, c.act_recompute),
            ("log-prob scratch".into(), g.logprob_scratch, c.logprob_scratch),
        ]
    }

    fn totals(&self) -> Vec<(String, usize, usize)> {
        let (g, c) = (&self.cuda, &self.cpu);
        vec![
            ("SFT step, kept activations".into(), g.sft_step(true, false), c.sft_step(false, false)),
            ("SFT step, recompute".into(), g.sft_step(true, true), c.sft_step(false, true)),
            ("SFT step, recompute, per-layer step".into(), g.sft_step_per_layer(true), c.sft_step_per_layer(false)),
            ("decode at the largest batch (weights + KV)".into(), g.weights + g.kv_cache, c.weights + c.kv_cache),
            (
                "GRPO resident (+ reference copy)".into(),
                g.resident(true) + g.reference,
                c.resident(false) + c.reference,
            ),
            (
                "GRPO step, full fine-tune, per-layer step, recompute".into(),
                g.grpo_step_per_layer(true),
                c.grpo_step_per_layer(false),
            ),
        ]
    }

    /// The plan as a table; `free` is the device's free memory and which layout it runs.
    pub fn describe(&self, free: Option<(u64, String)>, cuda_here: bool) -> String {
        // MiB for small models, so the table is not all zeros.
        let big = self.cuda.weights >= 1 << 30;
        let (unit, div) = if big { ("GiB", (1u64 << 30) as f64) } else { ("MiB", (1u64 << 20) as f64) };
        let mut s =
            format!("{:<48} {:>14} {:>14}\n", "component", format!("CUDA bf16 {unit}"), format!("CPU f32 {unit}"));
        for (name, g, c) in self.rows() {
            s.push_str(&format!("{:<48} {:>14.3} {:>14.3}\n", name, g as f64 / div, c as f64 / div));
        }
        s.push_str("totals (CUDA: bf16 linear-weight gradients, as the train suite stores them):\n");
        for (name, g, c) in self.totals() {
            let here = if cuda_here { g } else { c };
            let fit = match &free {
                Some((f, _)) => {
                    if here as u64 <= *f {
                        "fits"
                    } else {
                        "does not fit"
                    }
                }
                None => "",
            };
            s.push_str(&format!("{:<48} {:>14.3} {:>14.3}  {fit}\n", name, g as f64 / div, c as f64 / div));
        }
        match free {
            Some((f, src)) => s.push_str(&format!(
                "free here: {:.3} GiB ({src}); checked against the {} column\n",
                gib(f as f64),
                if cuda_here { "CUDA" } else { "CPU" }
            )),
            None => s.push_str("free memory here: unknown\n"),
        }
        s
    }

    pub fn to_json(&self) -> Value {
        let layout = |c: &Components, cuda: bool| {
            json!({
                "weights": c.weights, "master_f32": c.master, "adamw": c.adamw, "grads_f32": c.grads_f32,
                "grads_bf16_linear": c.grads_bf16_linear, "reference": c.reference, "kv_cache": c.kv_cache,
                "activations_kept": c.act_keep, "activations_recompute": c.act_recompute, "logprob_scratch": c.logprob_scratch,
                "sft_step_kept": c.sft_step(cuda, false), "sft_step_recompute": c.sft_step(cuda, true),
                "grads_per_layer_f32": c.grads_per_layer_f32, "grads_per_layer_bf16_linear": c.grads_per_layer_bf16_linear,
                "sft_step_recompute_per_layer": c.sft_step_per_layer(cuda),
            })
        };
        json!({
            "params": self.params, "trainable": self.trainable,
            "seq": self.input.seq, "kv_slots": self.input.kv_slots, "kv_len": self.input.kv_len,
            "cuda_bf16": layout(&self.cuda, true), "cpu_f32": layout(&self.cpu, false),
        })
    }
}
