//! SFT checkpoints: `trainer_state.json`, the identities `--resume` checks, and writing a
//! checkpoint atomically.

use super::args::SftPlan;
use super::model_io::{save_side_files, Loaded};
use crate::checkpoint::safetensors_io::{write_atomic, SaveDtype};
use crate::models::tiny;
use crate::stages::lora::LoraSave;
use crate::tensor::Device;
use crate::train::optim::Optimizer;
use crate::train::run_dir::{self, Identity, RunDir};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `trainer_state.json` of a checkpoint: where the run stands and what it was started with.
#[derive(Serialize, Deserialize)]
pub(super) struct TrainerState {
    pub(super) step: u64,
    pub(super) plan: SftPlan,
    pub(super) data: PathBuf,
    pub(super) model: Option<PathBuf>,
    /// The data and model the run started with (checked by `--resume`).
    pub(super) data_id: Identity,
    pub(super) model_id: Identity,
}

/// What the embedded tiny model is made of (its weights follow from these and the seed).
pub(super) fn tiny_identity() -> Identity {
    let seed = tiny::INIT_SEED.to_le_bytes();
    Identity::of_bytes(
        "(the embedded tiny model)",
        &[
            ("config.json", tiny::CONFIG_JSON.as_bytes()),
            ("tokenizer.json", tiny::TOKENIZER_JSON.as_bytes()),
            ("preprocessor_config.json", tiny::PREPROCESSOR_JSON.as_bytes()),
            ("init seed", &seed),
        ],
    )
}

/// What a checkpoint's `checksums.json` covers: everything `--resume` reads.
const RESUME_STATE: [&str; 2] = ["trainer_state.json", "train_state"];

/// The newest complete checkpoint in `out` (see `run_dir::latest_checkpoint`).
pub fn latest_checkpoint(out: &Path) -> Result<Option<PathBuf>> {
    run_dir::latest_checkpoint(out)
}

/// What a run was started with, as every checkpoint's `trainer_state.json` records it: the plan,
/// the data and model (None: the embedded tiny model) and their identities.
#[derive(Clone, Copy)]
pub(super) struct RunOrigin<'a> {
    pub(super) plan: &'a SftPlan,
    pub(super) data: &'a Path,
    pub(super) model_dir: Option<&'a Path>,
    pub(super) data_id: &'a Identity,
    pub(super) model_id: &'a Identity,
}

/// Writes `out/checkpoint-NNNNNN` atomically: the HF layout (sharded safetensors + index,
/// config, tokenizer and processor files) plus `train_state/`, `trainer_state.json` and the
/// checksums of both; then points `out/latest` at it.
pub(super) fn save_checkpoint(
    dev: &Device, rd: &RunDir, step: u64, l: &Loaded, opt: &Optimizer, origin: &RunOrigin,
) -> Result<PathBuf> {
    let RunOrigin { plan, data, model_dir, data_id, model_id } = *origin;
    rd.save_checkpoint(step, &RESUME_STATE, |tmp| {
        let how: LoraSave = if plan.lora_rank > 0 { plan.lora_save.parse()? } else { LoraSave::Merged };
        let base = if how == LoraSave::Adapter {
            crate::stages::export::adapter_base(dev, l, rd.path(), model_dir)?
        } else {
            String::new()
        };
        l.model.save_trained(dev, tmp, if dev.is_cuda() { SaveDtype::BF16 } else { SaveDtype::F32 }, how, &base)?;
        save_side_files(l, tmp)?;
        opt.save(dev, &tmp.join("train_state"))?;
        let st = TrainerState {
            step,
            plan: plan.clone(),
            data: data.to_path_buf(),
            model: model_dir.map(Path::to_path_buf),
            data_id: data_id.clone(),
            model_id: model_id.clone(),
        };
        write_atomic(&tmp.join("trainer_state.json"), serde_json::to_string_pretty(&st)?.as_bytes())
    })
}
