//! `checksums.json`: size and hash of every file a resume reads, written at save and verified
//! before a resume trusts a checkpoint.

use super::*;

#[derive(Serialize, Deserialize)]
pub(super) struct FileSum {
    bytes: u64,
    hash: String,
}

#[derive(Serialize, Deserialize)]
pub(super) struct Checksums {
    /// What was covered (files or folders, relative to the checkpoint).
    covers: Vec<String>,
    files: BTreeMap<String, FileSum>,
}

/// The files under `dir/rel` (itself, if a file), as relative paths with `/`, sorted.
pub(super) fn files_under(dir: &Path, rel: &str, out: &mut Vec<String>) -> Result<()> {
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
