//! The output directory of a training run (`am3 sft --out`, `am3 grpo --out`), kept safe:
//!
//! - [`RunDir::open`] takes a lock (`OUT/.am3.lock`, holding the PID; an OS file lock, so a
//!   killed run never leaves it held), removes the temporary entries dead runs left behind
//!   (`.NAME.tmp-PID[-K]`, only when that PID is gone), restores a directory swap a crash
//!   interrupted, and refuses a directory an earlier run used unless `--resume` or
//!   `--overwrite` says what to do with it. It also refuses an `--out` that overlaps an input.
//! - [`RunDir::start`] says where the run starts (the newest complete checkpoint, its
//!   checksums verified, under `--resume`); [`RunDir::begin_fresh`] clears the earlier run
//!   (`--overwrite`) only then, after the inputs loaded, so a failed start destroys nothing.
//! - [`RunDir::metrics`] opens `metrics.jsonl`: new for a fresh run, else cut after the resumed
//!   step (whole lines, earlier ones untouched) and appended to.
//! - [`RunDir::save_checkpoint`] writes `checkpoint-NNNNNN/` atomically with a `checksums.json`
//!   over the state a resume reads, then points `latest` at it.
//! - [`Identity`] fingerprints an input (a data file and its images, or a model directory) so a
//!   resume can check it is the one the run started with; [`require_same_settings`] names every
//!   setting that differs.
//!
//! Here: the lock, the run's start and its checkpoints; `paths` (outputs that must not meet
//! inputs), `fingerprint` ([`Hasher`], [`Identity`]), `checksums` (`checksums.json`).

use super::atomic;
use super::exact_json;
use super::metrics::{truncate_after, MetricsWriter};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};

mod checksums;
mod fingerprint;
mod paths;
pub use checksums::*;
pub use fingerprint::*;
pub use paths::*;

/// The lock file inside a run directory.
pub const LOCK_FILE: &str = ".am3.lock";
/// Per-checkpoint checksums of what a resume reads.
pub const CHECKSUMS_FILE: &str = "checksums.json";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const LATEST_FILE: &str = "latest";

/// What to do with a directory an earlier run used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mode {
    /// Continue from its newest checkpoint.
    pub resume: bool,
    /// Delete its checkpoints, `latest` and `metrics.jsonl`, and start over.
    pub overwrite: bool,
}

/// Where a run starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    Fresh,
    /// From this checkpoint (its checksums verified).
    Resume {
        checkpoint: PathBuf,
    },
}

/// An open, locked run directory. Dropping it releases the lock.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    mode: Mode,
    lock_path: PathBuf,
    lock: Option<File>,
}

