//! Tokenizers for the fixture checkpoints, which ship none: the demo tokenizer with its
//! special tokens moved onto the Qwen fixture's ids, and a small word-level tokenizer with the
//! LLaVA fixture's `<s>`, `</s>` and `<image>` ids.
#![allow(dead_code)]

use am3safety::models::tiny;
use serde_json::{json, Value};
use std::str::FromStr;
use tokenizers::Tokenizer;

pub fn qwen_fixture_tokenizer(cfg: &Value) -> Tokenizer {
    let mut t: Value = serde_json::from_str(tiny::TOKENIZER_JSON).unwrap();
    let id = |k: &str| cfg[k].as_u64().unwrap();
    // The fixture's ids for the tokens the chat code checks; the other specials fill 580.. in order.
    let fixed = [
        ("<|image_pad|>", id("image_token_id")),
        ("<|video_pad|>", id("video_token_id")),
        ("<|vision_start|>", id("vision_start_token_id")),
        ("<|vision_end|>", id("vision_end_token_id")),
    ];
    let taken: Vec<u64> = fixed.iter().map(|f| f.1).collect();
    let mut free = (580u64..).filter(|i| !taken.contains(i));
    let added = t["added_tokens"].as_array_mut().unwrap();
    let mut remap = Vec::new();
    for a in added.iter_mut() {
        let content = a["content"].as_str().unwrap().to_string();
        let new = fixed.iter().find(|f| f.0 == content).map(|f| f.1).unwrap_or_else(|| free.next().unwrap());
        a["id"] = json!(new);
        remap.push((content, new));
    }
    let vocab = t["model"]["vocab"].as_object_mut().unwrap();
    // Added tokens take the model vocabulary's id when it has one, so they go in there too.
    for (c, new) in &remap {
        vocab.insert(c.clone(), json!(new));
    }
    let tok = Tokenizer::from_str(&t.to_string()).unwrap();
    assert_eq!(tok.token_to_id("<|image_pad|>"), Some(id("image_token_id") as u32));
    assert!(tok.get_vocab_size(true) <= 600 && remap.iter().all(|(_, i)| *i < 600));
    tok
}

/// The LLaVA fixture tokenizer over the words the judge prompts use.
pub fn llava_fixture_tokenizer() -> Tokenizer {
    llava_word_tokenizer(&[
        "safe",
        "unsafe",
        "0",
        "1",
        "2",
        "3",
        "4",
        "5",
        "6",
        "7",
        "8",
        "9",
        "User",
        "Assistant",
        "Turn",
        "Question",
        "image",
        "circle",
        "gun",
        "I",
        "can",
        "t",
        "help",
    ])
}

/// A word-level tokenizer with the LLaVA special tokens at the fixture's ids (`<unk>` 0, `<s>`
/// 1, `</s>` 2, `<image>` 590) and `words` from id 3 on.
pub fn llava_word_tokenizer(words: &[&str]) -> Tokenizer {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<unk>".into(), json!(0));
    vocab.insert("<s>".into(), json!(1));
    vocab.insert("</s>".into(), json!(2));
    for (i, w) in words.iter().enumerate() {
        vocab.insert((*w).into(), json!(3 + i));
    }
    vocab.insert("<image>".into(), json!(590));
    let added = |id: u32, s: &str| json!({"id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    let t = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [added(0, "<unk>"), added(1, "<s>"), added(2, "</s>"), added(590, "<image>")],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    Tokenizer::from_str(&t.to_string()).unwrap()
}
