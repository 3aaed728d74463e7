//! The LLaVA-NeXT data tests' shared part: the fixture directory and its tensors, config
//! parsing from JSON text, CLIP-L's vision config, a two-turn dialogue and a word-level tokenizer.
#![allow(dead_code)]

use super::common;
use super::fixture_tokenizers::llava_word_tokenizer;
use am3safety::checkpoint::read_tensor_file;
use am3safety::models::llava_next::chat::{ChatMessage, Part};
use am3safety::models::llava_next::config::LlavaNextConfig;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

pub type Tensors = HashMap<String, (Vec<usize>, Vec<f64>)>;

pub fn llava_fixtures() -> PathBuf {
    let dir = common::fixture_dir("llava_next_tiny");
    assert!(
        dir.join("config.json").is_file(),
        "LLaVA fixtures not found in {} (set AM3_LLAVA_FIXTURES or AM3_FIXTURES)",
        dir.display()
    );
    dir
}

pub fn read(name: &str) -> Tensors {
    let p = llava_fixtures().join(name);
    read_tensor_file(&p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()))
}

/// A fresh temporary directory for one test.
pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("am3_llava_{tag}_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn fixture_config() -> LlavaNextConfig {
    LlavaNextConfig::load(llava_fixtures()).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The CLIP ViT-L/14-336 vision_config of the published LLaVA-NeXT 7B models.
pub fn clip_l() -> Value {
    json!({"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14})
}

pub fn parse(v: &Value) -> anyhow::Result<LlavaNextConfig> {
    LlavaNextConfig::from_json(v, Path::new("test/config.json"))
}

pub fn dialogue() -> Vec<ChatMessage> {
    vec![
        ChatMessage::user(vec![Part::Image(0), Part::Text("What is this?".into())]),
        ChatMessage::assistant("A cat."),
        ChatMessage::user(vec![Part::Text("And this?".into()), Part::Image(1)]),
        ChatMessage::assistant("A dog."),
    ]
}

/// A word-level tokenizer with the LLaVA special tokens at the fixture's ids: the fixtures ship
/// no tokenizer, and this exercises the offset-based mask.
pub fn test_tokenizer() -> Tokenizer {
    llava_word_tokenizer(&[
        "[",
        "INST",
        "]",
        "[/",
        "What",
        "is",
        "this",
        "?",
        "A",
        "cat",
        ".",
        "dog",
        "And",
        "USER",
        "ASSISTANT",
        ":",
        "Be",
        "safe",
    ])
}