impl RunDir {
    /// Creates `out` if needed, locks it, cleans up after dead runs and checks that it may be
    /// used in `mode`. `inputs` (flag name, path) are the run's inputs: an `out` inside one of
    /// them, or one of them inside what the run may replace, is refused.
    pub fn open(out: &Path, mode: Mode, inputs: &[(&str, &Path)]) -> Result<RunDir> {
        if mode.resume && mode.overwrite {
            bail!("--resume and --overwrite exclude each other: continue the run in {} or replace it", out.display());
        }
        for (flag, p) in inputs {
            guard_run_input(out, flag, p)?;
        }
        fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let lock_path = out.join(LOCK_FILE);
        let lock = take_lock(out, &lock_path)?;
        let rd = RunDir { path: out.to_path_buf(), mode, lock_path, lock: Some(lock) };
        rd.clean_up()?;
        let used = rd.run_entries()?;
        if !used.is_empty() && !mode.resume && !mode.overwrite {
            let mut names: Vec<String> = used.iter().take(4).cloned().collect();
            if used.len() > 4 {
                names.push(format!("… {} entries in all", used.len()));
            }
            bail!(
                "{} holds an earlier run ({}): pass --resume to continue it, --overwrite to replace it, or choose another --out",
                out.display(),
                names.join(", ")
            );
        }
        Ok(rd)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metrics_path(&self) -> PathBuf {
        self.path.join(METRICS_FILE)
    }

    /// `checkpoint-NNNNNN` for step `step`.
    pub fn checkpoint_name(step: u64) -> String {
        format!("checkpoint-{step:06}")
    }

    /// The newest complete checkpoint (not verified).
    pub fn latest_checkpoint(&self) -> Result<Option<PathBuf>> {
        latest_checkpoint(&self.path)
    }

    /// Fresh, or under `--resume` the newest complete checkpoint after verifying its checksums
    /// (an edited or corrupt one is an error, never silently skipped). Changes nothing.
    pub fn start(&self) -> Result<Start> {
        if !self.mode.resume {
            return Ok(Start::Fresh);
        }
        match self.latest_checkpoint()? {
            Some(ck) => {
                verify_checksums(&ck).context("--resume")?;
                Ok(Start::Resume { checkpoint: ck })
            }
            None => {
                eprintln!("am3: --resume: no checkpoint in {}; starting fresh", self.path.display());
                Ok(Start::Fresh)
            }
        }
    }

    /// Before a fresh start: removes what an earlier run left (its checkpoints, `latest`,
    /// `metrics.jsonl`). Each entry is first renamed to a temporary name, so an interrupted
    /// clean-up is finished by the next `open`.
    pub fn begin_fresh(&self) -> Result<()> {
        let used = self.run_entries()?;
        if used.is_empty() {
            return Ok(());
        }
        if !self.mode.overwrite {
            if !self.mode.resume {
                bail!("{}: refusing to clear an earlier run without --overwrite", self.path.display());
            }
            // --resume found no complete checkpoint: only a log and a pointer may be replaced.
            if let Some(c) = used.iter().find(|n| n.starts_with("checkpoint-")) {
                bail!("--resume: {} is not a complete checkpoint (no trainer_state.json); remove it, or pass --overwrite instead", self.path.join(c).display());
            }
        }
        if self.mode.overwrite {
            eprintln!("am3: --overwrite: removing the earlier run in {} ({} entries)", self.path.display(), used.len());
        } else {
            eprintln!(
                "am3: --resume: {} has no checkpoint; the earlier run's {} is replaced",
                self.path.display(),
                used.join(", ")
            );
        }
        // Newest checkpoints first, `latest` last: a half-done clean-up still reads as a run.
        let mut order = used;
        order.sort_by(|a, b| b.cmp(a));
        order.sort_by_key(|n| match n.as_str() {
            LATEST_FILE => 2,
            METRICS_FILE => 1,
            _ => 0,
        });
        for (k, name) in order.iter().enumerate() {
            let from = self.path.join(name);
            let to = self.path.join(format!(".{name}.tmp-{}-clear{k}", std::process::id()));
            fs::rename(&from, &to).with_context(|| format!("moving {} aside", from.display()))?;
            remove_any(&to)?;
        }
        sync_dir(&self.path);
        Ok(())
    }

    /// The metrics log for a run starting at `start_step`: a new file at step 0 (an existing
    /// one is an error: it would be lost), else the old one with its lines past `start_step`
    /// cut off (the others are kept byte for byte) and opened for appending.
    pub fn metrics(&self, start_step: u64) -> Result<MetricsWriter> {
        let p = self.metrics_path();
        if start_step == 0 {
            MetricsWriter::create_new(&p)
        } else {
            truncate_after(&p, start_step)?;
            MetricsWriter::append(&p)
        }
    }

    /// Writes `checkpoint-NNNNNN/` atomically: `body` fills the (temporary) folder, then
    /// `checksums.json` covers the entries `covers` names (files or folders, relative); then
    /// `latest` names it.
    pub fn save_checkpoint(
        &self, step: u64, covers: &[&str], body: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        let name = Self::checkpoint_name(step);
        let dir = self.path.join(&name);
        atomic::write_dir(&dir, |tmp| {
            body(tmp)?;
            write_checksums(tmp, covers)
        })?;
        atomic::write_file(self.path.join(LATEST_FILE), name.as_bytes())?;
        Ok(dir)
    }

    /// The entries a run writes (`checkpoint-*`, `metrics.jsonl`, `latest`), sorted.
    fn run_entries(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.path).with_context(|| format!("listing {}", self.path.display()))? {
            let n = e?.file_name().to_string_lossy().into_owned();
            if is_run_entry(&n) {
                out.push(n);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Restores interrupted directory swaps and removes the temporary entries of dead runs.
    fn clean_up(&self) -> Result<()> {
        let mut removed = Vec::new();
        for e in fs::read_dir(&self.path).with_context(|| format!("listing {}", self.path.display()))? {
            let e = e?;
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(orig) =
                n.strip_prefix('.').and_then(|s| s.strip_suffix(".old")).filter(|s| s.starts_with("checkpoint-"))
            {
                atomic::recover_dir(self.path.join(orig))?;
                continue;
            }
            if let Some(pid) = temp_entry_pid(&n) {
                if !pid_alive(pid) {
                    remove_any(&e.path())?;
                    removed.push(n);
                }
            }
        }
        if !removed.is_empty() {
            removed.sort();
            eprintln!(
                "am3: {}: removed {} temporary entries left by dead runs: {}",
                self.path.display(),
                removed.len(),
                removed.join(", ")
            );
            sync_dir(&self.path);
        }
        Ok(())
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        // Unlink while still holding the lock, then close (which unlocks): a waiter that opened
        // the old file sees it is gone and retries on a new one.
        let _ = fs::remove_file(&self.lock_path);
        self.lock.take();
    }
}

fn is_run_entry(name: &str) -> bool {
    name == METRICS_FILE || name == LATEST_FILE || name.starts_with("checkpoint-")
}

/// The PID in a temporary name `.NAME.tmp-PID` or `.NAME.tmp-PID-K` (atomic writes use both).
pub fn temp_entry_pid(name: &str) -> Option<u32> {
    if !name.starts_with('.') {
        return None;
    }
    let at = name.rfind(".tmp-")?;
    let rest = &name[at + 5..];
    let pid = rest.split('-').next()?;
    let tail_ok = rest[pid.len()..]
        .strip_prefix('-')
        .is_none_or(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric()));
    (!pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) && tail_ok).then(|| pid.parse().ok()).flatten()
}

/// Whether process `pid` exists. Where that cannot be told (no /proc), every PID counts as
/// alive, so nothing of a live run is ever removed.
pub fn pid_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return true;
    }
    proc.join(pid.to_string()).exists()
}

