//! Prompt segments of a multi-turn rollout, per family, as token ids with the image
//! placeholders expanded. The first segment is the chat template's prompt for the system
//! message and user turn 1; segment t closes the rollout's previous answer (nothing more when it
//! ended on its stop token, the template's end-of-turn token when it was cut) and opens user
//! turn t with the generation prompt. Segments are cut at special tokens, so their ids equal
//! those of tokenising the whole rendered dialogue.

use crate::models::llava_next::chat::{render_chat as render_llava, LlavaChatOptions, TemplateKind};
use crate::models::qwen2_5_vl::chat::{render_chat as render_qwen, ChatMessage, ChatOptions, Part};
use crate::stages::model::{Net, VlModel};
use anyhow::{anyhow, bail, Result};
use tokenizers::Tokenizer;

enum Kind {
    Qwen,
    Llava { kind: TemplateKind, bos: i32 },
}

pub struct TurnTemplate<'a> {
    tok: &'a Tokenizer,
    kind: Kind,
    /// The placeholder id that each image's rows replace.
    pub image_token: i32,
    /// Ids that end an assistant turn (the first is the template's own end-of-turn token).
    pub stop_ids: Vec<i32>,
    /// Ids never sampled: image (and video) placeholders, which only the processor may place.
    pub banned: Vec<i32>,
}

impl<'a> TurnTemplate<'a> {
    pub fn new(model: &VlModel, tok: &'a Tokenizer) -> Result<TurnTemplate<'a>> {
        let id = |t: &str| tok.token_to_id(t).map(|i| i as i32);
        match &model.net {
            Net::Qwen(m) => {
                let im_end = id("<|im_end|>")
                    .ok_or_else(|| anyhow!("the tokenizer has no <|im_end|> token (not a Qwen chat tokenizer)"))?;
                let mut stop_ids = vec![im_end];
                // generation_config.json of Qwen2.5-VL stops on <|endoftext|> too.
                stop_ids.extend(id("<|endoftext|>"));
                Ok(TurnTemplate {
                    tok,
                    kind: Kind::Qwen,
                    image_token: m.cfg.image_token_id as i32,
                    stop_ids,
                    banned: vec![m.cfg.image_token_id as i32, m.cfg.video_token_id as i32],
                })
            }
            Net::Llava(m) => {
                let kind = TemplateKind::for_family(m.cfg.text.family);
                let stop_ids = vec![m.cfg.text.eos_token_id as i32];
                Ok(TurnTemplate {
                    tok,
                    kind: Kind::Llava { kind, bos: m.cfg.text.bos_token_id as i32 },
                    image_token: m.cfg.image_token_index as i32,
                    stop_ids,
                    banned: vec![m.cfg.image_token_index as i32],
                })
            }
        }
    }

    fn encode(&self, text: &str) -> Result<Vec<i32>> {
        let enc = self.tok.encode(text, false).map_err(|e| anyhow!("tokenizing a rollout prompt: {e}"))?;
        Ok(enc.get_ids().iter().map(|&i| i as i32).collect())
    }

    /// The images of `parts` in order (dialogue image indexes).
    pub fn images_of(parts: &[Part]) -> Vec<usize> {
        parts.iter().filter_map(|p| if let Part::Image(k) = p { Some(*k) } else { None }).collect()
    }

    /// Ids of `text` with image placeholder k (in order) expanded to `counts[images[k]]` tokens.
    fn expand(&self, text: &str, images: &[usize], counts: &[usize]) -> Result<Vec<i32>> {
        let raw = self.encode(text)?;
        let found = raw.iter().filter(|&&i| i == self.image_token).count();
        if found != images.len() {
            bail!("a turn shows {} images but tokenizes to {found} image placeholders (does its text contain a literal placeholder?)", images.len());
        }
        let mut out = Vec::with_capacity(raw.len());
        let mut k = 0;
        for id in raw {
            if id == self.image_token {
                let n = *counts.get(images[k]).ok_or_else(|| anyhow!("image {} has no token count", images[k]))?;
                out.extend(std::iter::repeat_n(id, n));
                k += 1;
            } else {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// The prompt up to the first reply: system (or the template's default) and user turn 1.
    pub fn first(&self, system: Option<&str>, user: &[Part], counts: &[usize]) -> Result<Vec<i32>> {
        let mut msgs = Vec::new();
        if let Some(s) = system {
            msgs.push(ChatMessage::system(s));
        }
        msgs.push(ChatMessage::user(user.to_vec()));
        let images = Self::images_of(user);
        match &self.kind {
            Kind::Qwen => {
                let opts = ChatOptions { add_generation_prompt: true, ..ChatOptions::default() };
                self.expand(&render_qwen(&msgs, &opts)?.text, &images, counts)
            }
            Kind::Llava { kind, bos } => {
                let opts = LlavaChatOptions { add_generation_prompt: true, add_bos: true, vicuna_eos: false };
                let mut ids = vec![*bos];
                ids.extend(self.expand(&render_llava(*kind, &msgs, &opts)?.text, &images, counts)?);
                Ok(ids)
            }
        }
    }

    /// The segment after a reply: its closing (when `stopped` is false, the reply was cut and
    /// the template's end-of-turn token closes it) and user turn t with the generation prompt.
    pub fn next(&self, user: &[Part], stopped: bool, counts: &[usize]) -> Result<Vec<i32>> {
        let msgs = [ChatMessage::user(user.to_vec())];
        let images = Self::images_of(user);
        match &self.kind {
            Kind::Qwen => {
                let opts = ChatOptions { default_system: None, add_generation_prompt: true, ..ChatOptions::default() };
                let close = if stopped { "\n" } else { "<|im_end|>\n" };
                self.expand(&format!("{close}{}", render_qwen(&msgs, &opts)?.text), &images, counts)
            }
            Kind::Llava { kind, .. } => {
                let opts = LlavaChatOptions { add_generation_prompt: true, add_bos: false, vicuna_eos: false };
                let close = if stopped { " " } else { "</s> " };
                self.expand(&format!("{close}{}", render_llava(*kind, &msgs, &opts)?.text), &images, counts)
            }
        }
    }

    /// The ids of a scripted (not generated) answer, which must not hold an image placeholder.
    pub fn reply(&self, text: &str) -> Result<Vec<i32>> {
        let ids = self.encode(text)?;
        if ids.contains(&self.image_token) {
            bail!("a scripted answer tokenizes to an image placeholder");
        }
        Ok(ids)
    }

    /// The most ids `next` can add beyond its user block (the closing token).
    pub const CLOSE_EXTRA: usize = 1;

    /// The reply as text, special tokens dropped.
    pub fn decode(&self, ids: &[i32]) -> Result<String> {
        let u: Vec<u32> = ids.iter().filter(|&&i| i >= 0).map(|&i| i as u32).collect();
        self.tok.decode(&u, true).map_err(|e| anyhow!("decoding a reply: {e}"))
    }
}
