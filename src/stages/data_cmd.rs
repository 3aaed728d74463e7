//! `am3 data convert`: another published layout → this crate's JSONL (`data::convert`).

use crate::data::convert::{convert, FORMATS};
use crate::data::dataset::load_prompts;
use anyhow::{Context, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct DataArgs {
    #[command(subcommand)]
    pub cmd: DataCmd,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum DataCmd {
    /// Convert a dataset in another layout (SafeMT) to prompt dialogues in JSONL.
    Convert(ConvertArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct ConvertArgs {
    /// The input's layout.
    #[arg(long, value_parser = FORMATS)]
    pub format: String,
    #[arg(long)]
    pub input: PathBuf,
    /// The JSONL to write (image paths are made relative to its folder).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: &DataArgs) -> Result<()> {
    match &args.cmd {
        DataCmd::Convert(c) => {
            // The writer checks image paths relative to the output folder, so it must exist.
            if let Some(dir) = c.out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            let n = convert(&c.input, &c.format, &c.out)?;
            // Read it back as `am3 eval --data` will, so a bad conversion shows here.
            let back = load_prompts(&c.out).with_context(|| format!("re-reading {}", c.out.display()))?;
            println!("wrote {n} dialogues ({} read back) to {}", back.len(), c.out.display());
            Ok(())
        }
    }
}
