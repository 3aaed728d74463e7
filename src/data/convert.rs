//! `am3 data convert`: other published layouts → this crate's JSONL (prompt dialogues).

use super::dataset::write_jsonl;
use super::safemt::load_safemt;
use anyhow::{bail, Result};
use std::path::Path;

/// The `--format` values `convert` understands.
pub const FORMATS: [&str; 1] = ["safemt"];

/// Reads `input` in `format`, writes the project's JSONL to `out` (atomically; image paths
/// rewritten relative to `out`'s folder) and returns the number of dialogues written.
pub fn convert(input: &Path, format: &str, out: &Path) -> Result<usize> {
    if let (Ok(a), Ok(b)) = (std::fs::canonicalize(input), std::fs::canonicalize(out)) {
        if a == b {
            bail!("{}: the output would overwrite the input; choose another --out", out.display());
        }
    }
    let samples = match format {
        "safemt" => load_safemt(input)?,
        other => bail!("unknown --format {other:?} (supported: {})", FORMATS.join(", ")),
    };
    write_jsonl(&samples, out)?;
    Ok(samples.len())
}
