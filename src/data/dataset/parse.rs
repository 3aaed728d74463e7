//! Validation of one JSONL line as a [`Sample`]: fields, images, messages and turns, `meta`;
//! every problem found is reported.

use super::*;

/// Parses every line; a line with any problem contributes errors and no sample.
pub(super) fn parse_lines(bytes: &[u8], file: &Path, base: &Path, purpose: Purpose) -> (Vec<Sample>, Vec<LineError>) {
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

pub(super) const SAMPLE_FIELDS: [&str; 5] = ["id", "kind", "images", "messages", "meta"];

/// Validates one JSON value as a sample; returns every problem found.
pub(super) fn parse_sample(
    v: &Value, base: &Path, origin: String, purpose: Purpose,
) -> std::result::Result<Sample, Vec<String>> {
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

pub(super) struct ParsedMeta {
    turn_labels: Vec<TurnLabel>,
    category: Option<String>,
    references: Vec<Option<String>>,
}

/// The fields of `meta` the trainer reads (`turn_labels`, `category`, `references`); anything
/// else in it, or a `meta` that is not an object, is left alone.
pub(super) fn parse_meta(meta: Option<&Value>, kind: Kind, n_user: usize, bad: &mut Vec<String>) -> Option<ParsedMeta> {
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
pub(super) fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => kind_of(other).to_string(),
    }
}

/// `images`: a list of paths (missing means none), each an existing file.
pub(super) fn parse_images(obj: &Map<String, Value>, base: &Path, bad: &mut Vec<String>) -> Option<Vec<PathBuf>> {
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
pub(super) fn parse_messages(
    obj: &Map<String, Value>, purpose: Purpose, bad: &mut Vec<String>,
) -> Option<Vec<Message>> {
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
pub(super) fn check_turns(msgs: &[Message], purpose: Purpose, bad: &mut Vec<String>) {
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

pub(super) fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
