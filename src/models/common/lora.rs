//! LoRA adapters for the shared decoder blocks (text layers of Qwen2.5-VL and LLaVA-NeXT, and
//! the Qwen2.5-VL vision blocks): their configuration, storage keyed by PEFT names, gradients,
//! merging into the base weights, and the PEFT adapter files.
//!
//! An adapted projection computes y = x·Wᵀ (+b) + (alpha/r)·(x·Aᵀ)·Bᵀ (`ops::lora`), with
//! A [r, in] initialised as PEFT does (kaiming-uniform with a = √5, i.e. U(±1/√in)) and B [out, r]
//! zero, so a fresh adapter leaves the model unchanged. While adapters are on, the base weights
//! are frozen: only A and B get gradients and optimizer state.
//!
//! Names follow PEFT (`base_model.model.<module>.lora_A.weight` / `lora_B.weight`). In memory the
//! module path is the canonical checkpoint name; the saved files use the module paths of the
//! model class transformers builds (the caller's `name_of`, e.g. `model.language_model.layers.N`),
//! since PEFT matches keys and `target_modules` against those. Qwen's fused vision `attn.qkv` gets one adapter like PEFT
//! would give it: one A [r, D] shared by q, k and v, and one B [3·D, r] kept as three row pieces
//! (exactly as the base `attn.qkv.weight` is), so `params::assemble` glues them back.
//!
//! `target_modules` in `adapter_config.json` is written as a regular expression that PEFT
//! full-matches against module names, naming exactly the adapted modules (a plain list such as
//! ["q_proj"] would also hit CLIP's q_proj, and "gate_proj" Qwen's vision MLP).

use super::decoder::Slot;
use super::params::{assemble, NamedTensors, ParamRef};
use crate::checkpoint::safetensors_io::{save_sharded_with, SaveDtype, SINGLE_FILE};
use crate::ops::lora::Adapter;
use crate::ops::matmul;
use crate::rng::Rng;
use crate::tensor::{Buf, DType, Device};
use crate::train::atomic;
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::path::Path;

/// File names of a PEFT adapter directory.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// Text-decoder targets by their HF module name.
pub const TEXT_TARGETS: [(&str, Slot); 7] = [
    ("q_proj", Slot::Wq),
    ("k_proj", Slot::Wk),
    ("v_proj", Slot::Wv),
    ("o_proj", Slot::Wo),
    ("gate_proj", Slot::Wg),
    ("up_proj", Slot::Wu),
    ("down_proj", Slot::Wd),
];

/// Qwen2.5-VL vision-block targets (`visual.blocks.N.<name>`); `visual.qkv` is the fused
/// attention input projection.
pub const VISION_TARGETS: [(&str, &[Slot]); 5] = [
    ("visual.qkv", &[Slot::Wq, Slot::Wk, Slot::Wv]),
    ("visual.proj", &[Slot::Wo]),
    ("visual.gate_proj", &[Slot::Wg]),
    ("visual.up_proj", &[Slot::Wu]),
    ("visual.down_proj", &[Slot::Wd]),
];

/// Every projection of the text decoder: the default target set.
pub const DEFAULT_TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// What to adapt and how.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Names from `TEXT_TARGETS` / `VISION_TARGETS`.
    pub targets: Vec<String>,
    /// Seed of the A matrices' init.
    pub seed: u64,
}

impl LoraConfig {
    pub fn new(rank: usize, alpha: f64, targets: &[&str], seed: u64) -> Result<Self> {
        let c = LoraConfig { rank, alpha, targets: targets.iter().map(|s| s.to_string()).collect(), seed };
        c.validate()?;
        Ok(c)
    }

    /// "q_proj, v_proj" → ["q_proj", "v_proj"].
    pub fn parse_targets(s: &str) -> Vec<String> {
        s.split(',').map(str::trim).filter(|t| !t.is_empty()).map(String::from).collect()
    }

