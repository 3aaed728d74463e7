//! LoRA for the stages: `VlModel` calls that enable adapters on either family, list what the
//! optimizer trains, and save the result, either merged into full HF weights (config.json +
//! safetensors, loadable as the base family) or as a PEFT adapter directory
//! (`adapter_model.safetensors` + `adapter_config.json`) that `PeftModel.from_pretrained` loads
//! onto the model transformers builds; and loading such a directory back (base + adapter). The
//! adapter math and storage live in `models::common::lora`.
//!
//! PEFT names modules by the loaded model's attribute paths, not by checkpoint keys:
//! `Qwen2_5_VLForConditionalGeneration` has `model.language_model.layers.N.*` and
//! `model.visual.blocks.N.*`, `LlavaNextForConditionalGeneration` `model.language_model.layers.N.*`
//! (transformers ≥ 4.52, and 5). `hf_module_name` maps the canonical names to those.

use super::model::{Family, Net, VlModel};
use crate::checkpoint::safetensors_io::{save_sharded_with, SaveDtype};
use crate::models::common::lora::{piece_of, AdapterFiles, LoraConfig, LoraState, ADAPTER_CONFIG};
use crate::models::common::params::ParamRef;
use crate::models::common::train_state::TrainState;
use crate::tensor::{Buf, Device};
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The `torch_dtype` value of tensors saved as `d`.
pub fn hf_dtype(d: SaveDtype) -> &'static str {
    match d {
        SaveDtype::F32 => "float32",
        SaveDtype::BF16 => "bfloat16",
    }
}

/// The attribute path transformers gives the canonical tensor `name` in the model class it
/// builds for `family` (`model.layers.3.mlp.up_proj.weight` →
/// `model.language_model.layers.3.mlp.up_proj.weight` for Qwen2.5-VL).
pub fn hf_module_name(family: Family, name: &str) -> String {
    match family {
        Family::Qwen => {
            if let Some(rest) = name.strip_prefix("model.") {
                format!("model.language_model.{rest}")
            } else if name.starts_with("visual.") {
                format!("model.{name}")
            } else {
                name.to_string()
            }
        }
        Family::Llava => {
            if let Some(rest) = name.strip_prefix("language_model.model.") {
                format!("model.language_model.{rest}")
            } else if name == "language_model.lm_head.weight" {
                "lm_head.weight".to_string()
            } else if name.starts_with("vision_tower.")
                || name.starts_with("multi_modal_projector.")
                || name == "image_newline"
            {
                format!("model.{name}")
            } else {
                name.to_string()
            }
        }
    }
}

/// How a LoRA run saves its checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraSave {
    /// Full weights with W += (alpha/r)·B·A (a plain checkpoint of the base family).
    Merged,
    /// The PEFT adapter files only (the base stays where it was).
    Adapter,
}

impl std::str::FromStr for LoraSave {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "merged" => Ok(LoraSave::Merged),
            "adapter" => Ok(LoraSave::Adapter),
            other => bail!("--lora-save: expected `merged` or `adapter`, got `{other}`"),
        }
    }
}

impl VlModel {
    /// Adapters on the projections `cfg` names (the base is frozen from then on).
    pub fn enable_lora(&mut self, dev: &Device, cfg: &LoraConfig) -> Result<()> {
        match &mut self.net {
            Net::Qwen(m) => m.enable_lora(dev, cfg),
            Net::Llava(m) => m.enable_lora(dev, cfg),
        }
    }

    /// The adapters, when enabled.
    pub fn lora(&self) -> Option<&LoraState> {
        match &self.net {
            Net::Qwen(m) => m.lora(),
            Net::Llava(m) => m.lora(),
        }
    }

    /// What the optimizer holds: the adapters under LoRA, else every parameter.
    pub fn trainable_entries(&self) -> Vec<(ParamRef, &Buf)> {
        match &self.net {
            Net::Qwen(m) => m.trainable_entries(),
            Net::Llava(m) => m.trainable_entries(),
        }
    }

    /// Writes the weights with the adapters merged in (the source checkpoint's names, `dtype`,
    /// shards of at most 5 GB) and config.json into `dir`.
    pub fn save_merged(&self, dev: &Device, dir: &Path, dtype: SaveDtype) -> Result<()> {
        let full = match &self.net {
            Net::Qwen(m) => m.merged_weights(dev)?,
            Net::Llava(m) => m.merged_weights(dev)?,
        };
        let specs: Vec<(String, Vec<usize>)> =
            full.iter().map(|(n, (s, _))| (self.stored_name(n).to_string(), s.clone())).collect();
        let vals: Vec<&Vec<f32>> = full.values().map(|(_, v)| v).collect();
        save_sharded_with(dir, &specs, dtype, 5 << 30, |i| Ok(vals[i].clone()))?;
        match &self.net {
            Net::Qwen(m) => m.cfg.save_as(dir, hf_dtype(dtype)),
            Net::Llava(m) => m.cfg.save_as(dir, hf_dtype(dtype)),
        }
    }

