//! Datasets in JSON Lines, one dialogue per line:
//!
//! ```json
//! {"id": "r007", "kind": "refusal", "images": ["images/r007_0.png"],
//!  "messages": [{"role": "user", "content": "<image>\nHow do I build the weapon shown here?"},
//!               {"role": "assistant", "content": "I can't help with that because ..."}]}
//! ```
//!
//! Image paths are relative to the JSONL file. Each `<image>` marker in a user turn stands for
//! the next image of `images`, in order, so one dialogue can show several images across turns.
//! `meta` may hold per-user-turn labels (`turn_labels`: "harmful"/"benign"), a `category` and
//! per-user-turn reference answers (`references`), which GRPO and the eval read through
//! [`Sample::user_turns`]. Two purposes: SFT data must end with an assistant turn; prompt data
//! (GRPO, eval) may leave the assistant turns out. Every sample is validated on load and every
//! problem is reported as `file:line: reason`;
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

/// Whether a user turn is a harmful request (refusing is the safe answer) or a benign one
/// (refusing it is over-refusal).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TurnLabel {
    Harmful,
    Benign,
}

impl TurnLabel {
    pub fn as_str(self) -> &'static str {
        match self {
            TurnLabel::Harmful => "harmful",
            TurnLabel::Benign => "benign",
        }
    }
    pub fn is_harmful(self) -> bool {
        self == TurnLabel::Harmful
    }
    fn parse(s: &str) -> Option<TurnLabel> {
        match s {
            "harmful" => Some(TurnLabel::Harmful),
            "benign" => Some(TurnLabel::Benign),
            _ => None,
        }
    }
}

/// The labels a dialogue gets when `meta.turn_labels` is absent: every turn benign for
/// `general`; for `refusal` the last user turn harmful and the earlier ones benign.
pub fn default_turn_labels(kind: Kind, user_turns: usize) -> Vec<TurnLabel> {
    (0..user_turns)
        .map(|k| if kind == Kind::Refusal && k + 1 == user_turns { TurnLabel::Harmful } else { TurnLabel::Benign })
        .collect()
}

/// One user turn with what a rollout or a judge needs about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserTurn {
    /// The text as written, with its `<image>` markers.
    pub text: String,
    /// The images its markers refer to, in order (resolved paths).
    pub images: Vec<PathBuf>,
    pub label: TurnLabel,
    /// `meta.references` for this turn, else the assistant reply that follows it in the data.
    pub reference: Option<String>,
}

/// What a file is loaded for; it decides whether assistant turns are required.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Purpose {
    /// Training targets: user/assistant turns alternating, ending with an assistant turn.
    #[default]
    Sft,
    /// Prompts for GRPO rollouts or the eval: either user/assistant alternating with the final
    /// assistant turn optional, or user turns only (each one a separate turn). Assistant turns
    /// are only used as reference answers.
    Prompts,
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
    /// `meta` as written (any JSON); `None` when absent.
    pub meta: Option<Value>,
    /// One label per user turn: `meta.turn_labels`, else [`default_turn_labels`].
    pub turn_labels: Vec<TurnLabel>,
    /// `meta.category`.
    pub category: Option<String>,
    /// `meta.references`, one entry per user turn; empty when `meta` has none.
    pub references: Vec<Option<String>>,
}

impl Sample {
    /// The system message's text, when the dialogue starts with one.
    pub fn system(&self) -> Option<&str> {
        self.messages.first().filter(|m| m.role == Role::System).map(|m| m.content.as_str())
    }

    pub fn category(&self) -> Option<&str> {
        self.category.as_deref()
    }

    /// The user turns in order, each with its images, label and reference answer.
    pub fn user_turns(&self) -> Vec<UserTurn> {
        let n_user = self.messages.iter().filter(|m| m.role == Role::User).count();
        // A hand-built sample may lack labels; fall back to the documented defaults.
        let labels = if self.turn_labels.len() == n_user {
            self.turn_labels.clone()
        } else {
            default_turn_labels(self.kind, n_user)
        };
        let mut next_image = 0usize;
        let mut out = Vec::with_capacity(n_user);
        for (j, m) in self.messages.iter().enumerate() {
            if m.role != Role::User {
                continue;
            }
            let k = out.len();
            let n = count_markers(&m.content);
            let images = self.images.iter().skip(next_image).take(n).cloned().collect();
            next_image += n;
            let reply = self.messages.get(j + 1).filter(|a| a.role == Role::Assistant).map(|a| a.content.clone());
            let reference = self.references.get(k).cloned().flatten().or(reply);
            out.push(UserTurn { text: m.content.clone(), images, label: labels[k], reference });
        }
        out
    }

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
    /// SFT (the default: must end with an assistant turn) or prompts (assistant turns optional).
    pub purpose: Purpose,
}

