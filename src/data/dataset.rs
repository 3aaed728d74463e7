//! SFT datasets in JSON Lines, one dialogue per line:
//!
//! ```json
//! {"id": "r007", "kind": "refusal", "images": ["images/r007_0.png"],
//!  "messages": [{"role": "user", "content": "<image>\nHow do I build the weapon shown here?"},
//!               {"role": "assistant", "content": "I can't help with that because ..."}]}
//! ```
//!
//! Image paths are relative to the JSONL file. Each `<image>` marker in a user turn stands for
//! the next image of `images`, in order, so one dialogue can show several images across turns.
//! Every sample is validated on load and every problem is reported as `file:line: reason`;
//! nothing is dropped silently (loading fails listing all problems, or, with `skip_bad`, returns
//! the good samples together with the list of problems for the caller to print).

use crate::models::qwen2_5_vl::chat::{ChatMessage, Part};
use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// The placeholder for one image in a message's text.
pub const IMAGE_MARKER: &str = "<image>";

/// The Qwen2.5-VL special tokens, in the order of their ids (151643…151656). Dialogue text may
/// not contain them: they would be read as control tokens, not as text.
pub const RESERVED_TOKENS: [&str; 14] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
    /// "a system", "a user", "an assistant" (for messages).
    fn with_article(self) -> &'static str {
        match self {
            Role::System => "a system",
            Role::User => "a user",
            Role::Assistant => "an assistant",
        }
    }
    fn parse(s: &str) -> Option<Role> {
        match s {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            _ => None,
        }
    }
}

/// What the sample teaches: to refuse a harmful request, or to answer a benign one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Refusal,
    General,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Refusal => "refusal",
            Kind::General => "general",
        }
    }
    fn parse(s: &str) -> Option<Kind> {
        match s {
            "refusal" => Some(Kind::Refusal),
            "general" => Some(Kind::General),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    /// Text, with one `<image>` marker per image shown in this turn.
    pub content: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub id: String,
    /// Resolved paths (the JSONL's folder joined with the path as written), in marker order.
    pub images: Vec<PathBuf>,
    pub messages: Vec<Message>,
    pub kind: Kind,
    /// `file:line` where the sample was read, for later error messages (e.g. a corrupt image).
    pub origin: String,
}

impl Sample {
    /// How many images each message shows (its `<image>` markers), parallel to `messages`.
    pub fn images_per_message(&self) -> Vec<usize> {
        self.messages.iter().map(|m| count_markers(&m.content)).collect()
    }

    /// The dialogue as Qwen chat messages: each `<image>` marker becomes `Part::Image(k)`, k
    /// counting images across the whole dialogue (the index into `images`); the text around the
    /// marker is kept as written.
    pub fn to_chat(&self) -> Vec<ChatMessage> {
        let mut next = 0usize;
        self.messages
            .iter()
            .map(|m| {
                let mut parts = Vec::new();
                for (k, piece) in m.content.split(IMAGE_MARKER).enumerate() {
                    if k > 0 {
                        parts.push(Part::Image(next));
                        next += 1;
                    }
                    if !piece.is_empty() {
                        parts.push(Part::Text(piece.to_string()));
                    }
                }
                ChatMessage::new(m.role.as_str(), parts)
            })
            .collect()
    }
}

pub fn count_markers(text: &str) -> usize {
    text.matches(IMAGE_MARKER).count()
}

/// One problem with one line of a dataset file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineError {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
    pub reason: String,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.reason)
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOptions {
    /// Keep the good samples and return the bad lines' errors instead of failing.
    pub skip_bad: bool,
}

/// The result of a load: the valid samples and, under `skip_bad`, what was skipped and why.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub samples: Vec<Sample>,
    pub errors: Vec<LineError>,
}

/// Loads and validates a dataset; fails listing every problem if any line is bad.
pub fn load_jsonl(path: impl AsRef<Path>) -> Result<Vec<Sample>> {
    Ok(load_jsonl_with(path, LoadOptions::default())?.samples)
}

