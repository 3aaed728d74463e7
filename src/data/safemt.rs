//! Reader for the SafeMT benchmark (multi-turn safety for multimodal LLMs; the layout of
//! `Data/{1,2,4,6,8}_turn.json` in github.com/Happy-Corpse/SafeMT): a JSON list of records
//!
//! ```json
//! {"id": "mllm_fraud_1", "scenario": "Fraud", "image_path": "images/fraud/fraud_1.jpg",
//!  "dialogue": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."},
//!               {"role": "user", "content": "..."}],
//!  "question": "the original harmful query"}
//! ```
//!
//! The dialogue alternates user and assistant and ends with a user turn: the earlier rounds
//! build context (with scripted assistant replies) and the last user turn carries the harmful
//! intent. Also read: one record per line (JSONL); the Hugging Face export's `image_rel_path`
//! and its `dialogue` stored as a JSON string; `image` and `category` as aliases.
//!
//! Each record becomes a prompt-only [`Sample`] (kind `refusal`): the user turns in order, an
//! `<image>` marker before the first one's text, labels benign…benign, harmful (last), and
//! `meta` = {source, category (the scenario), turn_labels, question, scripted_replies}. The
//! scripted replies are kept in `meta` only: they were written by the attack pipeline (some
//! comply with harmful requests), so they must not serve as reference answers.

use super::dataset::{Kind, Message, Role, Sample, TurnLabel, IMAGE_MARKER, RESERVED_TOKENS};
use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::Path;

/// Reads a SafeMT file; every bad record is reported (`file: record N (id "x"): reason` for a
/// JSON list, `file:LINE: reason` for JSONL) and none is dropped.
pub fn load_safemt(path: impl AsRef<Path>) -> Result<Vec<Sample>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).with_context(|| format!("reading SafeMT file {}", path.display()))?;
    let text = std::str::from_utf8(&bytes).with_context(|| format!("{}: not valid UTF-8", path.display()))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let base = path.parent().unwrap_or(Path::new(""));
    let file = path.display().to_string();

    // (location prefix, short location, record).
    let mut records: Vec<(String, String, Value)> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    if text.trim_start().starts_with('[') {
        let list: Vec<Value> = serde_json::from_str(text).map_err(|e| {
            let msg = e.to_string();
            let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
            anyhow::anyhow!("{file}:{}:{}: bad JSON: {msg}", e.line(), e.column())
        })?;
        for (i, v) in list.into_iter().enumerate() {
            let id = v.get("id").map(|id| match id {
                Value::String(s) => format!(" (id {s:?})"),
                other => format!(" (id {other})"),
            });
            records.push((
                format!("{file}: record {}{}", i + 1, id.unwrap_or_default()),
                format!("record {}", i + 1),
                v,
            ));
        }
    } else {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Value>(line) {
                Ok(v) => records.push((format!("{file}:{}", i + 1), format!("line {}", i + 1), v)),
                Err(e) => {
                    let msg = e.to_string();
                    let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
                    errors.push(format!("{file}:{}: bad JSON at column {}: {msg}", i + 1, e.column()));
                }
            }
        }
    }
    if records.is_empty() && errors.is_empty() {
        bail!("{file}: no SafeMT records");
    }

    let mut samples = Vec::with_capacity(records.len());
    let mut seen: HashMap<String, String> = HashMap::new();
    for (at, short, v) in &records {
        match record_to_sample(v, base, at) {
            Ok(s) => {
                if let Some(first) = seen.get(&s.id) {
                    errors.push(format!("{at}: duplicate id {:?} (first used in {first})", s.id));
                } else {
                    seen.insert(s.id.clone(), short.clone());
                    samples.push(s);
                }
            }
            Err(reasons) => errors.extend(reasons.into_iter().map(|r| format!("{at}: {r}"))),
        }
    }
    if !errors.is_empty() {
        bail!("{file}: {} problem(s) in the SafeMT data:\n  {}", errors.len(), errors.join("\n  "));
    }
    Ok(samples)
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

/// The first of `names` present in `obj`, with its name.
fn first_of<'a>(obj: &'a Map<String, Value>, names: &[&'static str]) -> Option<(&'static str, &'a Value)> {
    names.iter().find_map(|&n| obj.get(n).map(|v| (n, v)))
}

