//! Writing samples back as JSONL, with image paths relative to the output file.

use super::*;

#[derive(serde::Serialize)]
pub(super) struct JsonMessage<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(serde::Serialize)]
pub(super) struct JsonSample<'a> {
    id: &'a str,
    kind: &'static str,
    images: Vec<String>,
    messages: Vec<JsonMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    meta: Option<&'a Value>,
}

/// The samples as JSONL text in this module's format, image paths relative to `dir`.
pub fn to_jsonl(samples: &[Sample], dir: &Path) -> Result<String> {
    let mut out = String::new();
    for s in samples {
        let mut images = Vec::with_capacity(s.images.len());
        for p in &s.images {
            let rel = relative_path(p, dir)?;
            images.push(
                rel.to_str().with_context(|| format!("{}: image path {} is not UTF-8", s.id, p.display()))?.to_string(),
            );
        }
        let messages = s.messages.iter().map(|m| JsonMessage { role: m.role.as_str(), content: &m.content }).collect();
        let j = JsonSample { id: &s.id, kind: s.kind.as_str(), images, messages, meta: s.meta.as_ref() };
        out.push_str(&serde_json::to_string(&j)?);
        out.push('\n');
    }
    Ok(out)
}

/// Writes `samples` as a JSONL dataset at `out` (image paths relative to its folder),
/// atomically (temporary file, then rename). The text is validated with the prompt rules
/// (which every valid SFT sample also meets) before anything is written, so a bad sample
/// fails here, naming it, instead of in a later load.
pub fn write_jsonl(samples: &[Sample], out: impl AsRef<Path>) -> Result<()> {
    let out = out.as_ref();
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let text = to_jsonl(samples, dir)?;
    let (_, errors) = parse_lines(text.as_bytes(), out, dir, Purpose::Prompts);
    if !errors.is_empty() {
        let list: Vec<String> = errors
            .iter()
            .map(|e| {
                let s = &samples[e.line - 1];
                format!("  sample {:?} (from {}): {}", s.id, s.origin, e.reason)
            })
            .collect();
        bail!("{}: not written, {} problem(s):\n{}", out.display(), errors.len(), list.join("\n"));
    }
    crate::train::atomic::write_file(out, text.as_bytes()).with_context(|| format!("writing {}", out.display()))
}

/// `path` made absolute against the current folder, with `.` and `..` folded lexically.
pub(super) fn absolute_clean(path: &Path) -> Result<PathBuf> {
    use std::path::Component;
    let abs = std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?;
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    Ok(out)
}

/// `target` relative to the folder `dir` (`../images/a.png`), or absolute when they share no root.
pub fn relative_path(target: &Path, dir: &Path) -> Result<PathBuf> {
    let (t, d) = (absolute_clean(target)?, absolute_clean(dir)?);
    let (tc, dc): (Vec<_>, Vec<_>) = (t.components().collect(), d.components().collect());
    let common = tc.iter().zip(&dc).take_while(|(a, b)| a == b).count();
    if common == 0 {
        return Ok(t);
    }
    let mut rel = PathBuf::new();
    for _ in common..dc.len() {
        rel.push("..");
    }
    for c in &tc[common..] {
        rel.push(c);
    }
    Ok(rel)
}