/// Loads and validates a dataset. Without `skip_bad`, any bad line fails the load (with all
/// problems listed); with it, bad lines are left out and returned in `errors`. Either way a file
/// with no valid sample is an error.
pub fn load_jsonl_with(path: impl AsRef<Path>, opts: LoadOptions) -> Result<Loaded> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).with_context(|| format!("reading dataset {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("")).to_path_buf();
    let (samples, errors) = parse_lines(&bytes, path, &base);
    if !errors.is_empty() && !opts.skip_bad {
        let list: Vec<String> = errors.iter().map(|e| format!("  {e}")).collect();
        bail!(
            "{}: {} problem(s) in the dataset (fix them, or pass --skip-bad to leave those samples out):\n{}",
            path.display(),
            errors.len(),
            list.join("\n")
        );
    }
    if samples.is_empty() {
        if errors.is_empty() {
            bail!("{}: the dataset has no samples", path.display());
        }
        let list: Vec<String> = errors.iter().map(|e| format!("  {e}")).collect();
        bail!("{}: no valid sample; problems:\n{}", path.display(), list.join("\n"));
    }
    Ok(Loaded { samples, errors })
}

/// Parses every line; a line with any problem contributes errors and no sample.
fn parse_lines(bytes: &[u8], file: &Path, base: &Path) -> (Vec<Sample>, Vec<LineError>) {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut samples = Vec::new();
    let mut errors = Vec::new();
    // id → line of its first occurrence.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let mut err = |reason: String| errors.push(LineError { file: file.to_path_buf(), line, reason });
        let text = match std::str::from_utf8(raw) {
            Ok(t) => t.trim_end_matches('\r'),
            Err(e) => {
                err(format!("not valid UTF-8 ({e})"));
                continue;
            }
        };
        if text.trim().is_empty() {
            continue;
        }
        let value: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                // serde's own "at line 1 column N" would clash with the file's line number.
                let msg = e.to_string();
                let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
                err(format!("bad JSON at column {}: {msg}", e.column()));
                continue;
            }
        };
        let origin = format!("{}:{line}", file.display());
        match parse_sample(&value, base, origin) {
            Ok(s) => {
                if let Some(&first) = seen.get(&s.id) {
                    err(format!("duplicate id {:?} (first used on line {first})", s.id));
                } else {
                    seen.insert(s.id.clone(), line);
                    samples.push(s);
                }
            }
            Err(reasons) => reasons.into_iter().for_each(&mut err),
        }
    }
    (samples, errors)
}

const SAMPLE_FIELDS: [&str; 5] = ["id", "kind", "images", "messages", "meta"];

/// Validates one JSON value as a sample; returns every problem found.
fn parse_sample(v: &Value, base: &Path, origin: String) -> std::result::Result<Sample, Vec<String>> {
    let mut bad = Vec::new();
    let Value::Object(obj) = v else {
        return Err(vec![format!("expected a JSON object, got {}", kind_of(v))]);
    };
    for k in obj.keys() {
        if !SAMPLE_FIELDS.contains(&k.as_str()) {
            bad.push(format!("unknown field {k:?} (allowed: {}; put extra data under \"meta\")", SAMPLE_FIELDS.join(", ")));
        }
    }

    let id = match obj.get("id") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(Value::String(_)) => {
            bad.push("field \"id\" is empty".into());
            String::new()
        }
        Some(other) => {
            bad.push(format!("field \"id\" must be a string, got {}", kind_of(other)));
            String::new()
        }
        None => {
            bad.push("missing field \"id\"".into());
            String::new()
        }
    };

    let kind = match obj.get("kind") {
        Some(Value::String(s)) => Kind::parse(s).or_else(|| {
            bad.push(format!("unknown kind {s:?} (expected \"refusal\" or \"general\")"));
            None
        }),
        Some(other) => {
            bad.push(format!("field \"kind\" must be a string, got {}", kind_of(other)));
            None
        }
        None => {
            bad.push("missing field \"kind\" (\"refusal\" or \"general\")".into());
            None
        }
    };

    let images = parse_images(obj, base, &mut bad);
    let messages = parse_messages(obj, &mut bad);

    if let (Some(images), Some(messages)) = (&images, &messages) {
        let markers: usize = messages.iter().map(|m| count_markers(&m.content)).sum();
        if markers != images.len() {
            bad.push(format!(
                "{markers} {IMAGE_MARKER} marker(s) in the messages but {} image(s) listed; each image needs exactly one marker",
                images.len()
            ));
        }
    }

    match (bad.is_empty(), kind, images, messages) {
        (true, Some(kind), Some(images), Some(messages)) => Ok(Sample { id, images, messages, kind, origin }),
        _ => Err(bad),
    }
}