    /// alpha / rank.
    pub fn scale(&self) -> f32 {
        (self.alpha / self.rank.max(1) as f64) as f32
    }

    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            bail!("LoRA: the rank must be positive");
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            bail!("LoRA: alpha must be a positive number, got {}", self.alpha);
        }
        if self.targets.is_empty() {
            bail!("LoRA: no target modules given");
        }
        let mut seen = BTreeSet::new();
        for t in &self.targets {
            let known = TEXT_TARGETS.iter().any(|(n, _)| n == t) || VISION_TARGETS.iter().any(|(n, _)| n == t);
            if !known {
                let all: Vec<&str> =
                    TEXT_TARGETS.iter().map(|(n, _)| *n).chain(VISION_TARGETS.iter().map(|(n, _)| *n)).collect();
                bail!("LoRA: unknown target module `{t}` (known: {})", all.join(", "));
            }
            if !seen.insert(t.as_str()) {
                bail!("LoRA: target module `{t}` is listed twice");
            }
        }
        Ok(())
    }

    /// The text-decoder slots to adapt, in `Slot` order.
    pub fn text_slots(&self) -> Vec<Slot> {
        TEXT_TARGETS.iter().filter(|(n, _)| self.targets.iter().any(|t| t == n)).map(|(_, s)| *s).collect()
    }

    /// The vision-block slots to adapt, in `Slot` order.
    pub fn vision_slots(&self) -> Vec<Slot> {
        VISION_TARGETS
            .iter()
            .filter(|(n, _)| self.targets.iter().any(|t| t == n))
            .flat_map(|(_, s)| s.iter().copied())
            .collect()
    }
}

/// One adapter matrix: the slot it serves, its PEFT name (a row range for a piece of a fused B),
/// the base weight it adapts, and the buffer.
pub struct LoraTensor {
    pub slot: Slot,
    pub name: ParamRef,
    pub base: ParamRef,
    pub buf: Buf,
}

/// The adapters of one block (or their f32 gradients).
pub struct LayerLora {
    pub rank: usize,
    pub scale: f32,
    /// q, k and v share the A stored under `Slot::Wq` (a fused qkv projection).
    pub fused_qkv: bool,
    /// A [r, in], one per adapted module.
    pub a: Vec<LoraTensor>,
    /// B [out, r], one per adapted slot.
    pub b: Vec<LoraTensor>,
}

/// `model.layers.3.self_attn.q_proj.weight` → `model.layers.3.self_attn.q_proj`.
fn module_of(base: &ParamRef) -> Result<&str> {
    base.name.strip_suffix(".weight").with_context(|| format!("LoRA: `{}` is not a weight", base.name))
}

/// A deterministic seed per tensor name (adding targets does not change the others' init).
fn name_seed(seed: u64, name: &str) -> u64 {
    name.bytes().fold(seed ^ 0x4C6F_5241, |h, b| h.wrapping_mul(0x100_0000_01B3).wrapping_add(b as u64))
}

