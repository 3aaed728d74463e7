//! Synthetic inputs for the workload suites: a tokenizer with a shape's special ids (the 7B
//! configs ship none), noise images, training samples of an exact token count, and GRPO prompt
//! dialogues.

use crate::data::dataset::{load_jsonl_with, LoadOptions, Purpose};
use crate::models::tiny;
use crate::rng::Rng;
use crate::stages::examples::{pack, Example, Packed};
use crate::stages::model::{Encoder, Net, VlModel};
use crate::stages::sft::Loaded;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use tokenizers::Tokenizer;

/// Qwen2's special tokens at their published ids.
const QWEN_SPECIALS: [(&str, u32); 14] = [
    ("<|endoftext|>", 151643),
    ("<|im_start|>", 151644),
    ("<|im_end|>", 151645),
    ("<|object_ref_start|>", 151646),
    ("<|object_ref_end|>", 151647),
    ("<|box_start|>", 151648),
    ("<|box_end|>", 151649),
    ("<|quad_start|>", 151650),
    ("<|quad_end|>", 151651),
    ("<|vision_start|>", 151652),
    ("<|vision_end|>", 151653),
    ("<|vision_pad|>", 151654),
    ("<|image_pad|>", 151655),
    ("<|video_pad|>", 151656),
];

/// The demo's byte-level BPE (480 tokens) moved up by `offset`, with `specials` at their ids.
pub fn tokenizer_with(offset: u32, specials: &[(&str, u32)]) -> Result<Tokenizer> {
    let mut t: Value = serde_json::from_str(tiny::TOKENIZER_JSON).context("embedded demo tokenizer")?;
    let vocab = t["model"]["vocab"].as_object_mut().ok_or_else(|| anyhow!("demo tokenizer: no model.vocab"))?;
    for v in vocab.values_mut() {
        *v = json!(v.as_u64().unwrap_or(0) + offset as u64);
    }
    let mut added = Vec::new();
    for (c, id) in specials {
        // An added token keeps its id only when the model vocabulary holds it too.
        vocab.insert((*c).to_string(), json!(id));
        added.push(json!({"id": id, "content": c, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
    }
    t["added_tokens"] = Value::Array(added);
    let tok = Tokenizer::from_str(&t.to_string()).map_err(|e| anyhow!("synthetic tokenizer: {e}"))?;
    for (c, id) in specials {
        if tok.token_to_id(c) != Some(*id) {
            bail!("synthetic tokenizer: {c} did not land on id {id}");
        }
    }
    Ok(tok)
}

/// A tokenizer for a shape without one: Qwen2's specials (the config's image, video and vision
/// ids checked against them), or LLaVA's `<unk>`, `<s>`, `</s>` and `<image>` at the config's ids.
pub fn tokenizer_for(m: &VlModel) -> Result<Tokenizer> {
    match &m.net {
        Net::Qwen(q) => {
            let c = &q.cfg;
            for (name, want) in [
                ("<|image_pad|>", c.image_token_id),
                ("<|video_pad|>", c.video_token_id),
                ("<|vision_start|>", c.vision_start_token_id),
                ("<|vision_end|>", c.vision_end_token_id),
            ] {
                let have = QWEN_SPECIALS.iter().find(|s| s.0 == name).map(|s| s.1);
                if have != Some(want) {
                    bail!("the config puts {name} at {want}, not at Qwen2's id: give a checkpoint with its tokenizer (--model DIR)");
                }
            }
            tokenizer_with(0, &QWEN_SPECIALS)
        }
        Net::Llava(l) => {
            let c = &l.cfg;
            tokenizer_with(
                3,
                &[
                    ("<unk>", 0),
                    ("<s>", c.text.bos_token_id),
                    ("</s>", c.text.eos_token_id),
                    ("<image>", c.image_token_index),
                ],
            )
        }
    }
}

/// A noise PNG of `w` × `h` pixels.
pub fn write_png(path: &Path, w: u32, h: u32, seed: u64) -> Result<()> {
    let mut rng = Rng::new(seed);
    let img = image::RgbImage::from_fn(w, h, |_, _| {
        image::Rgb([rng.below(256) as u8, rng.below(256) as u8, rng.below(256) as u8])
    });
    img.save(path).with_context(|| format!("writing {}", path.display()))
}

const WORDS: [&str; 24] = [
    "the",
    "image",
    "shows",
    "a",
    "red",
    "square",
    "next",
    "to",
    "blue",
    "circle",
    "and",
    "green",
    "triangle",
    "on",
    "white",
    "background",
    "which",
    "is",
    "safe",
    "to",
    "describe",
    "in",
    "detail",
    "here",
];

fn words(n: usize, seed: u64) -> String {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| WORDS[rng.below(WORDS.len())]).collect::<Vec<_>>().join(" ")
}

/// One training example of exactly `tokens` tokens: a user turn with the images (noise PNGs of
/// the given sizes, written into `tmp`) and a long assistant reply, through the model's own
/// chat template and processor; cut to length. Errors when the images alone do not fit.
pub fn example_of(l: &Loaded, tmp: &Path, tokens: usize, images: &[(u32, u32)]) -> Result<Example> {
    let enc = Encoder::new(&l.model, &l.tok, &l.pp)?;
    let mut names = Vec::new();
    for (k, &(w, h)) in images.iter().enumerate() {
        let name = format!("img-{w}x{h}-{k}.png");
        let p = tmp.join(&name);
        if !p.is_file() {
            write_png(&p, w, h, 1000 + k as u64)?;
        }
        names.push(name);
    }
    let marks = "<image>".repeat(images.len());
    let mut n_words = tokens.max(16);
    for attempt in 0..8 {
        let line = json!({
            "id": format!("bench-{attempt}"), "kind": "general", "images": names,
            "messages": [{"role": "user", "content": format!("{marks}Describe the pictures in detail.")}, {"role": "assistant", "content": words(n_words, 7)}]
        });
        let path = tmp.join("train-sample.jsonl");
        std::fs::write(&path, format!("{line}\n"))?;
        let loaded = load_jsonl_with(&path, LoadOptions { skip_bad: false, purpose: Purpose::Sft })?;
        let s = loaded.samples.first().ok_or_else(|| anyhow!("synthetic sample did not load"))?;
        let ex = enc.encode(s)?;
        if ex.len() >= tokens {
            return truncate(ex, tokens, image_token(&l.model));
        }
        n_words = n_words * tokens / ex.len().max(1) + 16;
    }
    bail!("could not make a sample of {tokens} tokens")
}

fn image_token(m: &VlModel) -> i32 {
    match &m.net {
        Net::Qwen(q) => q.cfg.image_token_id as i32,
        Net::Llava(l) => l.cfg.image_token_index as i32,
    }
}

/// The first `n` tokens of `ex` (every image placeholder must be inside).
fn truncate(mut ex: Example, n: usize, image_id: i32) -> Result<Example> {
    let full = ex.len();
    let placeholders = ex.ids.iter().filter(|&&i| i == image_id).count();
    if ex.ids[..n].iter().filter(|&&i| i == image_id).count() != placeholders {
        bail!("{n} tokens cannot hold the images ({placeholders} image tokens in a {full}-token sample); use a larger --seq");
    }
    ex.ids.truncate(n);
    ex.targets.truncate(n);
    ex.weights.truncate(n);
    if !ex.pos3.is_empty() {
        ex.pos3 = (0..3).flat_map(|r| ex.pos3[r * full..r * full + n].to_vec()).collect();
    }
    Ok(ex)
}

/// `example_of` as a packed batch of one sequence.
pub fn batch_of(l: &Loaded, tmp: &Path, tokens: usize, images: &[(u32, u32)]) -> Result<Packed> {
    let ex = example_of(l, tmp, tokens, images)?;
    Ok(pack(&[&ex]))
}

/// `n` GRPO prompt dialogues of `turns` user turns, the first showing one `side`² noise image,
/// in the demo's format, written to `tmp/prompts.jsonl`.
pub fn write_prompts(tmp: &Path, n: usize, turns: usize, side: u32) -> Result<PathBuf> {
    let img = format!("prompt-{side}.png");
    write_png(&tmp.join(&img), side, side, 77)?;
    let mut text = String::new();
    for d in 0..n {
        let mut messages = vec![json!({"role": "user", "content": format!("<image>{}?", words(12, d as u64))})];
        for t in 1..turns {
            messages.push(json!({"role": "user", "content": format!("{}?", words(16, (d * 31 + t) as u64))}));
        }
        let labels: Vec<&str> = (0..turns).map(|_| "benign").collect();
        let line = json!({"id": format!("bench-{d:03}"), "kind": "general", "images": [img], "messages": messages, "meta": {"category": "general", "turn_labels": labels}});
        text.push_str(&line.to_string());
        text.push('\n');
    }
    let path = tmp.join("prompts.jsonl");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// A scratch directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<TempDir> {
        let base = std::env::temp_dir();
        for k in 0..1000 {
            let p = base.join(format!("am3-{tag}-{}-{k}", std::process::id()));
            if std::fs::create_dir(&p).is_ok() {
                return Ok(TempDir(p));
            }
        }
        bail!("could not create a scratch directory in {}", base.display())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
