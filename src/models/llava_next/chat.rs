//! LLaVA-NeXT prompts (model-spec B2): the chat templates llava-hf ships — Mistral
//! `[INST] … [/INST]` for llava-v1.6-mistral and Vicuna `USER: … ASSISTANT:` for
//! llava-v1.6-vicuna — rendered, tokenised with `tokenizer.json` (BOS `<s>` prepended, as
//! LlamaTokenizerFast does), each `<image>` expanded to the image's anyres token count, and a
//! loss mask over the assistant replies.
//!
//! Templates (every image of a message comes before its text, as `<image>\n`):
//! - Mistral: system `<<SYS>>\n{text}\n<</SYS>>\n\n`; user `[INST] {images}{text} [/INST]`;
//!   assistant ` {text}</s> `. The generation prompt adds nothing (a prompt already ends with
//!   ` [/INST]`). Targets: the reply text and its `</s>`. Old llava-hf files wrote the EOS as
//!   the literal `<\s>` (a template bug); this renders the real `</s>`.
//! - Vicuna: `{ROLE}: ` (upper-cased; none for system), then the images, then each text item
//!   followed by one space; generation prompt `ASSISTANT:`. Targets: the reply text. The
//!   template has no EOS after a reply; [`LlavaChatOptions::vicuna_eos`] adds `</s>` (and makes it
//!   a target) for training, as the original LLaVA conversations had it.
//!
//! The message types, the tokenizer loader and the rendered-text type are shared with the Qwen
//! chat module.

use super::config::{LlavaNextConfig, TextFamily};
pub use crate::models::qwen2_5_vl::chat::{load_tokenizer, ChatMessage, Part, RenderedChat};
use anyhow::{anyhow, bail, Context, Result};
use std::ops::Range;
use tokenizers::Tokenizer;

/// Token ids with the byte range of each in the text.
type IdsOffsets = (Vec<u32>, Vec<(usize, usize)>);

pub const IMAGE_TOKEN: &str = "<image>";
pub const BOS: &str = "<s>";
pub const EOS: &str = "</s>";

/// Which chat template a checkpoint uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TemplateKind {
    /// `[INST] … [/INST]` (llava-v1.6-mistral).
    Mistral,
    /// `USER: … ASSISTANT:` (llava-v1.6-vicuna).
    Vicuna,
}

impl TemplateKind {
    /// The template of the published checkpoint with this decoder.
    pub fn for_family(f: TextFamily) -> TemplateKind {
        match f {
            TextFamily::Mistral => TemplateKind::Mistral,
            TextFamily::Llama => TemplateKind::Vicuna,
        }
    }
}

#[derive(Clone, Debug)]
pub struct LlavaChatOptions {
    /// Vicuna: end with `ASSISTANT:`. Mistral: nothing to add.
    pub add_generation_prompt: bool,
    /// Prepend the BOS id (the tokenizer's default; off when encoding a continuation).
    pub add_bos: bool,
    /// Vicuna only: close each reply with `</s>` (a target), which the llava-hf template omits.
    pub vicuna_eos: bool,
}

impl Default for LlavaChatOptions {
    fn default() -> Self {
        LlavaChatOptions { add_generation_prompt: false, add_bos: true, vicuna_eos: false }
    }
}

/// Splits a message's content into its images (Part::Image indexes) and concatenated text.
fn split_content(m: &ChatMessage) -> (Vec<usize>, Vec<&str>) {
    let mut imgs = Vec::new();
    let mut texts = Vec::new();
    for p in &m.content {
        match p {
            Part::Image(i) => imgs.push(*i),
            Part::Text(s) => texts.push(s.as_str()),
        }
    }
    (imgs, texts)
}