impl LayerLora {
    /// Adapters on `slots`, each for the base tensor `base_ref(slot)` ([out, in], or a row piece
    /// of one): A ~ U(±1/√in), B = 0, in `dt`.
    pub fn new(
        dev: &Device, dt: DType, cfg: &LoraConfig, slots: &[Slot], base_ref: &dyn Fn(Slot) -> ParamRef, fused_qkv: bool,
    ) -> Result<Self> {
        let r = cfg.rank;
        let mut l = LayerLora { rank: r, scale: cfg.scale(), fused_qkv, a: Vec::new(), b: Vec::new() };
        if fused_qkv {
            let n = [Slot::Wq, Slot::Wk, Slot::Wv].iter().filter(|s| slots.contains(s)).count();
            if n != 0 && n != 3 {
                bail!("LoRA: a fused qkv projection is adapted as a whole (q, k and v together)");
            }
        }
        for &s in slots {
            let base = base_ref(s);
            if base.full_shape.len() != 2 {
                bail!("LoRA: `{}` has shape {:?}, not a matrix", base.name, base.full_shape);
            }
            let (out_full, din) = (base.full_shape[0], base.full_shape[1]);
            let module = module_of(&base)?.to_string();
            let bname = ParamRef::piece(
                &format!("base_model.model.{module}.lora_B.weight"),
                &[out_full, r],
                base.row0,
                base.rows,
            );
            let b = dev.zeros(dt, base.rows * r)?;
            if l.a_slot(s) == s {
                let aname = ParamRef::whole(&format!("base_model.model.{module}.lora_A.weight"), &[r, din]);
                let bound = 1.0 / (din as f64).sqrt();
                let v = Rng::new(name_seed(cfg.seed, &aname.name)).uniform_vec(r * din, -bound, bound);
                let a = dev.upload(&v, dt)?;
                l.a.push(LoraTensor {
                    slot: s,
                    name: aname,
                    base: ParamRef::whole(&base.name, &base.full_shape),
                    buf: a,
                });
            }
            l.b.push(LoraTensor { slot: s, name: bname, base, buf: b });
        }
        Ok(l)
    }

    /// The slot whose A serves `s`.
    fn a_slot(&self, s: Slot) -> Slot {
        if self.fused_qkv && matches!(s, Slot::Wk | Slot::Wv) {
            Slot::Wq
        } else {
            s
        }
    }

    /// The adapter of projection `s`, if adapted.
    pub fn adapter(&self, s: Slot) -> Option<Adapter<'_>> {
        let b = self.b.iter().find(|t| t.slot == s)?;
        let sa = self.a_slot(s);
        let a = self.a.iter().find(|t| t.slot == sa)?;
        Some(Adapter { a: &a.buf, b: &b.buf, rank: self.rank, scale: self.scale })
    }

    /// (dA, dB) of projection `s` in a gradient set.
    pub fn grads_mut(&mut self, s: Slot) -> Option<(&mut Buf, &mut Buf)> {
        let sa = self.a_slot(s);
        let a = self.a.iter_mut().find(|t| t.slot == sa)?;
        let b = self.b.iter_mut().find(|t| t.slot == s)?;
        Some((&mut a.buf, &mut b.buf))
    }

    /// f32 zeros of the same tensors (a gradient accumulator).
    pub fn zeros_f32_like(&self, dev: &Device) -> Result<Self> {
        let z = |v: &[LoraTensor]| -> Result<Vec<LoraTensor>> {
            v.iter()
                .map(|t| {
                    Ok(LoraTensor {
                        slot: t.slot,
                        name: t.name.clone(),
                        base: t.base.clone(),
                        buf: dev.zeros_f32(t.buf.len())?,
                    })
                })
                .collect()
        };
        Ok(LayerLora { rank: self.rank, scale: self.scale, fused_qkv: self.fused_qkv, a: z(&self.a)?, b: z(&self.b)? })
    }

    /// Every tensor with its PEFT name: the A's, then the B's.
    pub fn entries(&self) -> impl Iterator<Item = (ParamRef, &Buf)> {
        self.a.iter().chain(&self.b).map(|t| (t.name.clone(), &t.buf))
    }

    pub fn entries_mut(&mut self) -> impl Iterator<Item = (ParamRef, &mut Buf)> {
        self.a.iter_mut().chain(self.b.iter_mut()).map(|t| (t.name.clone(), &mut t.buf))
    }
}

/// Which projections of a stack of blocks to adapt, and the base tensor of each.
pub struct StackSpec<'a> {
    pub blocks: usize,
    pub slots: Vec<Slot>,
    pub base_ref: &'a dyn Fn(usize, Slot) -> ParamRef,
    pub fused_qkv: bool,
}

impl StackSpec<'_> {
    fn build(&self, dev: &Device, dt: DType, cfg: &LoraConfig) -> Result<Vec<LayerLora>> {
        if self.slots.is_empty() {
            return Ok(Vec::new());
        }
        (0..self.blocks)
            .map(|i| LayerLora::new(dev, dt, cfg, &self.slots, &|s| (self.base_ref)(i, s), self.fused_qkv))
            .collect()
    }
}