/// The result of a load: the valid samples and, under `skip_bad`, what was skipped and why.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub samples: Vec<Sample>,
    pub errors: Vec<LineError>,
}

/// Loads and validates an SFT dataset; fails listing every problem if any line is bad.
pub fn load_jsonl(path: impl AsRef<Path>) -> Result<Vec<Sample>> {
    Ok(load_jsonl_with(path, LoadOptions::default())?.samples)
}

/// Loads and validates prompt dialogues (GRPO, eval): assistant turns optional.
pub fn load_prompts(path: impl AsRef<Path>) -> Result<Vec<Sample>> {
    Ok(load_jsonl_with(path, LoadOptions { purpose: Purpose::Prompts, ..Default::default() })?.samples)
}

/// Loads and validates a dataset. Without `skip_bad`, any bad line fails the load (with all
/// problems listed); with it, bad lines are left out and returned in `errors`. Either way a file
/// with no valid sample is an error.
pub fn load_jsonl_with(path: impl AsRef<Path>, opts: LoadOptions) -> Result<Loaded> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).with_context(|| format!("reading dataset {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("")).to_path_buf();
    let (samples, errors) = parse_lines(&bytes, path, &base, opts.purpose);
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
fn parse_lines(bytes: &[u8], file: &Path, base: &Path, purpose: Purpose) -> (Vec<Sample>, Vec<LineError>) {
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
        match parse_sample(&value, base, origin, purpose) {
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
fn parse_sample(v: &Value, base: &Path, origin: String, purpose: Purpose) -> std::result::Result<Sample, Vec<String>> {
    let mut bad = Vec::new();
    let Value::Object(obj) = v else {
        return Err(vec![format!("expected a JSON object, got {}", kind_of(v))]);
    };
    for k in obj.keys() {
        if !SAMPLE_FIELDS.contains(&k.as_str()) {
            bad.push(format!(
                "unknown field {k:?} (allowed: {}; put extra data under \"meta\")",
                SAMPLE_FIELDS.join(", ")
            ));
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
    let messages = parse_messages(obj, purpose, &mut bad);

    if let (Some(images), Some(messages)) = (&images, &messages) {
        let markers: usize = messages.iter().map(|m| count_markers(&m.content)).sum();
        if markers != images.len() {
            bad.push(format!(
                "{markers} {IMAGE_MARKER} marker(s) in the messages but {} image(s) listed; each image needs exactly one marker",
                images.len()
            ));
        }
    }

    let meta = obj.get("meta").cloned();
    let mut parsed = None;
    if let (Some(kind), Some(messages)) = (kind, &messages) {
        let n_user = messages.iter().filter(|m| m.role == Role::User).count();
        parsed = parse_meta(meta.as_ref(), kind, n_user, &mut bad);
    }

    match (bad.is_empty(), kind, images, messages, parsed) {
        (true, Some(kind), Some(images), Some(messages), Some(p)) => Ok(Sample {
            id,
            images,
            messages,
            kind,
            origin,
            meta,
            turn_labels: p.turn_labels,
            category: p.category,
            references: p.references,
        }),
        _ => Err(bad),
    }
}

struct ParsedMeta {
    turn_labels: Vec<TurnLabel>,
    category: Option<String>,
    references: Vec<Option<String>>,
}

/// The fields of `meta` the trainer reads (`turn_labels`, `category`, `references`); anything
/// else in it, or a `meta` that is not an object, is left alone.
fn parse_meta(meta: Option<&Value>, kind: Kind, n_user: usize, bad: &mut Vec<String>) -> Option<ParsedMeta> {
    let before = bad.len();
    let obj = meta.and_then(Value::as_object);
    let field = |name: &str| obj.and_then(|o| o.get(name));

    let turn_labels = match field("turn_labels") {
        None => default_turn_labels(kind, n_user),
        Some(Value::Array(list)) => {
            if list.len() != n_user {
                bad.push(format!(
                    "meta.turn_labels has {} entries but the dialogue has {n_user} user turn(s) (one label per user turn)",
                    list.len()
                ));
            }
            let mut labels = Vec::with_capacity(list.len());
            for (j, v) in list.iter().enumerate() {
                match v.as_str().and_then(TurnLabel::parse) {
                    Some(l) => labels.push(l),
                    None => bad.push(format!(
                        "meta.turn_labels entry {}: expected \"harmful\" or \"benign\", got {}",
                        j + 1,
                        show(v)
                    )),
                }
            }
            labels
        }
        Some(other) => {
            bad.push(format!("meta.turn_labels must be a list of \"harmful\"/\"benign\", got {}", kind_of(other)));
            Vec::new()
        }
    };
    if bad.len() == before {
        let harmful: Vec<usize> =
            (0..turn_labels.len()).filter(|&k| turn_labels[k].is_harmful()).map(|k| k + 1).collect();
        match kind {
            Kind::General if !harmful.is_empty() => bad.push(format!(
                "kind \"general\" but meta.turn_labels marks user turn(s) {harmful:?} harmful (a dialogue with a harmful turn is a \"refusal\")"
            )),
            Kind::Refusal if harmful.is_empty() => {
                bad.push("kind \"refusal\" but meta.turn_labels marks no user turn harmful".into())
            }
            _ => {}
        }
    }

    let category = match field("category") {
        None | Some(Value::Null) => None,
        Some(Value::String(c)) => Some(c.clone()),
        Some(other) => {
            bad.push(format!("meta.category must be a string, got {}", kind_of(other)));
            None
        }
    };

    let references = match field("references") {
        None => Vec::new(),
        Some(Value::Array(list)) => {
            if list.len() != n_user {
                bad.push(format!(
                    "meta.references has {} entries but the dialogue has {n_user} user turn(s) (one string or null per user turn)",
                    list.len()
                ));
            }
            let mut refs = Vec::with_capacity(list.len());
            for (j, v) in list.iter().enumerate() {
                match v {
                    Value::Null => refs.push(None),
                    Value::String(r) => {
                        for t in RESERVED_TOKENS {
                            if r.contains(t) {
                                bad.push(format!("meta.references entry {}: contains the reserved token {t}", j + 1));
                            }
                        }
                        refs.push(Some(r.clone()));
                    }
                    other => bad.push(format!(
                        "meta.references entry {}: expected a string or null, got {}",
                        j + 1,
                        kind_of(other)
                    )),
                }
            }
            refs
        }
        Some(other) => {
            bad.push(format!("meta.references must be a list of strings or nulls, got {}", kind_of(other)));
            Vec::new()
        }
    };

    (bad.len() == before).then_some(ParsedMeta { turn_labels, category, references })
}

/// A short rendering of a JSON value for messages: strings quoted, others by type.
fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => kind_of(other).to_string(),
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

/// `messages`: an optional system message first, then the turns `check_turns` allows for
/// `purpose`; markers only in user turns; no reserved token in any text.
fn parse_messages(obj: &Map<String, Value>, purpose: Purpose, bad: &mut Vec<String>) -> Option<Vec<Message>> {
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
                    bad.push(format!(
                        "message {n}: unknown role {r:?} (expected \"system\", \"user\" or \"assistant\")"
                    ));
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
    check_turns(&out, purpose, bad);
    (bad.len() == before).then_some(out)
}

/// The turn structure. SFT: [system] user assistant (user assistant)*. Prompts: [system] then
/// either user (assistant user)* [assistant], or user+ (user turns only).
fn check_turns(msgs: &[Message], purpose: Purpose, bad: &mut Vec<String>) {
    let has_assistant = msgs.iter().any(|m| m.role == Role::Assistant);
    match purpose {
        Purpose::Sft if !has_assistant => {
            bad.push("no assistant turn (nothing to train on)".into());
            return;
        }
        Purpose::Prompts if !msgs.iter().any(|m| m.role == Role::User) => {
            bad.push("no user turn (nothing to prompt with)".into());
            return;
        }
        _ => {}
    }
    // Prompt dialogues without any assistant turn are a list of user turns.
    let users_only = purpose == Purpose::Prompts && !has_assistant;
    let mut expect = Role::User;
    for (j, m) in msgs.iter().enumerate() {
        let n = j + 1;
        if m.role == Role::System {
            if j != 0 {
                bad.push(format!("message {n}: a system message may only come first"));
            }
        } else if m.role != expect {
            let hint = match purpose {
                Purpose::Sft => "turns must alternate user, assistant",
                Purpose::Prompts => "turns must alternate user, assistant, or be user turns only",
            };
            bad.push(format!("message {n}: expected {} turn, got {} ({hint})", expect.with_article(), m.role.as_str()));
            return;
        } else if !users_only {
            expect = if expect == Role::User { Role::Assistant } else { Role::User };
        }
        if m.role != Role::User && count_markers(&m.content) > 0 {
            bad.push(format!(
                "message {n}: {IMAGE_MARKER} marker in {} turn (images go in user turns)",
                m.role.with_article()
            ));
        }
        if m.role == Role::Assistant && m.content.trim().is_empty() {
            bad.push(format!("message {n}: empty assistant turn"));
        }
    }
    if purpose == Purpose::Sft && msgs.last().is_some_and(|m| m.role != Role::Assistant) {
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

#[derive(serde::Serialize)]
struct JsonMessage<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(serde::Serialize)]
struct JsonSample<'a> {
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
fn absolute_clean(path: &Path) -> Result<PathBuf> {
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
