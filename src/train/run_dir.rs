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

// ------------------------------------------------------------------ paths that must not meet

/// `p` absolute with `.`/`..` folded and its longest existing prefix canonicalised (so links
/// are resolved even when the tail does not exist yet).
pub fn resolve(p: &Path) -> PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut clean = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                clean.pop();
            }
            other => clean.push(other),
        }
    }
    let mut head = clean.clone();
    let mut tail = Vec::new();
    while !head.exists() {
        match (head.file_name().map(|n| n.to_os_string()), head.parent()) {
            (Some(n), Some(parent)) => {
                tail.push(n);
                head = parent.to_path_buf();
            }
            _ => return clean,
        }
    }
    let mut out = fs::canonicalize(&head).unwrap_or(head);
    for n in tail.into_iter().rev() {
        out.push(n);
    }
    out
}

/// The directory entry `p` names: its folder resolved, its last component kept (a rename to
/// `p` replaces that entry, even when it is a link).
fn entry_path(p: &Path) -> PathBuf {
    let abs = resolve(p.parent().filter(|x| !x.as_os_str().is_empty()).unwrap_or(Path::new(".")));
    match p.file_name() {
        Some(n) => abs.join(n),
        None => resolve(p),
    }
}

/// Refuses an output file that would replace an input: the same file (or a link to it), or a
/// file inside an input directory (e.g. the model's). `inputs`: (flag name, path).
pub fn guard_output_file(out_flag: &str, out: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let (entry, full) = (entry_path(out), resolve(out));
    for (flag, input) in inputs {
        let (ie, ifull) = (entry_path(input), resolve(input));
        if input.is_dir() {
            if entry.starts_with(&ifull) || entry.starts_with(&ie) || full.starts_with(&ifull) {
                bail!(
                    "{out_flag} {} lies inside the {flag} directory {}: refusing to write into it",
                    out.display(),
                    input.display()
                );
            }
            continue;
        }
        let same_inode = match (fs::metadata(out), fs::metadata(input)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        if entry == ie || entry == ifull || full == ifull || same_inode {
            bail!(
                "{out_flag} {} is the {flag} file {}: refusing to overwrite an input",
                out.display(),
                input.display()
            );
        }
    }
    Ok(())
}

/// A run's `out` must not lie in an input directory (or be an input file), and an input must
/// not lie in anything of `out` a run replaces (checkpoints, metrics, `latest`, temp entries).
fn guard_run_input(out: &Path, flag: &str, input: &Path) -> Result<()> {
    let (o, i) = (resolve(out), resolve(input));
    if o.starts_with(&i) {
        bail!("--out {} lies inside {flag} {}: a run would write into its own input", out.display(), input.display());
    }
    if let Ok(rest) = i.strip_prefix(&o) {
        let first = rest.components().next().map(|c| c.as_os_str().to_string_lossy().into_owned()).unwrap_or_default();
        if first.is_empty() || is_run_entry(&first) || first == LOCK_FILE || temp_entry_pid(&first).is_some() {
            bail!(
                "{flag} {} lies inside --out {}'s {}, which a run may replace or delete: copy it elsewhere first",
                input.display(),
                out.display(),
                if first.is_empty() { "folder".to_string() } else { first }
            );
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ hashing

/// A fast 128-bit content hash (four 64-bit multiply-rotate lanes over 32-byte blocks, then a
/// splitmix-style finish). It detects accidental changes, not deliberate collisions.
#[derive(Clone, Debug)]
pub struct Hasher {
    lanes: [u64; 4],
    buf: [u8; 32],
    buf_len: usize,
    total: u64,
}

const K1: u64 = 0x9E37_79B1_85EB_CA87;
const K2: u64 = 0xC2B2_AE3D_27D4_EB4F;

#[inline]
fn lane_round(acc: u64, w: u64) -> u64 {
    acc.wrapping_add(w.wrapping_mul(K2)).rotate_left(31).wrapping_mul(K1)
}

#[inline]
fn fmix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl Default for Hasher {
    fn default() -> Self {
        Hasher { lanes: [K1.wrapping_add(K2), K2, 0, K1.wrapping_neg()], buf: [0; 32], buf_len: 0, total: 0 }
    }
}

impl Hasher {
    pub fn new() -> Self {
        Self::default()
    }

    fn block(&mut self, b: &[u8]) {
        for (k, w) in b.chunks_exact(8).enumerate() {
            self.lanes[k] = lane_round(self.lanes[k], u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        if self.buf_len > 0 {
            let take = (32 - self.buf_len).min(data.len());
            self.buf[self.buf_len..self.buf_len + take].copy_from_slice(&data[..take]);
            self.buf_len += take;
            data = &data[take..];
            if self.buf_len < 32 {
                return;
            }
            let b = self.buf;
            self.block(&b);
            self.buf_len = 0;
        }
        let mut blocks = data.chunks_exact(32);
        for b in &mut blocks {
            self.block(b);
        }
        let rest = blocks.remainder();
        self.buf[..rest.len()].copy_from_slice(rest);
        self.buf_len = rest.len();
    }

    /// A length-prefixed field, so ("ab","c") and ("a","bc") hash differently.
    pub fn field(&mut self, data: &[u8]) {
        self.update(&(data.len() as u64).to_le_bytes());
        self.update(data);
    }

    /// 32 hex digits.
    pub fn hex(&self) -> String {
        let mut l = self.lanes;
        let mut tail = [0u8; 32];
        tail[..self.buf_len].copy_from_slice(&self.buf[..self.buf_len]);
        for (k, w) in tail.chunks_exact(8).enumerate() {
            l[k] = lane_round(
                l[k],
                u64::from_le_bytes(w.try_into().expect("8 bytes")) ^ (self.buf_len as u64).wrapping_mul(K1),
            );
        }
        let t = self.total.wrapping_mul(K2);
        let a = fmix(l[0].rotate_left(1) ^ l[1].rotate_left(7) ^ l[2].rotate_left(12) ^ l[3].rotate_left(18) ^ t);
        let b = fmix(
            l[0].wrapping_add(l[2].rotate_left(29)) ^ l[1].wrapping_mul(K1) ^ l[3].wrapping_add(t).rotate_left(41) ^ a,
        );
        format!("{a:016x}{b:016x}")
    }
}

/// The hash of a file's whole content, and its size.
pub fn hash_file(path: &Path) -> Result<(u64, String)> {
    let mut f = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut h = Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok((h.total, h.hex()))
}

/// Bytes `[start, end)` of `f`, whole.
fn hash_range(h: &mut Hasher, f: &mut File, start: u64, end: u64) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    f.seek(SeekFrom::Start(start))?;
    let mut rest = end.saturating_sub(start);
    while rest > 0 {
        let n = f.read(&mut buf[..rest.min(1 << 20) as usize])?;
        if n == 0 {
            bail!("the file ended before its size");
        }
        h.update(&buf[..n]);
        rest -= n as u64;
    }
    Ok(())
}

/// Bytes `[start, end)` of `f` sampled as `blocks` (≥ 2) evenly spaced 4 KiB reads (whole
/// when that is no less).
fn hash_sampled(h: &mut Hasher, f: &mut File, start: u64, end: u64, blocks: u64) -> Result<()> {
    const B: u64 = 4096;
    let len = end.saturating_sub(start);
    if len <= B * blocks {
        return hash_range(h, f, start, end);
    }
    let mut buf = vec![0u8; B as usize];
    for k in 0..blocks {
        let at = start + (len - B) * k / (blocks - 1);
        f.seek(SeekFrom::Start(at))?;
        f.read_exact(&mut buf)?;
        h.update(&buf);
    }
    Ok(())
}

/// What an input was when a run started: its resolved path and a content hash, with the hash
/// of each part (the files of a model directory; a data file and its images) to say which
/// part changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub path: String,
    pub hash: String,
    #[serde(default)]
    pub parts: BTreeMap<String, String>,
}

/// Non-safetensors files up to this size are hashed whole; larger ones are sampled.
const WHOLE_FILE_LIMIT: u64 = 64 << 20;
/// 4 KiB blocks sampled from a large file's data.
const SAMPLED_BLOCKS: u64 = 64;

impl Identity {
    fn from_parts(path: String, parts: BTreeMap<String, String>) -> Identity {
        let mut h = Hasher::new();
        for (k, v) in &parts {
            h.field(k.as_bytes());
            h.field(v.as_bytes());
        }
        Identity { path, hash: h.hex(), parts }
    }

    /// Something without a path (e.g. a built-in model), from its defining bytes.
    pub fn of_bytes(label: &str, parts: &[(&str, &[u8])]) -> Identity {
        let mut map = BTreeMap::new();
        for (name, bytes) in parts {
            let mut h = Hasher::new();
            h.update(bytes);
            map.insert(name.to_string(), h.hex());
        }
        Self::from_parts(label.to_string(), map)
    }

    /// A file, hashed whole.
    pub fn of_file(path: &Path) -> Result<Identity> {
        let (_, h) = hash_file(path)?;
        let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
        Ok(Self::from_parts(resolve(path).display().to_string(), BTreeMap::from([(name, h)])))
    }

    /// A dataset: the file hashed whole, plus every image it uses (whole; training reads them
    /// all anyway), in order, as one part.
    pub fn of_data(path: &Path, images: &[PathBuf]) -> Result<Identity> {
        let (_, h) = hash_file(path)?;
        let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
        let mut parts = BTreeMap::from([(name, h)]);
        if !images.is_empty() {
            let base = resolve(path.parent().unwrap_or(Path::new(".")));
            let mut hi = Hasher::new();
            for im in images {
                let r = resolve(im);
                let shown = r.strip_prefix(&base).unwrap_or(&r);
                hi.field(shown.to_string_lossy().as_bytes());
                hi.field(hash_file(im)?.1.as_bytes());
            }
            parts.insert(format!("images ({} files)", images.len()), hi.hex());
        }
        Ok(Self::from_parts(resolve(path).display().to_string(), parts))
    }

    /// A model directory, without reading all its weights (15 GB at every resume would be too
    /// slow): each top-level file's name and size; for `*.safetensors` the whole header (names,
    /// dtypes, shapes, offsets) plus 64 evenly spaced 4 KiB blocks of the data; other files
    /// whole up to 64 MiB, else sampled likewise. A change confined to unsampled weight bytes
    /// of the same shapes goes unseen.
    pub fn of_model_dir(dir: &Path) -> Result<Identity> {
        let mut names = Vec::new();
        for e in fs::read_dir(dir).with_context(|| format!("listing the model directory {}", dir.display()))? {
            let e = e?;
            let n = e.file_name().to_string_lossy().into_owned();
            // Hidden entries are temporary files or tool state, not the model.
            if !n.starts_with('.') && e.path().is_file() {
                names.push(n);
            }
        }
        names.sort();
        let mut parts = BTreeMap::new();
        for n in names {
            let p = dir.join(&n);
            let mut f = File::open(&p).with_context(|| format!("reading {}", p.display()))?;
            let size = f.metadata()?.len();
            let mut h = Hasher::new();
            h.field(&size.to_le_bytes());
            let mut data_start = 0;
            if n.ends_with(".safetensors") && size >= 8 {
                let mut len8 = [0u8; 8];
                f.read_exact(&mut len8)?;
                let hl = u64::from_le_bytes(len8);
                if hl <= size - 8 {
                    let mut header = vec![0u8; hl as usize];
                    f.read_exact(&mut header)?;
                    h.field(&header);
                    data_start = 8 + hl;
                }
            }
            if data_start == 0 && size <= WHOLE_FILE_LIMIT {
                hash_range(&mut h, &mut f, 0, size).with_context(|| format!("reading {}", p.display()))?;
            } else {
                hash_sampled(&mut h, &mut f, data_start, size, SAMPLED_BLOCKS)
                    .with_context(|| format!("reading {}", p.display()))?;
            }
            parts.insert(n, h.hex());
        }
        Ok(Self::from_parts(resolve(dir).display().to_string(), parts))
    }

    /// Checks that `now` is the input the run (`self`, as saved in `run`) started with; the
    /// error names `flag` and what differs.
    pub fn require_same(&self, now: &Identity, flag: &str, run: &Path) -> Result<()> {
        if self.path != now.path {
            bail!(
                "--resume: {flag} is {} but the run in {} was started with {flag} {}; pass the same {flag}, or start a new --out",
                now.path,
                run.display(),
                self.path
            );
        }
        if self.hash != now.hash {
            let mut changed: Vec<&str> = Vec::new();
            for k in self.parts.keys().chain(now.parts.keys()) {
                if self.parts.get(k) != now.parts.get(k) && !changed.contains(&k.as_str()) {
                    changed.push(k);
                }
            }
            bail!(
                "--resume: {flag} {} changed since the run in {} started (content hash {} now, {} then; differs in: {})",
                now.path,
                run.display(),
                now.hash,
                self.hash,
                if changed.is_empty() { "?".to_string() } else { changed.join(", ") }
            );
        }
        Ok(())
    }
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

// ------------------------------------------------------------------ checksums

#[derive(Serialize, Deserialize)]
struct FileSum {
    bytes: u64,
    hash: String,
}

#[derive(Serialize, Deserialize)]
struct Checksums {
    /// What was covered (files or folders, relative to the checkpoint).
    covers: Vec<String>,
    files: BTreeMap<String, FileSum>,
}

/// The files under `dir/rel` (itself, if a file), as relative paths with `/`, sorted.
fn files_under(dir: &Path, rel: &str, out: &mut Vec<String>) -> Result<()> {
    let p = dir.join(rel);
    let md = fs::metadata(&p).with_context(|| format!("{}: missing", p.display()))?;
    if md.is_file() {
        out.push(rel.to_string());
        return Ok(());
    }
    let mut names: Vec<String> = fs::read_dir(&p)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    names.sort();
    for n in names {
        files_under(dir, &format!("{rel}/{n}"), out)?;
    }
    Ok(())
}

/// Writes `dir/checksums.json`: the size and hash of every file under `covers`.
pub fn write_checksums(dir: &Path, covers: &[&str]) -> Result<()> {
    let mut files = Vec::new();
    for c in covers {
        files_under(dir, c, &mut files)?;
    }
    let mut sums = BTreeMap::new();
    for f in files {
        let (bytes, hash) = hash_file(&dir.join(&f))?;
        sums.insert(f, FileSum { bytes, hash });
    }
    let c = Checksums { covers: covers.iter().map(|s| s.to_string()).collect(), files: sums };
    atomic::write_file(dir.join(CHECKSUMS_FILE), serde_json::to_string_pretty(&c)?.as_bytes())
}

/// Checks every file `checksums.json` lists, and that the covered folders hold no others.
pub fn verify_checksums(dir: &Path) -> Result<()> {
    let p = dir.join(CHECKSUMS_FILE);
    let text = fs::read_to_string(&p).with_context(|| {
        format!("checkpoint {} has no readable {CHECKSUMS_FILE}, so it cannot be verified", dir.display())
    })?;
    let c: Checksums =
        exact_json::from_str(&text).with_context(|| format!("{}: not a valid checksums file", p.display()))?;
    let mut present = Vec::new();
    for cov in &c.covers {
        files_under(dir, cov, &mut present).with_context(|| format!("checkpoint {}", dir.display()))?;
    }
    for f in &present {
        if !c.files.contains_key(f) {
            bail!("checkpoint {}: {f} is not in its {CHECKSUMS_FILE} (added after the save?)", dir.display());
        }
    }
    for (f, sum) in &c.files {
        let fp = dir.join(f);
        if !fp.is_file() {
            bail!("checkpoint {}: {f} is missing", dir.display());
        }
        let (bytes, hash) = hash_file(&fp)?;
        if bytes != sum.bytes || hash != sum.hash {
            bail!(
                "checkpoint {}: {f} does not match its checksum ({bytes} bytes, hash {hash}; saved: {} bytes, hash {}): it was edited or is corrupt",
                dir.display(),
                sum.bytes,
                sum.hash
            );
        }
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