/// The adapters' gradients. The lm_head is frozen and gets none: its backward runs with no dW
/// (no [V, D] sink, 2.2 GB at 7B).
pub struct LoraGrads {
    pub text: Vec<LayerLora>,
    pub vision: Vec<LayerLora>,
}

/// A model's adapters: one `LayerLora` per text layer, and per vision block when vision targets
/// are chosen (else none), with their gradients.
pub struct LoraState {
    pub cfg: LoraConfig,
    pub text: Vec<LayerLora>,
    pub vision: Vec<LayerLora>,
    pub grads: Option<LoraGrads>,
}

impl LoraState {
    /// Fresh adapters (B = 0) in `dt` for the text stack and the vision stack.
    pub fn new(dev: &Device, cfg: &LoraConfig, dt: DType, text: &StackSpec, vision: &StackSpec) -> Result<Self> {
        cfg.validate()?;
        // A rank above min(out, in) adds no capacity, only memory: refuse it before allocating.
        let narrowest = [text, vision]
            .into_iter()
            .filter(|st| st.blocks > 0)
            .flat_map(|st| st.slots.iter().map(move |&s| (st.base_ref)(0, s)))
            .filter(|b| b.full_shape.len() == 2)
            .min_by_key(|b| b.full_shape.iter().copied().min().unwrap_or(0));
        if let Some(b) = narrowest {
            let side = b.full_shape.iter().copied().min().unwrap_or(0);
            if cfg.rank > side {
                bail!("--lora-rank {} is above the limit of {side}: the smaller side of `{}` {:?} (a LoRA rank cannot exceed min(out, in))", cfg.rank, b.name, b.full_shape);
            }
        }
        let (t, v) = (text.build(dev, dt, cfg)?, vision.build(dev, dt, cfg)?);
        if t.is_empty() && v.is_empty() {
            bail!("LoRA: the targets {:?} name no module of this model", cfg.targets);
        }
        Ok(LoraState { cfg: cfg.clone(), text: t, vision: v, grads: None })
    }

    /// Every adapter tensor with its PEFT name (text layers, then vision blocks).
    pub fn entries(&self) -> Vec<(ParamRef, &Buf)> {
        self.text.iter().chain(&self.vision).flat_map(|l| l.entries()).collect()
    }

    /// Adapter elements in total.
    pub fn num_params(&self) -> usize {
        self.entries().iter().map(|(r, _)| r.numel()).sum()
    }

    /// Every adapter tensor, mutably (e.g. to restore the optimizer's masters).
    pub fn entries_mut(&mut self) -> Vec<(ParamRef, &mut Buf)> {
        self.text.iter_mut().chain(self.vision.iter_mut()).flat_map(|l| l.entries_mut()).collect()
    }

    /// Every adapter tensor, mutably, with its gradient (for the optimizer). Empty before the
    /// first `zero_grads`.
    pub fn params_and_grads(&mut self) -> Vec<(ParamRef, &mut Buf, &Buf)> {
        let LoraState { text, vision, grads, .. } = self;
        let Some(g) = grads.as_ref() else { return Vec::new() };
        let gs = g.text.iter().chain(&g.vision).flat_map(|l| l.entries());
        let ps = text.iter_mut().chain(vision.iter_mut()).flat_map(|l| l.entries_mut());
        ps.zip(gs).map(|((r, p), (_, g))| (r, p, g)).collect()
    }

    /// Zeroes the adapter gradients (allocating them on first use).
    pub fn zero_grads(&mut self, dev: &Device) -> Result<()> {
        self.grads = None;
        let z = |v: &[LayerLora]| v.iter().map(|l| l.zeros_f32_like(dev)).collect::<Result<Vec<_>>>();
        self.grads = Some(LoraGrads { text: z(&self.text)?, vision: z(&self.vision)? });
        Ok(())
    }

