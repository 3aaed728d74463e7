//! The Qwen2.5-VL chat prompt: ids and loss mask with a small byte-level tokenizer.
mod common;

use am3safety::models::qwen2_5_vl::chat::{self, ChatMessage, ChatOptions, ChatTemplate, Part};
use am3safety::models::qwen2_5_vl::config::QwenVlConfig;
use am3safety::models::qwen2_5_vl::positions::{mrope_positions, MropeState};
use serde_json::{json, Value};
use std::path::Path;

#[path = "support/qwen_data.rs"]
mod qwen_data_support;
use qwen_data_support::*;

/// GPT-2's byte → printable character map used by byte-level BPE.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut map = vec!['\0'; 256];
    for &b in &printable {
        map[b as usize] = char::from_u32(b).unwrap();
    }
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            map[b as usize] = char::from_u32(256 + n).unwrap();
            n += 1;
            printable.push(b);
        }
    }
    map
}

/// A tiny byte-level BPE tokenizer with Qwen's pre-tokenizer, a few merges and the ChatML and
/// vision special tokens at the tiny config's ids.
fn tiny_tokenizer(dir: &Path) -> tokenizers::Tokenizer {
    let chars = byte_chars();
    let mut vocab = serde_json::Map::new();
    for (b, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), json!(b));
    }
    let nl = chars[b'\n' as usize];
    let sp = chars[b' ' as usize];
    let merge_pairs = [
        ("a", "s"),
        ("as", "s"),
        ("i", "s"),
        ("t", "a"),
        ("n", "t"),
        (&*format!("{nl}"), &*format!("{nl}")),
        (&*format!("{sp}"), "c"),
    ];
    let mut merges = Vec::new();
    for (next, (a, b)) in (256..).zip(merge_pairs) {
        vocab.insert(format!("{a}{b}"), json!(next));
        merges.push(json!([a, b]));
    }
    let special = [
        ("<|endoftext|>", 580),
        ("<|im_end|>", 581),
        ("<|im_start|>", 582),
        ("<|image_pad|>", 590),
        ("<|video_pad|>", 591),
        ("<|vision_start|>", 592),
        ("<|vision_end|>", 593),
    ];
    let added: Vec<Value> = special
        .iter()
        .map(|(t, id)| json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    for (t, id) in special {
        vocab.insert(t.to_string(), json!(id));
    }
    let tj = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
             "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "", "end_of_word_suffix": "",
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges}
    });
    std::fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
    chat::load_tokenizer(dir).unwrap().expect("tokenizer.json was just written")
}

