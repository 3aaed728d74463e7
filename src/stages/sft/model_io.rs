//! The model to train (`Loaded`: model, tokenizer, processor) and its HF files: loading one
//! (a directory or the embedded tiny default), saving weights and the side files.

use crate::checkpoint::safetensors_io::SaveDtype;
use crate::models::qwen2_5_vl::chat::load_tokenizer;
use crate::models::qwen2_5_vl::model::QwenVl;
use crate::models::tiny;
use crate::stages::model::{save_weights, Processor, VlModel};
use crate::tensor::Device;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// The model, tokenizer and processor settings to train.
pub struct Loaded {
    pub model: VlModel,
    pub tok: Tokenizer,
    pub pp: Processor,
    /// Where the tokenizer/processor files came from (copied into checkpoints), if a directory.
    pub src_dir: Option<PathBuf>,
}

pub fn load_model(dev: &Device, dir: Option<&Path>, seed: u64) -> Result<Loaded> {
    match dir {
        None => {
            let tok = tiny::tokenizer()?;
            let cfg = tiny::config(&tok)?;
            let model = tiny::build(dev, cfg, tiny::INIT_SEED ^ seed)?.into();
            Ok(Loaded { model, tok, pp: Processor::Qwen(tiny::preprocessor()?), src_dir: None })
        }
        Some(d) => {
            let model = VlModel::load(dev, d)?;
            let tok = load_tokenizer(d)?.with_context(|| format!("{}: no tokenizer.json", d.display()))?;
            let pp = Processor::load(d, &model)?;
            Ok(Loaded { model, tok, pp, src_dir: Some(d.to_path_buf()) })
        }
    }
}

/// A Qwen2.5-VL model's weights as HF checkpoint tensors (canonical names), in `dtype`, shards
/// of at most 5 GB, and its config.json (`VlModel::save` for either family).
pub fn save_model(dev: &Device, model: &QwenVl, dir: &Path, dtype: SaveDtype) -> Result<()> {
    save_weights(dev, model.param_entries(), &|n| n.to_string(), dir, dtype)?;
    model.cfg.save_as(dir, crate::stages::lora::hf_dtype(dtype))
}

pub fn save_side_files(l: &Loaded, dir: &Path) -> Result<()> {
    l.tok.save(dir.join("tokenizer.json"), false).map_err(|e| anyhow::anyhow!("saving tokenizer.json: {e}"))?;
    match &l.src_dir {
        Some(src) => {
            // Qwen's and llava-hf's processor and tokenizer files, whichever the source has.
            for f in [
                "preprocessor_config.json",
                "processor_config.json",
                "tokenizer_config.json",
                "generation_config.json",
                "chat_template.json",
                "chat_template.jinja",
                "special_tokens_map.json",
                "added_tokens.json",
                "tokenizer.model",
                "vocab.json",
                "merges.txt",
            ] {
                if src.join(f).is_file() {
                    std::fs::copy(src.join(f), dir.join(f)).with_context(|| format!("copying {f}"))?;
                }
            }
        }
        None => {
            std::fs::write(dir.join("preprocessor_config.json"), tiny::PREPROCESSOR_JSON)?;
            // The embedded tiny model: its config follows from the tokenizer.
            let cfg = tiny::config(&l.tok)?;
            let gen = serde_json::json!({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": false});
            std::fs::write(dir.join("generation_config.json"), serde_json::to_string_pretty(&gen)?)?;
            crate::stages::export::write_tiny_hf_files(&l.tok, dir)?;
        }
    }
    Ok(())
}
