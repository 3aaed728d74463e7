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
//!
//! Here: the sample types and loading; `parse` (validation of one line), `write` (JSONL out).

use crate::models::qwen2_5_vl::chat::{ChatMessage, Part};
use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

mod parse;
mod write;
use parse::*;
pub use write::*;

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
