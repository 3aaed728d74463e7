//! Paths that must not meet: an output that overlaps an input (`--out` inside `--model`, an
//! input inside what a run replaces), judged on resolved paths.

use super::*;

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
pub(super) fn entry_path(p: &Path) -> PathBuf {
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
pub(super) fn guard_run_input(out: &Path, flag: &str, input: &Path) -> Result<()> {
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
