//! Qwen ChatML prompts (model-spec A2): the chat template transformers ships with Qwen2.5-VL,
//! rendered and tokenised, with each image's `<|image_pad|>` expanded to t·h·w/merge² copies
//! and a loss mask over the assistant replies.
//!
//! Template: a default system message (`You are a helpful assistant.`) when the first message
//! is not a system one; every message is `<|im_start|>{role}\n{content}<|im_end|>\n`; an image
//! is `<|vision_start|><|image_pad|><|vision_end|>` at its place in the content; the generation
//! prompt is `<|im_start|>assistant\n`. The whole text is tokenised in one call, as the
//! processor does, so BPE merges match; special tokens split the text before BPE, so the
//! messages can also be encoded chunk by chunk (a growing dialogue) with identical ids.

use super::config::QwenVlConfig;
use super::processor::image_tokens;
use anyhow::{anyhow, bail, Context, Result};
use std::ops::Range;
use std::path::Path;
use tokenizers::Tokenizer;

/// Token ids with the byte range of each in the text.
type IdsOffsets = (Vec<u32>, Vec<(usize, usize)>);

pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";
pub const VISION_START: &str = "<|vision_start|>";
pub const VISION_END: &str = "<|vision_end|>";
pub const IMAGE_PAD: &str = "<|image_pad|>";
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a helpful assistant.";

/// `dir/tokenizer.json` through the `tokenizers` crate, or None when the directory has none.
pub fn load_tokenizer(dir: impl AsRef<Path>) -> Result<Option<Tokenizer>> {
    let path = dir.as_ref().join("tokenizer.json");
    if !path.exists() {
        return Ok(None);
    }
    Tokenizer::from_file(&path).map(Some).map_err(|e| anyhow!("{}: cannot load the tokenizer: {e}", path.display()))
}

/// One item of a message's content.
#[derive(Clone, Debug, PartialEq)]
pub enum Part {
    Text(String),
    /// Index into the image list passed alongside the messages.
    Image(usize),
}

#[derive(Clone, Debug, PartialEq)]
pub struct ChatMessage {
    /// "system", "user" or "assistant".
    pub role: String,
    pub content: Vec<Part>,
}

impl ChatMessage {
    pub fn new(role: &str, content: Vec<Part>) -> ChatMessage {
        ChatMessage { role: role.to_string(), content }
    }
    pub fn system(text: &str) -> ChatMessage {
        Self::new("system", vec![Part::Text(text.to_string())])
    }
    pub fn user(content: Vec<Part>) -> ChatMessage {
        Self::new("user", content)
    }
    pub fn assistant(text: &str) -> ChatMessage {
        Self::new("assistant", vec![Part::Text(text.to_string())])
    }
}

#[derive(Clone, Debug)]
pub struct ChatOptions {
    /// Inserted as a system message when the first message is not one; None inserts nothing
    /// (use None when encoding the continuation of a dialogue).
    pub default_system: Option<String>,
    /// End with `<|im_start|>assistant\n` (prompting a reply).
    pub add_generation_prompt: bool,
    /// Prefix each image with `Picture k: ` (the template's `add_vision_id`).
    pub add_vision_id: bool,
    /// Images counted before this chunk (for `Picture k` numbering of continuations).
    pub first_image_number: usize,
}

impl Default for ChatOptions {
    fn default() -> Self {
        ChatOptions {
            default_system: Some(DEFAULT_SYSTEM_PROMPT.to_string()),
            add_generation_prompt: false,
            add_vision_id: false,
            first_image_number: 1,
        }
    }
}

/// The rendered text with one `<|image_pad|>` per image, and where the training targets are.
#[derive(Clone, Debug)]
pub struct RenderedChat {
    pub text: String,
    /// Byte ranges of each assistant reply plus its `<|im_end|>`, with the message index.
    pub targets: Vec<(usize, Range<usize>)>,
    /// `Part::Image` indexes in the order they appear.
    pub image_order: Vec<usize>,
}

/// Renders `messages` with the Qwen2.5-VL template (images not yet expanded).
pub fn render_chat(messages: &[ChatMessage], opts: &ChatOptions) -> Result<RenderedChat> {
    let mut text = String::new();
    let mut targets = Vec::new();
    let mut image_order = Vec::new();
    if let Some(sys) = &opts.default_system {
        if messages.first().is_none_or(|m| m.role != "system") {
            text.push_str(&format!("{IM_START}system\n{sys}{IM_END}\n"));
        }
    }
    for (mi, m) in messages.iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
            bail!("chat message {mi}: role {:?} is not system, user or assistant", m.role);
        }
        text.push_str(IM_START);
        text.push_str(&m.role);
        text.push('\n');
        let start = text.len();
        for part in &m.content {
            match part {
                Part::Text(s) => text.push_str(s),
                Part::Image(idx) => {
                    if opts.add_vision_id {
                        text.push_str(&format!("Picture {}: ", opts.first_image_number + image_order.len()));
                    }
                    text.push_str(VISION_START);
                    text.push_str(IMAGE_PAD);
                    text.push_str(VISION_END);
                    image_order.push(*idx);
                }
            }
        }
        text.push_str(IM_END);
        if m.role == "assistant" {
            targets.push((mi, start..text.len()));
        }
        text.push('\n');
    }
    if opts.add_generation_prompt {
        text.push_str(&format!("{IM_START}assistant\n"));
    }
    Ok(RenderedChat { text, targets, image_order })
}