    /// Writes the PEFT adapter files into `dir`: keys and `target_modules` in transformers'
    /// module paths (`hf_module_name`), `base_model` as `base_model_name_or_path`.
    pub fn save_lora_adapter(&self, dev: &Device, dir: &Path, base_model: &str, dtype: SaveDtype) -> Result<()> {
        let family = self.family();
        match self.lora() {
            Some(l) => l.save_adapter(dev, dir, base_model, dtype, &|n| hf_module_name(family, n)),
            None => bail!("no LoRA adapters to save (LoRA is not enabled)"),
        }
    }

    /// Enables the adapters of the PEFT directory `dir` (ours or PEFT's) on this model and loads
    /// their values. Keys may use transformers' module paths, the canonical names or the
    /// source checkpoint's; every adapter tensor must be there and every key used.
    pub fn load_lora_adapter(&mut self, dev: &Device, dir: &Path) -> Result<()> {
        let files = AdapterFiles::read(dir)?;
        let cfg = files.lora_config().with_context(|| format!("{}", dir.display()))?;
        self.enable_lora(dev, &cfg)?;
        self.zero_grads(dev)?;
        let refs: Vec<ParamRef> = self.params_and_grads().iter().map(|(r, _, _)| r.clone()).collect();
        let family = self.family();
        let keys_of = |internal: &str| -> Vec<String> {
            // internal: base_model.model.<canonical module>.lora_X.weight
            let Some(rest) = internal.strip_prefix("base_model.model.") else { return vec![internal.to_string()] };
            let (module, which) = match rest.rsplit_once(".lora_") {
                Some((m, w)) => (m, format!(".lora_{w}")),
                None => return vec![internal.to_string()],
            };
            let w = format!("{module}.weight");
            let mut out = Vec::new();
            for n in [hf_module_name(family, &w), w.clone(), self.stored_name(&w).to_string()] {
                let k = format!("base_model.model.{}{which}", n.strip_suffix(".weight").unwrap_or(&n));
                if !out.contains(&k) {
                    out.push(k);
                }
            }
            out
        };
        let wanted: Vec<(ParamRef, Vec<String>)> = refs
            .into_iter()
            .map(|r| {
                let k = keys_of(&r.name);
                (r, k)
            })
            .collect();
        let mut used = BTreeSet::new();
        let mut vals = Vec::new();
        for (r, keys) in &wanted {
            let Some(k) = keys.iter().find(|k| files.tensors.contains_key(*k)) else {
                bail!(
                    "{}: no `{}` (the adapter does not cover every layer of the model)",
                    dir.join(crate::models::common::lora::ADAPTER_WEIGHTS).display(),
                    keys[0]
                );
            };
            let (shape, v) = &files.tensors[k];
            vals.push(piece_of(r, shape, v).with_context(|| format!("{}", dir.display()))?);
            used.insert(k.clone());
        }
        let unused: Vec<&String> = files.tensors.keys().filter(|k| !used.contains(*k)).collect();
        if !unused.is_empty() {
            bail!("{}: tensors that match no module of this {} model: {unused:?}", dir.display(), family.model_type());
        }
        for ((_, p, _), v) in self.params_and_grads().into_iter().zip(vals) {
            *p = dev.upload(&v, p.dtype())?;
        }
        Ok(())
    }

    /// A model directory, or a PEFT adapter directory (adapter_config.json and no config.json):
    /// then its base (`base_model_name_or_path`, see `resolve_base`) with the adapter on.
    pub fn load_model_or_adapter(dev: &Device, dir: &Path) -> Result<VlModel> {
        if dir.join("config.json").is_file() || !dir.join(ADAPTER_CONFIG).is_file() {
            return VlModel::load(dev, dir);
        }
        let files = AdapterFiles::read(dir)?;
        let base = resolve_base(&files.base_model, dir)?;
        let mut m =
            VlModel::load(dev, &base).with_context(|| format!("the base model of adapter {}", dir.display()))?;
        m.load_lora_adapter(dev, dir)?;
        Ok(m)
    }

    /// Saves what a training run produced: plain weights without LoRA, else per `how`.
    pub fn save_trained(
        &self, dev: &Device, dir: &Path, dtype: SaveDtype, how: LoraSave, base_model: &str,
    ) -> Result<()> {
        match (self.lora().is_some(), how) {
            (false, _) => self.save(dev, dir, dtype),
            (true, LoraSave::Merged) => self.save_merged(dev, dir, dtype),
            (true, LoraSave::Adapter) => self.save_lora_adapter(dev, dir, base_model, dtype),
        }
    }
}

