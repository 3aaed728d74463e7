//! What the engine generates for: a dialogue's system prompt, its scripted user turns (text and
//! images) and their images' files. Assistant turns of the data are ignored.

use crate::data::dataset::{Role, Sample};
use crate::models::qwen2_5_vl::chat::Part;
use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq)]
pub struct DialogueSpec {
    pub id: String,
    pub system: Option<String>,
    /// Each user turn's content; `Part::Image(k)` is `images[k]`.
    pub turns: Vec<Vec<Part>>,
    pub images: Vec<PathBuf>,
    /// Where it was read (`file:line`), for messages.
    pub origin: String,
    /// Scripted answers to every user turn but the last (SafeMT's `--history given`): then
    /// only the last turn is generated, after this history. Empty: every turn is generated.
    pub history: Vec<String>,
}

impl DialogueSpec {
    /// The user turns of a dataset sample (its assistant turns are dropped).
    pub fn from_sample(s: &Sample) -> DialogueSpec {
        let chat = s.to_chat();
        let mut system = None;
        let mut turns = Vec::new();
        for (m, c) in s.messages.iter().zip(chat) {
            match m.role {
                Role::System => system = Some(m.content.clone()),
                Role::User => turns.push(c.content),
                Role::Assistant => {}
            }
        }
        DialogueSpec {
            id: s.id.clone(),
            system,
            turns,
            images: s.images.clone(),
            origin: s.origin.clone(),
            history: Vec::new(),
        }
    }

    /// A one-turn dialogue (`am3 generate --prompt`): optional images first, then the text.
    pub fn single(prompt: &str, images: Vec<PathBuf>) -> DialogueSpec {
        let mut parts: Vec<Part> = (0..images.len()).map(Part::Image).collect();
        parts.push(Part::Text(prompt.to_string()));
        DialogueSpec {
            id: "prompt".into(),
            system: None,
            turns: vec![parts],
            images,
            origin: "--prompt".into(),
            history: Vec::new(),
        }
    }
}