/// Renders `messages` with the template `kind` (one `<image>` per image, not yet expanded; no
/// BOS, which the tokenizer adds). `targets` are the byte ranges the loss is taken on.
pub fn render_chat(kind: TemplateKind, messages: &[ChatMessage], opts: &LlavaChatOptions) -> Result<RenderedChat> {
    let mut text = String::new();
    let mut targets = Vec::new();
    let mut image_order = Vec::new();
    for (mi, m) in messages.iter().enumerate() {
        let (imgs, texts) = split_content(m);
        match (kind, m.role.as_str()) {
            (TemplateKind::Mistral, "system") => {
                if !imgs.is_empty() {
                    bail!("chat message {mi}: the Mistral template does not render images in a system message");
                }
                text.push_str("<<SYS>>\n");
                texts.iter().for_each(|t| text.push_str(t));
                text.push_str("\n<</SYS>>\n\n");
            }
            (TemplateKind::Mistral, "user") => {
                text.push_str("[INST] ");
                for &i in &imgs {
                    text.push_str(IMAGE_TOKEN);
                    text.push('\n');
                    image_order.push(i);
                }
                texts.iter().for_each(|t| text.push_str(t));
                text.push_str(" [/INST]");
            }
            (TemplateKind::Mistral, "assistant") => {
                if !imgs.is_empty() {
                    bail!("chat message {mi}: the Mistral template does not render images in an assistant message");
                }
                if texts.is_empty() {
                    bail!("chat message {mi}: an assistant message needs text");
                }
                text.push(' ');
                let start = text.len();
                texts.iter().for_each(|t| text.push_str(t));
                text.push_str(EOS);
                targets.push((mi, start..text.len()));
                text.push(' ');
            }
            (TemplateKind::Vicuna, role @ ("system" | "user" | "assistant")) => {
                if role != "system" {
                    text.push_str(&role.to_uppercase());
                    text.push_str(": ");
                }
                for &i in &imgs {
                    text.push_str(IMAGE_TOKEN);
                    text.push('\n');
                    image_order.push(i);
                }
                let start = text.len();
                for (k, t) in texts.iter().enumerate() {
                    text.push_str(t);
                    let last = k + 1 == texts.len();
                    if role == "assistant" && last {
                        if opts.vicuna_eos {
                            text.push_str(EOS);
                        }
                        targets.push((mi, start..text.len()));
                    }
                    text.push(' ');
                }
                if role == "assistant" && texts.is_empty() {
                    bail!("chat message {mi}: an assistant message needs text");
                }
            }
            (_, role) => bail!("chat message {mi}: role {role:?} is not system, user or assistant"),
        }
    }
    if opts.add_generation_prompt && kind == TemplateKind::Vicuna {
        text.push_str("ASSISTANT:");
    }
    Ok(RenderedChat { text, targets, image_order })
}

/// A tokenised chat.
#[derive(Clone, Debug)]
pub struct LlavaChatTokens {
    /// Token ids (BOS first when asked), each image's `<image>` expanded to its token count.
    pub ids: Vec<i32>,
    /// 1 on tokens the model is trained to produce (assistant replies, their `</s>` where the
    /// template has one; never image tokens), else 0. Same length as `ids`.
    pub loss_mask: Vec<u8>,
    /// Token ranges of each assistant reply (message index, tokens), for per-turn credit.
    pub assistant_spans: Vec<(usize, Range<usize>)>,
    /// Image indexes in prompt order: the images must be fed to the model in this order.
    pub image_order: Vec<usize>,
    /// `<image>` tokens of each image, in prompt order.
    pub image_tokens: Vec<usize>,
}

/// Tokenises LLaVA-NeXT prompts: the tokenizer, the template and the ids they must agree on.
pub struct LlavaChatTemplate<'a> {
    tok: &'a Tokenizer,
    pub kind: TemplateKind,
    image_token: u32,
    bos: u32,
}