    /// Bytes of every gradient buffer this state holds (0 before `zero_grads`): the adapters'
    /// f32 gradients only.
    pub fn grad_bytes(&self) -> usize {
        let Some(g) = &self.grads else { return 0 };
        g.text.iter().chain(&g.vision).flat_map(|l| l.entries()).map(|(_, b)| b.len() * b.dtype().size()).sum()
    }

    /// The gradients as full tensors by PEFT name.
    pub fn grads_by_name(&self, dev: &Device) -> Result<NamedTensors> {
        match &self.grads {
            Some(g) => assemble(dev, g.text.iter().chain(&g.vision).flat_map(|l| l.entries()).collect()),
            None => Ok(NamedTensors::new()),
        }
    }

    /// Adds (alpha/r)·B·A into the base tensors of `full` (checkpoint name → full tensor), in
    /// f32 on the host: the weights of a merged save.
    pub fn merge_into(&self, dev: &Device, full: &mut NamedTensors) -> Result<()> {
        for l in self.text.iter().chain(&self.vision) {
            for bt in &l.b {
                let sa = l.a_slot(bt.slot);
                let Some(at) = l.a.iter().find(|t| t.slot == sa) else { bail!("LoRA: no A for `{}`", bt.name.name) };
                let (a, b) = (dev.to_vec(&at.buf)?, dev.to_vec(&bt.buf)?); // [r, in], [rows, r]
                let Some((shape, w)) = full.get_mut(&bt.base.name) else {
                    bail!("LoRA merge: base tensor `{}` not found", bt.base.name)
                };
                let din = shape.get(1).copied().unwrap_or(0);
                let (r0, rows) = (bt.base.row0 * din, bt.base.rows * din);
                if shape.len() != 2
                    || r0 + rows > w.len()
                    || a.len() != l.rank * din
                    || b.len() != bt.base.rows * l.rank
                {
                    bail!(
                        "LoRA merge: `{}` {shape:?} does not fit its adapter (rank {}, rows {}..{})",
                        bt.base.name,
                        l.rank,
                        bt.base.row0,
                        bt.base.row0 + bt.base.rows
                    );
                }
                // W[rows] [rows, in] += scale · B [rows, r] · A [r, in]
                matmul::cpu::gemm(
                    &mut w[r0..r0 + rows],
                    &b,
                    &a,
                    matmul::Mm::new(bt.base.rows, din, l.rank).alpha(l.scale).beta(1.0),
                );
            }
        }
        Ok(())
    }