fn remove_any(p: &Path) -> Result<()> {
    let ty = fs::symlink_metadata(p).with_context(|| format!("reading {}", p.display()))?.file_type();
    if ty.is_dir() { fs::remove_dir_all(p) } else { fs::remove_file(p) }
        .with_context(|| format!("removing {}", p.display()))
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The live PID a lock file names, if it names one.
fn lock_holder(path: &Path) -> Option<u32> {
    let s = fs::read_to_string(path).ok()?;
    let pid: u32 = s.split_whitespace().next()?.parse().ok()?;
    pid_alive(pid).then_some(pid)
}

fn same_inode(f: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Takes the lock of `out`: an exclusive OS lock on the lock file, which then holds our PID.
fn take_lock(out: &Path, path: &Path) -> Result<File> {
    // A holder writes its PID just after locking; a loser polls briefly so it can name it.
    const TRIES: usize = 100;
    for attempt in 0..TRIES {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("opening the lock file {}", path.display()))?;
        match f.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let holder = lock_holder(path);
                if holder.is_some() || attempt + 1 == TRIES {
                    bail!(
                        "{} is in use by another run (PID {}, lock file {}): wait for it to finish, or choose another --out",
                        out.display(),
                        holder.map_or_else(|| "?".to_string(), |p| p.to_string()),
                        path.display()
                    );
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
                continue;
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(e)
                    .with_context(|| format!("locking {} (does this filesystem support file locks?)", path.display()));
            }
        }
        // The holder we waited on may have unlinked the file just before we locked it.
        if !same_inode(&f, path) {
            continue;
        }
        let mut prev = String::new();
        let _ = f.read_to_string(&mut prev);
        let prev_pid = prev.split_whitespace().next().unwrap_or("");
        if !prev_pid.is_empty() && prev_pid != std::process::id().to_string() {
            let why = match prev_pid.parse::<u32>() {
                Ok(p) if !pid_alive(p) => "that process is gone",
                _ => "it no longer held the lock",
            };
            eprintln!("am3: {}: took over the stale lock of PID {prev_pid} ({why})", out.display());
        }
        f.set_len(0)?;
        f.seek(SeekFrom::Start(0))?;
        writeln!(f, "{}", std::process::id()).with_context(|| format!("writing {}", path.display()))?;
        f.sync_all()?;
        return Ok(f);
    }
    bail!("{}: could not take the lock (it keeps being replaced)", path.display())
}