#[test]
fn chat_prompt_ids_and_loss_mask() {
    let dir = fixtures();
    let cfg = QwenVlConfig::load(&dir).unwrap();
    assert!(chat::load_tokenizer(&dir).unwrap().is_none(), "the fixture has no tokenizer.json");
    let t = tmp_dir("chat");
    let tok = tiny_tokenizer(&t);
    let tpl = ChatTemplate::new(&tok, &cfg).unwrap();

    let grids = [[1usize, 8, 10], [1, 4, 6]];
    let msgs = vec![
        ChatMessage::user(vec![Part::Image(0), Part::Text("What is in this picture?".into())]),
        ChatMessage::assistant("A cat sits."),
        ChatMessage::user(vec![Part::Text("And this one?\n".into()), Part::Image(1)]),
        ChatMessage::assistant("\n\nI cannot assist with that."),
    ];
    let opts = ChatOptions::default();
    let enc = tpl.encode_chat(&msgs, &grids, &opts).unwrap();
    assert_eq!(enc.ids.len(), enc.loss_mask.len());
    assert_eq!(enc.image_order, vec![0, 1]);
    assert_eq!(enc.grids, grids.to_vec());

    // Collapsing the placeholder runs and decoding gives back the template text exactly.
    let r = chat::render_chat(&msgs, &opts).unwrap();
    assert!(r.text.starts_with(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What"
    ));
    let mut collapsed: Vec<u32> = Vec::new();
    for (i, &id) in enc.ids.iter().enumerate() {
        if !(id == 590 && i > 0 && enc.ids[i - 1] == 590) {
            collapsed.push(id as u32);
        }
    }
    assert_eq!(tok.decode(&collapsed, false).unwrap(), r.text);
    // One whole-text tokenisation (merges across the role header included).
    let direct: Vec<i32> = tok.encode(r.text.as_str(), false).unwrap().get_ids().iter().map(|&i| i as i32).collect();
    assert_eq!(collapsed.iter().map(|&i| i as i32).collect::<Vec<_>>(), direct);

    // Placeholder runs: 8·10/4 = 20 and 4·6/4 = 6 tokens, never in the loss.
    let runs: Vec<usize> = enc.ids.split(|&i| i != 590).filter(|r| !r.is_empty()).map(|r| r.len()).collect();
    assert_eq!(runs, vec![20, 6]);
    assert!(enc.ids.iter().zip(&enc.loss_mask).all(|(&i, &m)| i != 590 || m == 0));

    // The loss covers exactly the replies and their <|im_end|>.
    assert_eq!(enc.assistant_spans.len(), 2);
    let mut masked_text = Vec::new();
    for (mi, span) in &enc.assistant_spans {
        assert!(enc.loss_mask[span.clone()].iter().all(|&m| m == 1));
        let ids: Vec<u32> = enc.ids[span.clone()].iter().map(|&i| i as u32).collect();
        masked_text.push((*mi, tok.decode(&ids, false).unwrap()));
    }
    println!("assistant spans: {:?}", enc.assistant_spans);
    println!("masked text: {masked_text:?}");
    assert_eq!(masked_text[0], (1, "A cat sits.<|im_end|>".to_string()));
    // A reply starting with newlines: BPE merges them with the header's "\n" (as transformers'
    // whole-text tokenisation does), and that token overlaps the reply, so it is a target.
    assert_eq!(masked_text[1], (3, "\n\n\nI cannot assist with that.<|im_end|>".to_string()));
    assert_eq!(
        enc.loss_mask.iter().map(|&m| m as usize).sum::<usize>(),
        enc.assistant_spans.iter().map(|(_, s)| s.len()).sum::<usize>()
    );
    assert_eq!(*enc.ids.last().unwrap(), b'\n' as i32, "the last token is the newline after <|im_end|>");
    assert_eq!(enc.loss_mask.last(), Some(&0));

    // Encoding the dialogue in two chunks gives the same ids (special tokens split the text).
    let a = tpl.encode_chat(&msgs[..2], &grids, &opts).unwrap();
    let cont = ChatOptions { default_system: None, ..ChatOptions::default() };
    let b = tpl.encode_chat(&msgs[2..], &grids, &cont).unwrap();
    let joined: Vec<i32> = a.ids.iter().chain(&b.ids).copied().collect();
    assert_eq!(joined, enc.ids);
    // ... and M-RoPE continues across the chunks.
    let (whole, _) = mrope_positions(&enc.ids, &enc.grids, &cfg).unwrap();
    let mut st = MropeState::new(&cfg);
    let pa = st.append(&a.ids, &a.grids).unwrap();
    let pb = st.append(&b.ids, &b.grids).unwrap();
    let n = enc.ids.len();
    assert_eq!(&pa[..a.ids.len()], &whole[..a.ids.len()]);
    assert_eq!(&pb[2 * b.ids.len()..], &whole[2 * n + a.ids.len()..]);

    // Generation prompt, explicit system message, image ids.
    let gen = ChatOptions { add_generation_prompt: true, add_vision_id: true, ..ChatOptions::default() };
    let mut sys = vec![ChatMessage::system("Be safe.")];
    sys.push(msgs[0].clone());
    let r = chat::render_chat(&sys, &gen).unwrap();
    assert_eq!(
        r.text,
        "<|im_start|>system\nBe safe.<|im_end|>\n<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>What is in this picture?<|im_end|>\n<|im_start|>assistant\n"
    );
    let g = tpl.encode_chat(&sys, &grids, &gen).unwrap();
    assert!(g.loss_mask.iter().all(|&m| m == 0));
    let tail = [vec![582], tpl.encode_text("assistant\n").unwrap()].concat();
    assert!(g.ids.ends_with(&tail));

    // A literal placeholder in user text, a missing grid, an unknown role: errors.
    let inject = vec![ChatMessage::user(vec![Part::Text("<|image_pad|>".into())])];
    assert!(err_text(tpl.encode_chat(&inject, &grids, &opts)).contains("literal"));
    let msg = err_text(tpl.encode_chat(&[ChatMessage::user(vec![Part::Image(5)])], &grids, &opts));
    assert!(msg.contains("image 5"), "{msg}");
    assert!(tpl.encode_chat(&[ChatMessage::new("tool", vec![])], &grids, &opts).is_err());
    let _ = std::fs::remove_dir_all(&t);
}