fn record_to_sample(v: &Value, base: &Path, at: &str) -> std::result::Result<Sample, Vec<String>> {
    let Value::Object(obj) = v else {
        return Err(vec![format!("expected a JSON object, got {}", kind_of(v))]);
    };
    let mut bad = Vec::new();

    let id = match obj.get("id") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::String(_)) => {
            bad.push("field \"id\" is empty".to_string());
            String::new()
        }
        Some(other) => {
            bad.push(format!("field \"id\" must be a string, got {}", kind_of(other)));
            String::new()
        }
        None => {
            bad.push("missing field \"id\"".to_string());
            String::new()
        }
    };

    let category = match first_of(obj, &["scenario", "category"]) {
        None | Some((_, Value::Null)) => None,
        Some((_, Value::String(s))) => Some(s.clone()),
        Some((name, other)) => {
            bad.push(format!("field {name:?} must be a string, got {}", kind_of(other)));
            None
        }
    };

    let image = match first_of(obj, &["image_path", "image_rel_path", "image"]) {
        Some((_, Value::String(s))) if !s.is_empty() => {
            let full = base.join(s);
            if !full.is_file() {
                bad.push(format!("missing image file {} (field \"image_path\": {s:?})", full.display()));
            }
            Some(full)
        }
        Some((name, other)) => {
            bad.push(format!("field {name:?} must be a non-empty path string, got {}", show(other)));
            None
        }
        None => {
            bad.push("missing field \"image_path\" (the record's image, relative to the SafeMT file)".to_string());
            None
        }
    };

    let question = match obj.get("question") {
        None | Some(Value::Null) => None,
        Some(Value::String(q)) => Some(q.clone()),
        Some(other) => {
            bad.push(format!("field \"question\" must be a string, got {}", kind_of(other)));
            None
        }
    };

    // The HF export stores the dialogue as a JSON string.
    let parsed_string;
    let dialogue: Option<&Vec<Value>> = match obj.get("dialogue") {
        Some(Value::Array(a)) => Some(a),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Array(a)) => {
                parsed_string = a;
                Some(&parsed_string)
            }
            Ok(other) => {
                bad.push(format!(
                    "field \"dialogue\" is a string holding {}, expected a list of turns",
                    kind_of(&other)
                ));
                None
            }
            Err(e) => {
                bad.push(format!("field \"dialogue\" is a string but not a JSON list of turns ({e})"));
                None
            }
        },
        Some(other) => {
            bad.push(format!(
                "field \"dialogue\" must be a list of {{\"role\", \"content\"}} turns, got {}",
                kind_of(other)
            ));
            None
        }
        None => None,
    };

    let mut system = None;
    let mut user_turns: Vec<String> = Vec::new();
    let mut replies: Vec<String> = Vec::new();
    match dialogue {
        Some(turns) if turns.is_empty() => bad.push("field \"dialogue\" is empty".to_string()),
        Some(turns) => parse_dialogue(turns, &mut system, &mut user_turns, &mut replies, &mut bad),
        // A record with only the question is a one-round dialogue.
        None if obj.get("dialogue").is_none() => match &question {
            Some(q) => user_turns.push(q.trim().to_string()),
            None => bad.push("missing field \"dialogue\" (and no \"question\" to use instead)".to_string()),
        },
        None => {}
    }
    for (k, t) in user_turns.iter().enumerate() {
        if t.is_empty() {
            bad.push(format!("user turn {}: empty text", k + 1));
        }
    }
    for text in user_turns.iter().chain(&replies).chain(system.iter()).chain(question.iter()) {
        for t in RESERVED_TOKENS {
            if text.contains(t) {
                bad.push(format!("text contains the reserved token {t}"));
            }
        }
        if text.contains(IMAGE_MARKER) {
            bad.push(format!("text contains a literal {IMAGE_MARKER} marker (the converter places the image itself)"));
        }
    }

    let Some(image) = image else { return Err(bad) };
    if !bad.is_empty() {
        return Err(bad);
    }

    let n = user_turns.len();
    let turn_labels: Vec<TurnLabel> =
        (0..n).map(|k| if k + 1 == n { TurnLabel::Harmful } else { TurnLabel::Benign }).collect();
    let mut meta = Map::new();
    meta.insert("source".into(), json!("safemt"));
    if let Some(c) = &category {
        meta.insert("category".into(), json!(c));
    }
    meta.insert("turn_labels".into(), json!(turn_labels.iter().map(|l| l.as_str()).collect::<Vec<_>>()));
    if let Some(q) = &question {
        meta.insert("question".into(), json!(q));
    }
    if !replies.is_empty() {
        meta.insert("scripted_replies".into(), json!(replies));
    }

    let mut messages = Vec::with_capacity(n + 1);
    if let Some(s) = system {
        messages.push(Message { role: Role::System, content: s });
    }
    for (k, t) in user_turns.into_iter().enumerate() {
        let content = if k == 0 { format!("{IMAGE_MARKER}{t}") } else { t };
        messages.push(Message { role: Role::User, content });
    }
    Ok(Sample {
        id,
        images: vec![image],
        messages,
        kind: Kind::Refusal,
        origin: at.to_string(),
        meta: Some(Value::Object(meta)),
        turn_labels,
        category,
        references: Vec::new(),
    })
}

/// [system] user (assistant user)*: the user texts and the scripted replies, trimmed (the
/// published files have stray leading spaces and newlines).
fn parse_dialogue(
    turns: &[Value], system: &mut Option<String>, users: &mut Vec<String>, replies: &mut Vec<String>,
    bad: &mut Vec<String>,
) {
    let mut expect = Role::User;
    let mut last = None;
    for (j, t) in turns.iter().enumerate() {
        let n = j + 1;
        let (Some(role), Some(content)) = (t.get("role"), t.get("content")) else {
            bad.push(format!("dialogue turn {n}: expected an object with \"role\" and \"content\", got {}", show(t)));
            return;
        };
        let Some(content) = content.as_str() else {
            bad.push(format!("dialogue turn {n}: \"content\" must be a string, got {}", kind_of(content)));
            return;
        };
        let role = match role.as_str() {
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            Some("system") if j == 0 => {
                *system = Some(content.trim().to_string());
                continue;
            }
            _ => {
                bad.push(format!(
                    "dialogue turn {n}: unexpected role {} (expected \"user\" or \"assistant\")",
                    show(role)
                ));
                return;
            }
        };
        if role != expect {
            let want = if expect == Role::User { "a user" } else { "an assistant" };
            bad.push(format!(
                "dialogue turn {n}: expected {want} turn, got {} (rounds alternate user, assistant)",
                role.as_str()
            ));
            return;
        }
        match role {
            Role::User => users.push(content.trim().to_string()),
            _ => replies.push(content.trim().to_string()),
        }
        last = Some(role);
        expect = if role == Role::User { Role::Assistant } else { Role::User };
    }
    match last {
        None => bad.push("field \"dialogue\" has no user turn".to_string()),
        Some(Role::Assistant) => bad.push(
            "the dialogue ends with an assistant turn; SafeMT dialogues end with the user's (harmful) question".into(),
        ),
        _ => {}
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => kind_of(other).to_string(),
    }
}