impl<'a> LlavaChatTemplate<'a> {
    /// Checks that the tokenizer has `<image>` with the config's id (and `<s>` with its BOS id
    /// when it has `<s>`); the template follows the decoder family.
    pub fn new(tok: &'a Tokenizer, cfg: &LlavaNextConfig) -> Result<LlavaChatTemplate<'a>> {
        match tok.token_to_id(IMAGE_TOKEN) {
            Some(id) if id == cfg.image_token_index => {}
            Some(id) => bail!(
                "the tokenizer maps {IMAGE_TOKEN} to {id} but the model config's image_token_index is {}",
                cfg.image_token_index
            ),
            None => bail!("the tokenizer has no {IMAGE_TOKEN} token (not a LLaVA tokenizer)"),
        }
        for (t, want, field) in
            [(BOS, cfg.text.bos_token_id, "bos_token_id"), (EOS, cfg.text.eos_token_id, "eos_token_id")]
        {
            if let Some(id) = tok.token_to_id(t) {
                if id != want {
                    bail!("the tokenizer maps {t} to {id} but the model config's {field} is {want}");
                }
            }
        }
        Ok(LlavaChatTemplate {
            tok,
            kind: TemplateKind::for_family(cfg.text.family),
            image_token: cfg.image_token_index,
            bos: cfg.text.bos_token_id,
        })
    }

    /// The same with another template than the family's.
    pub fn with_kind(mut self, kind: TemplateKind) -> Self {
        self.kind = kind;
        self
    }

    /// Ids of `text` (special tokens recognised, nothing added), with byte offsets.
    fn encode(&self, text: &str) -> Result<IdsOffsets> {
        let enc = self.tok.encode(text, false).map_err(|e| anyhow!("tokenizing the chat: {e}"))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Ids of plain text, nothing added (special-token strings in it are still recognised).
    pub fn encode_text(&self, text: &str) -> Result<Vec<i32>> {
        Ok(self.encode(text)?.0.into_iter().map(|i| i as i32).collect())
    }

    /// Tokenises `messages`. `Part::Image(i)` has `image_token_counts[i]` tokens (from
    /// `ProcessedImage::geometry.num_tokens()` or `packing::image_token_count`). The whole text
    /// is tokenised in one call, as the processor does; `<image>` is a special token, so
    /// expanding it after tokenising gives the ids of tokenising the expanded text.
    pub fn encode_chat(
        &self, messages: &[ChatMessage], image_token_counts: &[usize], opts: &LlavaChatOptions,
    ) -> Result<LlavaChatTokens> {
        let r = render_chat(self.kind, messages, opts)?;
        let (raw_ids, offsets) = self.encode(&r.text)?;
        let found = raw_ids.iter().filter(|&&i| i == self.image_token).count();
        if found != r.image_order.len() {
            bail!(
                "the chat has {} images but tokenizes to {found} {IMAGE_TOKEN} tokens (does a text contain the literal placeholder?)",
                r.image_order.len()
            );
        }
        let mut counts = Vec::with_capacity(r.image_order.len());
        for &idx in &r.image_order {
            let n = *image_token_counts.get(idx).with_context(|| {
                format!("chat refers to image {idx} but only {} token counts were given", image_token_counts.len())
            })?;
            if n == 0 {
                bail!("image {idx}: a token count of 0");
            }
            counts.push(n);
        }
        let total = raw_ids.len() + counts.iter().sum::<usize>() + 1;
        let mut ids = Vec::with_capacity(total);
        let mut loss_mask = Vec::with_capacity(total);
        let mut target_of: Vec<Option<usize>> = Vec::with_capacity(total);
        if opts.add_bos {
            ids.push(self.bos as i32);
            loss_mask.push(0);
            target_of.push(None);
        }
        let mut img = 0usize;
        for (&id, &(s, e)) in raw_ids.iter().zip(&offsets) {
            // A token is a target when its bytes overlap an assistant reply (or its `</s>`).
            let t = r.targets.iter().position(|(_, rg)| s < rg.end && e > rg.start && e > s);
            if id == self.image_token {
                let n = counts[img];
                img += 1;
                ids.extend(std::iter::repeat_n(id as i32, n));
                loss_mask.extend(std::iter::repeat_n(0u8, n));
                target_of.extend(std::iter::repeat_n(None, n));
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
        Ok(LlavaChatTokens { ids, loss_mask, assistant_spans, image_order: r.image_order, image_tokens: counts })
    }
}

/// The runs of `image_token` in `ids`, in order: one per image, since the templates put a `\n`
/// after every `<image>` (two images with nothing between would merge into one run).
pub fn placeholder_runs(ids: &[i32], image_token: u32) -> Vec<Range<usize>> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        if ids[i] == image_token as i32 {
            let start = i;
            while i < ids.len() && ids[i] == image_token as i32 {
                i += 1;
            }
            runs.push(start..i);
        } else {
            i += 1;
        }
    }
    runs
}
