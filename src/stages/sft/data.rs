//! The SFT data: the bundled demo set, loading and encoding a JSONL file for a model (every
//! problem listed, or skipped with `--skip-bad`), and the seed-fixed plan of micro-batches.

use super::args::SftPlan;
use super::model_io::Loaded;
use crate::data::dataset::{load_jsonl_with, LoadOptions};
use crate::models::limits;
use crate::models::qwen2_5_vl::config::{QwenPreprocessorConfig, QwenVlConfig};
use crate::rng::Rng;
use crate::stages::examples::{micro_batches, Example};
use crate::stages::model::Encoder;
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// The bundled demo data: `$AM3_DEMO_DATA`, else `data/demo/train.jsonl` under the current
/// directory, else in the checkout this binary was built from.
pub fn demo_data() -> PathBuf {
    if let Ok(p) = std::env::var("AM3_DEMO_DATA") {
        return PathBuf::from(p);
    }
    let local = PathBuf::from("data/demo/train.jsonl");
    if local.is_file() {
        return local;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/demo/train.jsonl")
}

/// Loads and encodes a JSONL file for a Qwen2.5-VL model (every bad line reported with
/// file:line).
pub fn load_examples(
    path: &Path, tok: &Tokenizer, cfg: &QwenVlConfig, pp: &QwenPreprocessorConfig,
) -> Result<Vec<Example>> {
    let tmpl = crate::models::qwen2_5_vl::chat::ChatTemplate::new(tok, cfg)?;
    encode_file(path, &Encoder::Qwen { tmpl, cfg, pp })
}

/// Loads a JSONL file and encodes every sample for the model behind `enc` (any problem fails
/// the load, all of them listed).
pub fn encode_file(path: &Path, enc: &Encoder) -> Result<Vec<Example>> {
    encode_file_with(path, enc, false)
}

/// As `encode_file`; with `skip_bad`, invalid samples are reported on stderr and left out.
pub fn encode_file_with(path: &Path, enc: &Encoder, skip_bad: bool) -> Result<Vec<Example>> {
    Ok(encode_data(path, enc, skip_bad)?.examples)
}

/// A dataset encoded for a model.
pub struct EncodedData {
    pub examples: Vec<Example>,
    /// The images the kept samples use, in order (for the data's identity).
    pub images: Vec<PathBuf>,
    /// Every sample left out, as `file:line: reason` (only under `skip_bad`).
    pub skipped: Vec<String>,
}

/// Loads `path` and encodes every sample (images decoded and preprocessed) before deciding:
/// every problem of every sample — bad lines and fields, images that do not decode, templates
/// that fail — is collected. Without `skip_bad` any problem fails the load listing them all;
/// with it the bad samples are left out, each one reported on stderr.
pub fn encode_data(path: &Path, enc: &Encoder, skip_bad: bool) -> Result<EncodedData> {
    encode_data_within(path, enc, skip_bad, usize::MAX)
}

/// `encode_data`, where a sample longer than `batch_tokens` or the model's positions is a
/// problem too (`file:line: N tokens, limit M`), found before any step trains on it.
pub fn encode_data_within(path: &Path, enc: &Encoder, skip_bad: bool, batch_tokens: usize) -> Result<EncodedData> {
    let max_tokens = limits::sample_token_limit(batch_tokens, enc.max_positions());
    let loaded = load_jsonl_with(path, LoadOptions { skip_bad: true, ..Default::default() })?;
    let mut problems: Vec<String> = loaded.errors.iter().map(|e| e.to_string()).collect();
    let (mut examples, mut images) = (Vec::with_capacity(loaded.samples.len()), Vec::new());
    for s in &loaded.samples {
        match enc.encode(s) {
            Ok(ex) if ex.len() > max_tokens => {
                problems.push(limits::sample_too_long(&s.origin, &s.id, ex.len(), batch_tokens, enc.max_positions()))
            }
            Ok(ex) => {
                examples.push(ex);
                images.extend(s.images.iter().cloned());
            }
            Err(e) => {
                // `encode` prefixes "sample ID (file:line): "; report it as file:line first.
                let msg = format!("{e:#}");
                let prefix = format!("sample {} ({}): ", s.id, s.origin);
                let reason = msg.strip_prefix(&prefix).unwrap_or(&msg);
                problems.push(format!("{}: sample {:?}: {reason}", s.origin, s.id));
            }
        }
    }
    if !problems.is_empty() && !skip_bad {
        let list: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
        bail!(
            "{}: {} problem(s) in the dataset (fix them, or pass --skip-bad true to leave those samples out):\n{}",
            path.display(),
            problems.len(),
            list.join("\n")
        );
    }
    for p in &problems {
        eprintln!("am3 sft: skipped {p}");
    }
    if examples.is_empty() {
        bail!("{}: no usable sample ({} skipped)", path.display(), problems.len());
    }
    let bad_lines: std::collections::BTreeSet<usize> = loaded.errors.iter().map(|e| e.line).collect();
    let skipped = bad_lines.len() + loaded.samples.len() - examples.len();
    if skipped > 0 {
        eprintln!("am3 sft: {skipped} of {} samples skipped", skipped + examples.len());
    }
    Ok(EncodedData { examples, images, skipped: problems })
}

/// Encodes `path` for the loaded model, with its tokenizer and processor.
pub fn load_examples_for(path: &Path, l: &Loaded) -> Result<Vec<Example>> {
    encode_file(path, &Encoder::new(&l.model, &l.tok, &l.pp)?)
}

/// `load_examples_for`, leaving out (and reporting) invalid lines when `skip_bad`.
pub fn load_examples_skipping(path: &Path, l: &Loaded, skip_bad: bool) -> Result<Vec<Example>> {
    encode_file_with(path, &Encoder::new(&l.model, &l.tok, &l.pp)?, skip_bad)
}

/// The whole run's micro-batches, fixed by the seed: epoch k visits the examples in a
/// seed-and-k shuffled order.
pub fn plan_micro_batches(examples: &[Example], plan: &SftPlan) -> Vec<Vec<usize>> {
    let lens: Vec<usize> = examples.iter().map(|e| e.len()).collect();
    let need = plan.steps as usize * plan.grad_accum;
    let mut out = Vec::with_capacity(need);
    let mut epoch = 0u64;
    while out.len() < need {
        let mut order: Vec<usize> = (0..examples.len()).collect();
        let mut rng = Rng::new(plan.seed.wrapping_mul(1_000_003).wrapping_add(epoch));
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        out.extend(micro_batches(&order, &lens, plan.batch_tokens));
        epoch += 1;
    }
    out.truncate(need);
    out
}