    /// The `target_modules` regular expression: every adapted module path (its weight's name
    /// mapped by `name_of`) with the layer index generalised
    /// (`model\.layers\.\d+\.self_attn\.q_proj`), as alternatives.
    pub fn target_modules_regex(&self, name_of: &dyn Fn(&str) -> String) -> Result<String> {
        let mut alts = BTreeSet::new();
        for l in self.text.iter().chain(&self.vision) {
            for t in &l.b {
                let base = ParamRef { name: name_of(&t.base.name), ..t.base.clone() };
                let parts: Vec<String> = module_of(&base)?
                    .split('.')
                    .map(|p| {
                        if !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()) {
                            r"\d+".to_string()
                        } else {
                            escape(p)
                        }
                    })
                    .collect();
                alts.insert(parts.join(r"\."));
            }
        }
        Ok(format!("(?:{})", alts.into_iter().collect::<Vec<_>>().join("|")))
    }

    /// PEFT's `adapter_config.json` for these adapters (module paths from the base weights'
    /// names mapped by `name_of`).
    pub fn adapter_config(&self, base_model: &str, name_of: &dyn Fn(&str) -> String) -> Result<serde_json::Value> {
        Ok(serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.cfg.rank,
            "lora_alpha": self.cfg.alpha,
            "lora_dropout": 0.0,
            "target_modules": self.target_modules_regex(name_of)?,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
            "use_rslora": false,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": null
        }))
    }

    /// Writes `dir/adapter_model.safetensors` (PEFT names, `dtype`) and `dir/adapter_config.json`,
    /// each atomically (the weights are staged in a hidden folder and renamed in). `name_of`
    /// maps a base weight's canonical name to the one the base checkpoint uses (the PEFT module
    /// paths must be the loaded model's).
    pub fn save_adapter(
        &self, dev: &Device, dir: &Path, base_model: &str, dtype: SaveDtype, name_of: &dyn Fn(&str) -> String,
    ) -> Result<()> {
        let mut pieces = Vec::new();
        for l in self.text.iter().chain(&self.vision) {
            for t in l.a.iter().chain(&l.b) {
                pieces.push((ParamRef { name: peft_key(t, name_of)?, ..t.name.clone() }, &t.buf));
            }
        }
        let full = assemble(dev, pieces)?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let stage = dir.join(format!(".adapter-stage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&stage);
        let specs: Vec<(String, Vec<usize>)> = full.iter().map(|(n, (s, _))| (n.clone(), s.clone())).collect();
        let vals: Vec<&Vec<f32>> = full.values().map(|(_, v)| v).collect();
        let staged = save_sharded_with(&stage, &specs, dtype, usize::MAX, |i| Ok(vals[i].clone())).and_then(|_| {
            std::fs::rename(stage.join(SINGLE_FILE), dir.join(ADAPTER_WEIGHTS))
                .with_context(|| format!("moving the adapter weights into {}", dir.display()))
        });
        let _ = std::fs::remove_dir_all(&stage);
        staged?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all(); // persist the rename (best effort)
        }
        let json = serde_json::to_string_pretty(&self.adapter_config(base_model, name_of)?)?;
        atomic::write_file(dir.join(ADAPTER_CONFIG), json.as_bytes())
    }
}

/// The PEFT key of an adapter tensor with its base weight named by `name_of`.
fn peft_key(t: &LoraTensor, name_of: &dyn Fn(&str) -> String) -> Result<String> {
    let which = if t.name.name.ends_with(".lora_A.weight") { "lora_A" } else { "lora_B" };
    let base = ParamRef { name: name_of(&t.base.name), ..t.base.clone() };
    Ok(format!("base_model.model.{}.{which}.weight", module_of(&base)?))
}

/// Escapes a module-path component for a regular expression.
fn escape(s: &str) -> String {
    s.chars().flat_map(|c| if c.is_ascii_alphanumeric() || c == '_' { vec![c] } else { vec!['\\', c] }).collect()
}

/// A PEFT LoRA adapter directory as read back: its settings and tensors by file key.
pub struct AdapterFiles {
    /// `adapter_config.json` as written.
    pub config: serde_json::Value,
    pub rank: usize,
    /// alpha such that alpha / rank is the scale (rsLoRA's alpha / √r folded in).
    pub alpha: f64,
    /// `base_model_name_or_path` (empty when absent).
    pub base_model: String,
    /// File key → (shape, values).
    pub tensors: std::collections::HashMap<String, (Vec<usize>, Vec<f64>)>,
}

