//! Atomic writes of files and whole directories, so a crash (or a kill) during a save never
//! leaves a half-written checkpoint, config or tokenizer behind: readers see either the previous
//! version or the complete new one.
//!
//! Files: write `.NAME.tmp-PID-N` in the same directory, fsync it, rename it over `NAME`, fsync
//! the directory. Directories: build `.NAME.tmp-PID-N/`, fsync every file in it and the folder,
//! then swap it in. POSIX cannot rename a directory over a non-empty one, so the swap is two
//! renames (`NAME` → `.NAME.old`, temp → `NAME`); a crash between them leaves `.NAME.old`, which
//! [`recover_dir`] (called by every directory write, and cheap to call before reading) puts back.

use anyhow::{bail, Context, Result};
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Makes temp names unique within one process (several saves may run at once in tests).
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The folder holding `path` ("." for a bare file name) and its final component.
fn split(path: &Path) -> Result<(PathBuf, String)> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let name = path.file_name().with_context(|| format!("{}: not a file or folder path", path.display()))?;
    Ok((dir, name.to_string_lossy().into_owned()))
}

/// A fresh hidden sibling of `path` for staging.
fn temp_sibling(path: &Path) -> Result<PathBuf> {
    let (dir, name) = split(path)?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    Ok(dir.join(format!(".{name}.tmp-{}-{n}", std::process::id())))
}

/// Where a directory write parks the previous version during the swap.
fn backup_of(path: &Path) -> Result<PathBuf> {
    let (dir, name) = split(path)?;
    Ok(dir.join(format!(".{name}.old")))
}

/// Persists a rename or a new entry in `dir` (best effort: some filesystems refuse to sync a
/// directory, and the data itself is already synced).
fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// A file written and synced under a temporary name, not yet renamed into place. Dropping it
/// without [`StagedFile::commit`] deletes the temporary file and leaves the destination as it was.
#[derive(Debug)]
pub struct StagedFile {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl StagedFile {
    /// Step one of an atomic write: the temporary file, complete and fsynced.
    pub fn stage_with(path: &Path, body: impl FnOnce(&mut BufWriter<fs::File>) -> Result<()>) -> Result<StagedFile> {
        let tmp = temp_sibling(path)?;
        let result = (|| -> Result<()> {
            let file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            let mut w = BufWriter::with_capacity(1 << 20, file);
            body(&mut w)?;
            let file =
                w.into_inner().map_err(|e| e.into_error()).with_context(|| format!("writing {}", tmp.display()))?;
            file.sync_all().with_context(|| format!("syncing {}", tmp.display()))
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(StagedFile { tmp, dest: path.to_path_buf(), committed: false })
    }

    /// The temporary file (for tests that simulate a crash before the rename).
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    /// Step two: rename over the destination and sync the directory.
    pub fn commit(mut self) -> Result<()> {
        fs::rename(&self.tmp, &self.dest)
            .with_context(|| format!("renaming {} to {}", self.tmp.display(), self.dest.display()))?;
        self.committed = true;
        if let Ok((dir, _)) = split(&self.dest) {
            sync_dir(&dir);
        }
        Ok(())
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `bytes` to `path` atomically.
pub fn write_file(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    write_file_with(path, |w| Ok(w.write_all(bytes)?))
}

/// Writes `path` atomically through a buffered writer.
pub fn write_file_with(
    path: impl AsRef<Path>, body: impl FnOnce(&mut BufWriter<fs::File>) -> Result<()>,
) -> Result<()> {
    StagedFile::stage_with(path.as_ref(), body)?.commit()
}

/// A directory being built under a temporary name; [`StagedDir::commit`] swaps it in. Dropping
/// it uncommitted removes the temporary tree.
#[derive(Debug)]
pub struct StagedDir {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl StagedDir {
    /// Creates the empty temporary directory next to `path`.
    pub fn new(path: &Path) -> Result<StagedDir> {
        let tmp = temp_sibling(path)?;
        fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        Ok(StagedDir { tmp, dest: path.to_path_buf(), committed: false })
    }

    /// The folder to write into.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Syncs every file below the temporary folder, then swaps it in for the destination
    /// (replacing any previous version, which is deleted after the swap).
    pub fn commit(mut self) -> Result<()> {
        sync_tree(&self.tmp)?;
        recover_dir(&self.dest)?;
        let backup = backup_of(&self.dest)?;
        let (parent, _) = split(&self.dest)?;
        let had_old = self.dest.exists();
        if had_old {
            if !self.dest.is_dir() {
                bail!("{} exists and is not a directory", self.dest.display());
            }
            fs::rename(&self.dest, &backup).with_context(|| {
                format!("moving the previous {} aside to {}", self.dest.display(), backup.display())
            })?;
            sync_dir(&parent);
        }
        if let Err(e) = fs::rename(&self.tmp, &self.dest) {
            // Put the previous version back before reporting.
            if had_old {
                let _ = fs::rename(&backup, &self.dest);
            }
            return Err(e).with_context(|| format!("renaming {} to {}", self.tmp.display(), self.dest.display()));
        }
        self.committed = true;
        sync_dir(&parent);
        if had_old {
            fs::remove_dir_all(&backup)
                .with_context(|| format!("removing the previous version {}", backup.display()))?;
        }
        Ok(())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Builds a directory atomically: `body` fills the given (temporary) folder; on success it
/// replaces `path` as a whole; on error nothing at `path` changes.
pub fn write_dir(path: impl AsRef<Path>, body: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let staged = StagedDir::new(path.as_ref())?;
    body(staged.path())?;
    staged.commit()
}

/// Repairs the state a crash in the middle of a directory swap can leave: when `path` is missing
/// but its `.NAME.old` backup exists, the backup is moved back; when both exist (the crash came
/// after the swap), the stale backup is removed. Returns whether anything was repaired.
pub fn recover_dir(path: impl AsRef<Path>) -> Result<bool> {
    let path = path.as_ref();
    let backup = backup_of(path)?;
    if !backup.exists() {
        return Ok(false);
    }
    if path.exists() {
        fs::remove_dir_all(&backup).with_context(|| format!("removing stale backup {}", backup.display()))?;
    } else {
        fs::rename(&backup, path).with_context(|| format!("restoring {} from {}", path.display(), backup.display()))?;
        if let Ok((dir, _)) = split(path) {
            sync_dir(&dir);
        }
    }
    Ok(true)
}

/// fsyncs every regular file below `dir` and every folder (so the entries themselves persist).
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let p = entry.path();
        let ty = entry.file_type().with_context(|| format!("reading {}", p.display()))?;
        if ty.is_dir() {
            sync_tree(&p)?;
        } else if ty.is_file() {
            fs::File::open(&p).and_then(|f| f.sync_all()).with_context(|| format!("syncing {}", p.display()))?;
        }
    }
    sync_dir(dir);
    Ok(())
}