// ------------------------------------------------------------------ settings

/// Compares two settings structs field by field (as JSON objects; floats exactly) and names
/// every field that differs as its flag (`--min-lr-ratio`), with both values.
pub fn require_same_settings(saved: &Value, now: &Value, run: &Path) -> Result<()> {
    let empty = serde_json::Map::new();
    let (s, n) = (saved.as_object().unwrap_or(&empty), now.as_object().unwrap_or(&empty));
    let mut keys: Vec<&String> = s.keys().chain(n.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut diffs = Vec::new();
    for k in keys {
        let (a, b) = (s.get(k), n.get(k));
        if a != b {
            let show = |v: Option<&Value>| v.map_or_else(|| "(unset)".to_string(), |v| v.to_string());
            diffs.push(format!("--{} is {} now but {} in the run", k.replace('_', "-"), show(b), show(a)));
        }
    }
    if !diffs.is_empty() {
        bail!(
            "--resume: the settings differ from the run in {}: {}; pass the run's settings, or start a new --out",
            run.display(),
            diffs.join("; ")
        );
    }
    Ok(())
}

/// The newest complete checkpoint in `out`: the highest-numbered `checkpoint-NNNNNN` holding a
/// `trainer_state.json` (a save that reached its final name is complete; `latest` may lag if
/// a kill came between the two renames).
pub fn latest_checkpoint(out: &Path) -> Result<Option<PathBuf>> {
    let mut best: Option<(u64, PathBuf)> = None;
    let rd = match fs::read_dir(out) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("listing {}", out.display())),
    };
    for e in rd {
        let e = e?;
        let n = e.file_name().to_string_lossy().into_owned();
        let Some(step) = n.strip_prefix("checkpoint-").and_then(|s| s.parse::<u64>().ok()) else { continue };
        if e.path().join("trainer_state.json").is_file() && best.as_ref().is_none_or(|(b, _)| step > *b) {
            best = Some((step, e.path()));
        }
    }
    Ok(best.map(|(_, p)| p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names() {
        assert_eq!(temp_entry_pid(".checkpoint-000003.tmp-1234-0"), Some(1234));
        assert_eq!(temp_entry_pid(".latest.tmp-99"), Some(99));
        assert_eq!(temp_entry_pid(".metrics.jsonl.tmp-7-clear2"), Some(7));
        assert_eq!(temp_entry_pid("checkpoint-000003"), None);
        assert_eq!(temp_entry_pid(".x.tmp-"), None);
        assert_eq!(temp_entry_pid(".x.tmp-12a"), None);
        assert_eq!(temp_entry_pid(".x.tmp-12-"), None);
    }

    #[test]
    fn hash_is_chunking_independent_and_sensitive() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut a = Hasher::new();
        a.update(&data);
        for split in [0, 1, 31, 32, 33, 500, 999] {
            let mut b = Hasher::new();
            b.update(&data[..split]);
            b.update(&data[split..]);
            assert_eq!(a.hex(), b.hex(), "split {split}");
        }
        for i in [0, 500, 999] {
            let mut d = data.clone();
            d[i] ^= 1;
            let mut c = Hasher::new();
            c.update(&d);
            assert_ne!(a.hex(), c.hex(), "byte {i}");
        }
        let mut z = Hasher::new();
        z.update(&data[..999]);
        assert_ne!(a.hex(), z.hex());
    }
}