impl AdapterFiles {
    /// Reads `dir/adapter_config.json` and `dir/adapter_model.safetensors`; settings this
    /// project cannot apply exactly (DoRA, per-module ranks, trained biases, ...) are errors.
    pub fn read(dir: &Path) -> Result<AdapterFiles> {
        let cpath = dir.join(ADAPTER_CONFIG);
        let config = crate::models::read_json(&cpath)?;
        let get = |k: &str| config.get(k).filter(|v| !v.is_null());
        let ctx = |what: String| format!("{}: {what}", cpath.display());
        match get("peft_type").and_then(|v| v.as_str()) {
            Some("LORA") => {}
            other => bail!(ctx(format!("peft_type {other:?} is not \"LORA\""))),
        }
        let rank = get("r")
            .and_then(|v| v.as_u64())
            .filter(|&r| r > 0)
            .with_context(|| ctx("`r` must be a positive integer".into()))? as usize;
        let alpha =
            get("lora_alpha").and_then(|v| v.as_f64()).with_context(|| ctx("`lora_alpha` must be a number".into()))?;
        let on = |k: &str| get(k).and_then(|v| v.as_bool()).unwrap_or(false);
        let non_empty = |k: &str| {
            get(k).is_some_and(|v| {
                v.as_object().is_some_and(|m| !m.is_empty()) || v.as_array().is_some_and(|a| !a.is_empty())
            })
        };
        for k in ["use_dora", "fan_in_fan_out"] {
            if on(k) {
                bail!(ctx(format!("`{k}: true` is not supported")));
            }
        }
        for k in ["rank_pattern", "alpha_pattern", "modules_to_save"] {
            if non_empty(k) {
                bail!(ctx(format!(
                    "`{k}` is not supported (one rank and alpha for every module, no extra trained modules)"
                )));
            }
        }
        if get("bias").and_then(|v| v.as_str()).is_some_and(|b| b != "none") {
            bail!(ctx("only `bias: \"none\"` is supported".into()));
        }
        // rsLoRA scales by alpha / √r.
        let alpha = if on("use_rslora") { alpha * (rank as f64).sqrt() } else { alpha };
        let base_model = get("base_model_name_or_path").and_then(|v| v.as_str()).unwrap_or("").to_string();
        let tensors = crate::checkpoint::safetensors_io::read_tensor_file(dir.join(ADAPTER_WEIGHTS))?;
        Ok(AdapterFiles { config, rank, alpha, base_model, tensors })
    }

    /// The module paths the file adapts (`base_model.model.<module>.lora_A.weight`).
    pub fn modules(&self) -> Result<BTreeSet<String>> {
        let mut out = BTreeSet::new();
        for k in self.tensors.keys() {
            let m = k
                .strip_prefix("base_model.model.")
                .and_then(|m| m.strip_suffix(".lora_A.weight").or_else(|| m.strip_suffix(".lora_B.weight")))
                .with_context(|| {
                    format!("{ADAPTER_WEIGHTS}: `{k}` is not a LoRA tensor (base_model.model.<module>.lora_A/B.weight)")
                })?;
            out.insert(m.to_string());
        }
        Ok(out)
    }

    /// The target names (`TEXT_TARGETS` / `VISION_TARGETS`) of the adapted modules.
    pub fn targets(&self) -> Result<Vec<String>> {
        let mut out = BTreeSet::new();
        for m in self.modules()? {
            if m.contains("vision_tower.") || m.contains("multi_modal_projector.") {
                bail!("{ADAPTER_WEIGHTS}: an adapter on `{m}` (the CLIP tower or projector) is not supported");
            }
            let last = m.rsplit('.').next().unwrap_or(&m);
            out.insert(if m.contains("visual.") { format!("visual.{last}") } else { last.to_string() });
        }
        Ok(out.into_iter().collect())
    }

    /// The LoRA settings to enable before loading the values.
    pub fn lora_config(&self) -> Result<LoraConfig> {
        let c = LoraConfig { rank: self.rank, alpha: self.alpha, targets: self.targets()?, seed: 0 };
        c.validate().context("the adapter's modules")?;
        Ok(c)
    }
}

/// The part of tensor `full` ([rows_total, cols]) that piece `r` covers.
pub fn piece_of(r: &ParamRef, shape: &[usize], full: &[f64]) -> Result<Vec<f32>> {
    if shape != r.full_shape.as_slice() {
        bail!("`{}` has shape {shape:?}, expected {:?}", r.name, r.full_shape);
    }
    let cols: usize = shape[1..].iter().product();
    Ok(full[r.row0 * cols..(r.row0 + r.rows) * cols].iter().map(|&x| x as f32).collect())
}
