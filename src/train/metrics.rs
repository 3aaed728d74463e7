//! The training metrics log: JSON Lines, one object per optimizer step (`step`, `loss`, `lr`,
//! `grad_norm`, `tokens_per_s`, `memory_bytes`, plus free-form extras), appended one whole line
//! per `write` call on an O_APPEND file and flushed at once, so `tail -f` and plotting scripts see
//! complete lines and a crash loses at most the line being written. A torn last line left by a
//! crash is cut off when the log is reopened for appending (`--resume`). Lines are never
//! rewritten: a resume cuts whole lines off the end, and floats are written in their shortest
//! exact form and read back exactly (`exact_json`).

use super::exact_json;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// One optimizer step's record. Non-finite floats are written as JSON `null`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    /// Device memory in use (bytes), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Anything else worth plotting (e.g. `refusal_loss`, `epoch`), flattened into the line.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

pub struct MetricsWriter {
    file: File,
    path: PathBuf,
}

impl MetricsWriter {
    /// Starts a new log, replacing any previous one.
    pub fn create(path: impl AsRef<Path>) -> Result<MetricsWriter> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        File::create(&path).with_context(|| format!("creating metrics log {}", path.display()))?;
        Self::open_append(path)
    }

    /// Continues an existing log (creating it if missing); a torn last line is removed first.
    pub fn append(path: impl AsRef<Path>) -> Result<MetricsWriter> {
        let path = path.as_ref().to_path_buf();
        if path.exists() {
            cut_torn_tail(&path)?;
        }
        Self::open_append(path)
    }

    /// Starts a new log; an existing file is an error (it would be lost).
    pub fn create_new(path: impl AsRef<Path>) -> Result<MetricsWriter> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("creating metrics log {} (it must not exist yet)", path.display()))?;
        Ok(MetricsWriter { file, path })
    }

    fn open_append(path: PathBuf) -> Result<MetricsWriter> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening metrics log {}", path.display()))?;
        Ok(MetricsWriter { file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one step's record (fields in declaration order, then the extras).
    pub fn write(&mut self, m: &StepMetrics) -> Result<()> {
        self.write_line(serde_json::to_vec(m)?)
    }

    /// Appends any JSON object as one line.
    pub fn write_value(&mut self, v: &Value) -> Result<()> {
        if !v.is_object() {
            bail!("metrics record must be a JSON object, got {v}");
        }
        self.write_line(serde_json::to_vec(v)?)
    }

    /// One `write` call of the whole line on the O_APPEND file, then a flush.
    fn write_line(&mut self, mut line: Vec<u8>) -> Result<()> {
        line.push(b'\n');
        self.file.write_all(&line).with_context(|| format!("appending to {}", self.path.display()))?;
        self.file.flush().with_context(|| format!("flushing {}", self.path.display()))
    }

    /// Forces the lines written so far to disk (at checkpoints, so log and checkpoint agree).
    pub fn sync(&mut self) -> Result<()> {
        self.file.sync_data().with_context(|| format!("syncing {}", self.path.display()))
    }
}

/// Truncates `path` after its last newline (a line without one was torn by a crash).
fn cut_torn_tail(path: &Path) -> Result<()> {
    let mut f =
        OpenOptions::new().read(true).write(true).open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    // Scan backwards in blocks for the last '\n'.
    let mut end = len;
    let mut keep = 0u64;
    let mut buf = vec![0u8; 4096];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let n = (end - start) as usize;
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut buf[..n])?;
        if let Some(i) = buf[..n].iter().rposition(|&b| b == b'\n') {
            keep = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    if keep < len {
        f.set_len(keep).with_context(|| format!("cutting the torn last line of {}", path.display()))?;
        f.sync_data()?;
    }
    Ok(())
}

/// Reads a metrics log (floats exact). A torn last line (no newline) is ignored; any other bad
/// line is an error naming the file and line.
pub fn read_metrics(path: impl AsRef<Path>) -> Result<Vec<Value>> {
    let path = path.as_ref();
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    let mut out = Vec::new();
    for (i, line) in complete.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v = exact_json::parse(line).with_context(|| format!("{}:{}: not valid JSON", path.display(), i + 1))?;
        out.push(v);
    }
    Ok(out)
}

/// Keeps the records up to the first one with `step > last_step` (for `--resume` from an
/// earlier point than the log's end) by truncating the file there: the lines kept are not
/// rewritten, byte for byte. A torn last line goes too.
pub fn truncate_after(path: impl AsRef<Path>, last_step: u64) -> Result<()> {
    let path = path.as_ref();
    if !path.exists() {
        return Ok(());
    }
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut keep = 0usize;
    let mut line_no = 0usize;
    while let Some(nl) = bytes[keep..].iter().position(|&b| b == b'\n') {
        line_no += 1;
        let line = std::str::from_utf8(&bytes[keep..keep + nl])
            .with_context(|| format!("{}:{line_no}: not UTF-8", path.display()))?;
        if !line.trim().is_empty() {
            let v = exact_json::parse(line).with_context(|| format!("{}:{line_no}: not valid JSON", path.display()))?;
            if v.get("step").and_then(Value::as_u64).is_some_and(|s| s > last_step) {
                break;
            }
        }
        keep += nl + 1;
    }
    if keep < bytes.len() {
        let f = OpenOptions::new().write(true).open(path).with_context(|| format!("opening {}", path.display()))?;
        f.set_len(keep as u64).with_context(|| format!("truncating {}", path.display()))?;
        f.sync_data()?;
    }
    Ok(())
}