/// A tokenised chat.
#[derive(Clone, Debug)]
pub struct ChatTokens {
    /// Token ids, image placeholders expanded.
    pub ids: Vec<i32>,
    /// 1 on tokens the model is trained to produce (assistant replies and their `<|im_end|>`;
    /// never image placeholders), else 0. Same length as `ids`.
    pub loss_mask: Vec<u8>,
    /// Token ranges of each assistant reply (message index, tokens), for per-turn credit.
    pub assistant_spans: Vec<(usize, Range<usize>)>,
    /// Image indexes in prompt order: pixel_values must be concatenated in this order.
    pub image_order: Vec<usize>,
    /// The grids in prompt order (what M-RoPE and the vision tower consume).
    pub grids: Vec<[usize; 3]>,
}

/// Tokenises ChatML prompts for one model: the tokenizer plus the ids it must agree on.
pub struct ChatTemplate<'a> {
    tok: &'a Tokenizer,
    image_pad: u32,
    merge: usize,
}

impl<'a> ChatTemplate<'a> {
    /// Checks that the tokenizer knows the ChatML and vision tokens, with the config's ids.
    pub fn new(tok: &'a Tokenizer, cfg: &QwenVlConfig) -> Result<ChatTemplate<'a>> {
        for t in [IM_START, IM_END] {
            if tok.token_to_id(t).is_none() {
                bail!("the tokenizer has no {t} token (not a Qwen chat tokenizer)");
            }
        }
        for (t, want) in [
            (IMAGE_PAD, cfg.image_token_id),
            (VISION_START, cfg.vision_start_token_id),
            (VISION_END, cfg.vision_end_token_id),
        ] {
            match tok.token_to_id(t) {
                Some(id) if id == want => {}
                Some(id) => bail!("the tokenizer maps {t} to {id} but the model config says {want}"),
                None => bail!("the tokenizer has no {t} token"),
            }
        }
        Ok(ChatTemplate { tok, image_pad: cfg.image_token_id, merge: cfg.vision.spatial_merge_size })
    }

    /// Ids of `text` (special tokens recognised, nothing added), with byte offsets.
    fn encode(&self, text: &str) -> Result<IdsOffsets> {
        let enc = self.tok.encode(text, false).map_err(|e| anyhow!("tokenizing the chat: {e}"))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Ids of plain text (special-token strings in it are still recognised, as in transformers).
    pub fn encode_text(&self, text: &str) -> Result<Vec<i32>> {
        Ok(self.encode(text)?.0.into_iter().map(|i| i as i32).collect())
    }

    /// Tokenises `messages`. `Part::Image(i)` refers to `image_grids[i]` (`[t, h, w]` in
    /// patches, from the image processor); its placeholder becomes t·h·w/merge² tokens.
    pub fn encode_chat(
        &self, messages: &[ChatMessage], image_grids: &[[usize; 3]], opts: &ChatOptions,
    ) -> Result<ChatTokens> {
        let r = render_chat(messages, opts)?;
        let (raw_ids, offsets) = self.encode(&r.text)?;
        let pads = raw_ids.iter().filter(|&&i| i == self.image_pad).count();
        if pads != r.image_order.len() {
            bail!(
                "the chat has {} images but tokenizes to {pads} {IMAGE_PAD} tokens (does a text contain the literal placeholder?)",
                r.image_order.len()
            );
        }
        let mut grids = Vec::with_capacity(r.image_order.len());
        for &idx in &r.image_order {
            let g = *image_grids.get(idx).with_context(|| {
                format!("chat refers to image {idx} but only {} grids were given", image_grids.len())
            })?;
            if g.contains(&0) || g[1] % self.merge != 0 || g[2] % self.merge != 0 {
                bail!("image {idx}: grid {g:?} is not a positive multiple of the merge size {}", self.merge);
            }
            grids.push(g);
        }

        let mut ids = Vec::with_capacity(raw_ids.len());
        let mut loss_mask = Vec::with_capacity(raw_ids.len());
        let mut target_of: Vec<Option<usize>> = Vec::with_capacity(raw_ids.len()); // which target a token belongs to
        let mut img = 0usize;
        for (&id, &(s, e)) in raw_ids.iter().zip(&offsets) {
            // A token is a target when its bytes overlap an assistant reply (or its <|im_end|>).
            let t = r.targets.iter().position(|(_, rg)| s < rg.end && e > rg.start && e > s);
            if id == self.image_pad {
                let n = image_tokens(grids[img], self.merge);
                img += 1;
                ids.extend(std::iter::repeat_n(id as i32, n));
                loss_mask.extend(std::iter::repeat_n(0u8, n));
                target_of.extend(std::iter::repeat_n(t, n));
            } else {
                ids.push(id as i32);
                loss_mask.push(t.is_some() as u8);
                target_of.push(t);
            }
        }
        let mut assistant_spans = Vec::with_capacity(r.targets.len());
        for (k, (mi, _)) in r.targets.iter().enumerate() {
            let first = target_of.iter().position(|&t| t == Some(k));
            let last = target_of.iter().rposition(|&t| t == Some(k));
            if let (Some(a), Some(b)) = (first, last) {
                assistant_spans.push((*mi, a..b + 1));
            }
        }
        Ok(ChatTokens { ids, loss_mask, assistant_spans, image_order: r.image_order, grids })
    }
}

/// One-call form: tokenises a chat for `cfg` with `tok`.
pub fn build_prompt(
    tok: &Tokenizer, cfg: &QwenVlConfig, messages: &[ChatMessage], image_grids: &[[usize; 3]], opts: &ChatOptions,
) -> Result<ChatTokens> {
    ChatTemplate::new(tok, cfg)?.encode_chat(messages, image_grids, opts)
}