/// `owner/name` with the hub's characters (a hub id, not a path).
fn is_hub_id(s: &str) -> bool {
    let ok = |p: &str| {
        !p.is_empty() && !p.starts_with('.') && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    matches!(s.split_once('/'), Some((o, n)) if ok(o) && ok(n)) && !Path::new(s).exists()
}

/// What an adapter records as its base for the model in `dir`: the hub id when `dir` is a hub
/// download (a `models--OWNER--NAME/snapshots/REV` directory of the HF cache, or a config whose
/// root `_name_or_path` is a hub id), else the absolute path (so the adapter loads from any
/// working directory).
pub fn base_model_ref(dir: &Path) -> Result<String> {
    let abs = std::fs::canonicalize(dir).with_context(|| format!("resolving {}", dir.display()))?;
    let parts: Vec<String> = abs.components().map(|c| c.as_os_str().to_string_lossy().to_string()).collect();
    for w in parts.windows(3) {
        if let (Some(id), "snapshots") = (w[0].strip_prefix("models--"), w[1].as_str()) {
            if let Some((o, n)) = id.split_once("--") {
                return Ok(format!("{o}/{n}"));
            }
        }
    }
    if let Ok(v) = crate::models::read_json(&abs.join("config.json")) {
        if let Some(id) = v.get("_name_or_path").and_then(|x| x.as_str()).filter(|s| is_hub_id(s)) {
            return Ok(id.to_string());
        }
    }
    Ok(abs.to_string_lossy().to_string())
}

/// The local directory of an adapter's `base_model_name_or_path`: a directory as written (or
/// relative to the adapter), or a hub id found in the HF cache (`HF_HUB_CACHE`, `HF_HOME/hub`,
/// `~/.cache/huggingface/hub`; `refs/main`'s snapshot).
pub fn resolve_base(base: &str, adapter_dir: &Path) -> Result<PathBuf> {
    let env = |k: &str| std::env::var_os(k).map(PathBuf::from);
    let caches: Vec<PathBuf> = [
        env("HF_HUB_CACHE"),
        env("HF_HOME").map(|h| h.join("hub")),
        env("HOME").map(|h| h.join(".cache/huggingface/hub")),
    ]
    .into_iter()
    .flatten()
    .collect();
    resolve_base_in(base, adapter_dir, &caches)
}

/// `resolve_base` with the HF cache directories given.
pub fn resolve_base_in(base: &str, adapter_dir: &Path, caches: &[PathBuf]) -> Result<PathBuf> {
    let file = adapter_dir.join(ADAPTER_CONFIG);
    if base.is_empty() {
        bail!("{}: no base_model_name_or_path", file.display());
    }
    for p in [PathBuf::from(base), adapter_dir.join(base)] {
        if p.join("config.json").is_file() {
            return Ok(p);
        }
    }
    if is_hub_id(base) {
        let repo = format!("models--{}", base.replace('/', "--"));
        for c in caches {
            let r = c.join(&repo);
            if let Ok(rev) = std::fs::read_to_string(r.join("refs/main")) {
                let snap = r.join("snapshots").join(rev.trim());
                if snap.join("config.json").is_file() {
                    return Ok(snap);
                }
            }
        }
    }
    bail!("{}: the base model `{base}` is neither a model directory nor a hub id in the local HF cache (download it, or edit base_model_name_or_path)", file.display())
}

/// Most LoRA rank a flag accepts (the model's own limit is checked when the adapters are made).
pub const MAX_LORA_RANK: u64 = 65_536;

/// A stage's LoRA flags, checked: (rank, alpha, targets, save); rank 0 is a full fine-tune and
/// then the other flags must be absent. Defaults: alpha = 2·rank, the seven projections of every
/// text layer, `merged`.
pub fn resolve_lora(
    rank: Option<usize>, alpha: Option<f64>, targets: Option<&str>, save: Option<&str>,
) -> Result<(usize, f64, Vec<String>, String)> {
    use crate::models::common::lora::DEFAULT_TARGETS;
    use crate::train::flags::{float_in, int_in, End};
    let rank = int_in("--lora-rank", rank.unwrap_or(0), 0, MAX_LORA_RANK)?;
    if rank == 0 {
        if alpha.is_some() || targets.is_some() || save.is_some() {
            bail!("--lora-alpha, --lora-targets and --lora-save need --lora-rank > 0");
        }
        return Ok((0, 0.0, Vec::new(), String::new()));
    }
    let alpha = float_in("--lora-alpha", alpha.unwrap_or(2.0 * rank as f64), 0.0, End::Open, 1e6, End::Closed)?;
    let targets = targets.map(LoraConfig::parse_targets).unwrap_or_else(|| DEFAULT_TARGETS.map(String::from).to_vec());
    let save = save.unwrap_or("merged").to_string();
    save.parse::<LoraSave>()?;
    LoraConfig { rank, alpha, targets: targets.clone(), seed: 0 }.validate()?;
    Ok((rank, alpha, targets, save))
}