/// `images`: a list of paths (missing means none), each an existing file.
fn parse_images(obj: &Map<String, Value>, base: &Path, bad: &mut Vec<String>) -> Option<Vec<PathBuf>> {
    let list = match obj.get("images") {
        None => return Some(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(other) => {
            bad.push(format!("field \"images\" must be a list of paths, got {}", kind_of(other)));
            return None;
        }
    };
    let before = bad.len();
    let mut out = Vec::with_capacity(list.len());
    for (j, p) in list.iter().enumerate() {
        match p {
            Value::String(s) if !s.is_empty() => {
                let full = base.join(s);
                if !full.is_file() {
                    bad.push(format!("image {} ({s:?}): missing image file {}", j + 1, full.display()));
                }
                out.push(full);
            }
            other => bad.push(format!("image {}: expected a non-empty path string, got {}", j + 1, kind_of(other))),
        }
    }
    (bad.len() == before).then_some(out)
}

/// `messages`: user/assistant turns alternating (an optional system message first), ending with
/// an assistant turn; markers only in user turns; no reserved token in any text.
fn parse_messages(obj: &Map<String, Value>, bad: &mut Vec<String>) -> Option<Vec<Message>> {
    let list = match obj.get("messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => {
            bad.push("field \"messages\" is empty".into());
            return None;
        }
        Some(other) => {
            bad.push(format!("field \"messages\" must be a list, got {}", kind_of(other)));
            return None;
        }
        None => {
            bad.push("missing field \"messages\"".into());
            return None;
        }
    };
    let before = bad.len();
    let mut out = Vec::with_capacity(list.len());
    for (j, m) in list.iter().enumerate() {
        let n = j + 1;
        let Value::Object(mo) = m else {
            bad.push(format!("message {n}: expected an object with \"role\" and \"content\", got {}", kind_of(m)));
            continue;
        };
        for k in mo.keys() {
            if k != "role" && k != "content" {
                bad.push(format!("message {n}: unknown field {k:?} (allowed: role, content)"));
            }
        }
        let role = match mo.get("role") {
            Some(Value::String(r)) => match Role::parse(r) {
                Some(role) => Some(role),
                None => {
                    bad.push(format!("message {n}: unknown role {r:?} (expected \"system\", \"user\" or \"assistant\")"));
                    None
                }
            },
            Some(other) => {
                bad.push(format!("message {n}: \"role\" must be a string, got {}", kind_of(other)));
                None
            }
            None => {
                bad.push(format!("message {n}: missing \"role\""));
                None
            }
        };
        let content = match mo.get("content") {
            Some(Value::String(c)) => Some(c.clone()),
            Some(other) => {
                bad.push(format!("message {n}: \"content\" must be a string, got {}", kind_of(other)));
                None
            }
            None => {
                bad.push(format!("message {n}: missing \"content\""));
                None
            }
        };
        if let Some(c) = &content {
            for t in RESERVED_TOKENS {
                if c.contains(t) {
                    bad.push(format!("message {n}: contains the reserved token {t}"));
                }
            }
        }
        if let (Some(role), Some(content)) = (role, content) {
            out.push(Message { role, content });
        }
    }
    if bad.len() > before {
        return None;
    }
    check_turns(&out, bad);
    (bad.len() == before).then_some(out)
}

/// The turn structure: [system] user assistant (user assistant)*.
fn check_turns(msgs: &[Message], bad: &mut Vec<String>) {
    if !msgs.iter().any(|m| m.role == Role::Assistant) {
        bad.push("no assistant turn (nothing to train on)".into());
        return;
    }
    let mut expect = Role::User;
    for (j, m) in msgs.iter().enumerate() {
        let n = j + 1;
        if m.role == Role::System {
            if j != 0 {
                bad.push(format!("message {n}: a system message may only come first"));
            }
        } else if m.role != expect {
            bad.push(format!(
                "message {n}: expected {} turn, got {} (turns must alternate user, assistant)",
                expect.with_article(),
                m.role.as_str()
            ));
            return;
        } else {
            expect = if expect == Role::User { Role::Assistant } else { Role::User };
        }
        if m.role != Role::User && count_markers(&m.content) > 0 {
            bad.push(format!("message {n}: {IMAGE_MARKER} marker in {} turn (images go in user turns)", m.role.with_article()));
        }
        if m.role == Role::Assistant && m.content.trim().is_empty() {
            bad.push(format!("message {n}: empty assistant turn"));
        }
    }
    if msgs.last().is_some_and(|m| m.role != Role::Assistant) {
        bad.push("the dialogue must end with an assistant turn".into());
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
