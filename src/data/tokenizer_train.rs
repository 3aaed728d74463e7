//! Trains the small byte-level BPE tokenizer of the tiny demo model on dialogue text. It has the
//! structure of Qwen2's `tokenizer.json` (NFC normaliser; Qwen's split regex, then byte-level
//! mapping without its own regex; byte-level decoder; no unknown token since all 256 bytes are
//! in the alphabet), so `models::qwen2_5_vl::chat` tokenises with it exactly as with the real
//! one. The 14 Qwen special tokens follow the BPE vocabulary in Qwen's order, so each sits at
//! `base + (qwen_id − 151643)`; e.g. `<|image_pad|>` = base + 12.
//!
//! The training text is each sample rendered with the ChatML template, cut at the special tokens
//! (as encoding cuts it before BPE), so roles, newlines and the default system prompt get merges.

use super::dataset::{Sample, RESERVED_TOKENS};
use crate::models::qwen2_5_vl::chat::{render_chat, ChatOptions};
use anyhow::{anyhow, bail, Result};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// Qwen2's pre-tokenisation regex (contractions, letters, single digits, punctuation runs,
/// newlines, spaces).
pub const QWEN_SPLIT_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// BPE vocabulary of the demo tokenizer (256 byte symbols + merges), before the special tokens.
pub const DEMO_BPE_VOCAB: usize = 480;

/// An untrained tokenizer with Qwen2's pipeline.
fn qwen_like_pipeline() -> Result<Tokenizer> {
    let mut tok = Tokenizer::new(BPE::default());
    let split = Split::new(SplitPattern::Regex(QWEN_SPLIT_REGEX.to_string()), SplitDelimiterBehavior::Isolated, false)
        .map_err(|e| anyhow!("compiling the split regex: {e}"))?;
    tok.with_normalizer(Some(NFC));
    tok.with_pre_tokenizer(Some(Sequence::new(vec![split.into(), ByteLevel::new(false, false, false).into()])));
    // The same ByteLevel type serves as post-processor (offsets) and decoder (bytes → text).
    tok.with_post_processor(Some(ByteLevel::new(false, false, false)));
    tok.with_decoder(Some(ByteLevel::new(false, false, false)));
    Ok(tok)
}

/// The text pieces BPE sees for one rendered text: the parts between special tokens.
pub fn text_pieces(rendered: &str) -> Vec<String> {
    let mut pieces = vec![rendered.to_string()];
    for t in RESERVED_TOKENS {
        pieces = pieces.iter().flat_map(|p| p.split(t).map(str::to_string).collect::<Vec<_>>()).collect();
    }
    pieces.retain(|p| !p.is_empty());
    pieces
}

/// Trains a byte-level BPE with `bpe_vocab` entries on `texts`, then appends the Qwen special
/// tokens.
pub fn train_bpe(texts: &[String], bpe_vocab: usize) -> Result<Tokenizer> {
    if bpe_vocab < 256 {
        bail!("a byte-level BPE needs at least 256 entries, got {bpe_vocab}");
    }
    let mut tok = qwen_like_pipeline()?;
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(bpe_vocab)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    tok.train(&mut trainer, texts.iter()).map_err(|e| anyhow!("training the BPE: {e}"))?;
    let specials: Vec<AddedToken> =
        RESERVED_TOKENS.iter().map(|t| AddedToken::from(*t, true).normalized(false)).collect();
    tok.add_special_tokens(&specials);
    Ok(tok)
}

/// The demo tokenizer: BPE trained on `samples` rendered as Qwen chats (default system prompt).
pub fn train_demo_tokenizer(samples: &[Sample]) -> Result<Tokenizer> {
    let opts = ChatOptions::default();
    let mut texts = Vec::new();
    for s in samples {
        let r = render_chat(&s.to_chat(), &opts)?;
        texts.extend(text_pieces(&r.text));
    }
    if texts.is_empty() {
        bail!("no text to train the tokenizer on");
    }
    train_bpe(&texts, DEMO_BPE_VOCAB)
}
