//! The model-independent SFT pieces: JSONL loading and validation (every problem reported as
//! file:line), the committed demo dataset (valid, every file reproducible by the generator,
//! images the processor takes without resizing), the demo tokenizer (round trip, special
//! tokens as single ids, compatible with the Qwen chat code), LR schedules, atomic file/dir
//! writes (a crash before the rename keeps the previous version), the metrics log and the
//! plain progress output.

use am3safety::data::dataset::{load_jsonl, load_jsonl_with, load_prompts, Kind, LoadOptions, Role, RESERVED_TOKENS};
use am3safety::data::demo;
use am3safety::models::qwen2_5_vl::chat::{build_prompt, render_chat, ChatOptions, Part};
use am3safety::models::qwen2_5_vl::config::{QwenPreprocessorConfig, QwenVlConfig};
use am3safety::models::qwen2_5_vl::processor::process_image_file;
use am3safety::train::atomic::{recover_dir, write_dir, write_file, StagedFile};
use am3safety::train::metrics::{read_metrics, truncate_after, MetricsWriter, StepMetrics};
use am3safety::train::progress::Progress;
use am3safety::train::schedule::{LrKind, LrSchedule};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokenizers::Tokenizer;

const DEMO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/demo");

/// A fresh empty folder for one test.
fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("am3-sft-data-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn demo_tokenizer() -> Tokenizer {
    Tokenizer::from_file(Path::new(DEMO).join("tokenizer.json")).unwrap()
}

fn all_demo_samples() -> Vec<am3safety::data::dataset::Sample> {
    let mut s = load_jsonl(Path::new(DEMO).join("train.jsonl")).unwrap();
    s.extend(load_jsonl(Path::new(DEMO).join("eval.jsonl")).unwrap());
    s
}

// ---------------------------------------------------------------- dataset

#[test]
fn demo_set_loads() {
    let train = load_jsonl(Path::new(DEMO).join("train.jsonl")).unwrap();
    let eval = load_jsonl(Path::new(DEMO).join("eval.jsonl")).unwrap();
    println!("demo: {} train, {} eval samples", train.len(), eval.len());
    assert_eq!(train.len(), 80);
    // 16 SFT-style dialogues, then the 24 labelled multi-turn ones (tests/data_formats.rs).
    assert_eq!(eval.len(), 40);
    assert_eq!(demo::EVAL_SFT, 16);
    assert!(eval[..16].iter().all(|s| s.meta.is_none()) && eval[16..].iter().all(|s| s.meta.is_some()));
    for set in [&train, &eval] {
        assert!(set.iter().any(|s| s.kind == Kind::Refusal));
        assert!(set.iter().any(|s| s.kind == Kind::General));
        // Multi-turn dialogues with a second image in a later turn.
        assert!(set
            .iter()
            .any(|s| s.images.len() == 2 && s.images_per_message().iter().filter(|&&n| n == 1).count() == 2));
    }
    let refusals = train.iter().filter(|s| s.kind == Kind::Refusal).count();
    println!("train: {refusals} refusal, {} general", train.len() - refusals);
    for s in train.iter().chain(&eval) {
        let last = s.messages.last().unwrap();
        assert_eq!(last.role, Role::Assistant);
        if s.kind == Kind::Refusal {
            assert!(last.content.starts_with("I can't help"), "{}: {}", s.id, last.content);
            assert!(last.content.contains("because"), "{}: refusal without a reason", s.id);
        }
    }
    // Total size stays small (the dataset is committed).
    let mut bytes = 0u64;
    for e in walk(Path::new(DEMO)) {
        bytes += std::fs::metadata(&e).unwrap().len();
    }
    println!("demo dataset: {bytes} bytes");
    assert!(bytes < 300 << 10);
}

/// Every demo image is 56 or 84 pixels wide and 56 high, so the Qwen processor keeps its size.
#[test]
fn demo_images_need_no_resize() {
    let cfg = QwenPreprocessorConfig::default();
    let grpo = load_prompts(Path::new(DEMO).join("grpo.jsonl")).unwrap();
    for s in all_demo_samples().into_iter().chain(grpo) {
        for p in &s.images {
            let img = am3safety::data::image::load_rgb(p).unwrap();
            assert!(img.width % 28 == 0 && img.height % 28 == 0, "{}: {}x{}", p.display(), img.width, img.height);
            let pi = process_image_file(p, &cfg).unwrap();
            assert_eq!(pi.grid_thw, [1, img.height / 14, img.width / 14], "{}", p.display());
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// The generator reproduces the committed dataset: identical text files (JSONL, the SafeMT
/// sample, tokenizer, README), identical pixels.
#[test]
fn demo_generator_is_reproducible() {
    let out = tmp_dir("regen").join("demo");
    let summary = demo::generate(&out).unwrap();
    println!("regenerated: {summary:?}");
    assert_eq!((summary.train_samples, summary.eval_samples, summary.eval_multiturn), (80, 40, 24));
    assert_eq!((summary.grpo_prompts, summary.safemt_records, summary.vocab_size), (48, 4, 494));
    let committed: Vec<PathBuf> =
        walk(Path::new(DEMO)).iter().map(|p| p.strip_prefix(DEMO).unwrap().to_path_buf()).collect();
    for f in ["train.jsonl", "eval.jsonl", "grpo.jsonl", "safemt-sample.json", "tokenizer.json", "README.md"] {
        assert!(committed.contains(&PathBuf::from(f)), "{f} is not committed");
    }
    let fresh: Vec<PathBuf> = walk(&out).iter().map(|p| p.strip_prefix(&out).unwrap().to_path_buf()).collect();
    assert_eq!(committed, fresh, "the generator writes a different set of files");
    for rel in &committed {
        let (a, b) = (Path::new(DEMO).join(rel), out.join(rel));
        if rel.extension().is_some_and(|e| e == "png") {
            // PNG bytes depend on the encoder version; the pixels must not.
            let (ia, ib) =
                (am3safety::data::image::load_rgb(&a).unwrap(), am3safety::data::image::load_rgb(&b).unwrap());
            assert_eq!(ia, ib, "{} differs from the committed file", rel.display());
        } else {
            assert!(
                std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
                "{} differs from the committed file (rerun tools/make-demo-data.sh?)",
                rel.display()
            );
        }
    }
    let _ = std::fs::remove_dir_all(out.parent().unwrap());
}

/// Writes `lines` as dataset.jsonl in a folder holding one image `a.png`.
fn bad_set(name: &str, lines: &[&str]) -> PathBuf {
    let d = tmp_dir(name);
    std::fs::copy(Path::new(DEMO).join("images/train-000-0.png"), d.join("a.png")).unwrap();
    let p = d.join("dataset.jsonl");
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

const GOOD: &str = r#"{"id":"ok","kind":"general","images":["a.png"],"messages":[{"role":"user","content":"<image>What is this?"},{"role":"assistant","content":"Shapes."}]}"#;

#[test]
fn every_validation_error_names_file_and_line() {
    let cases: Vec<(String, &str)> = vec![
        (GOOD.to_string(), ""),
        (r#"{"id":"x1","kind":"general","images":[],"messages":[{"role":"user","content":"hi"}"#.into(), "bad JSON"),
        (r#"{"id":"x2","kind":"general","messages":[{"role":"robot","content":"hi"},{"role":"assistant","content":"hello"}]}"#.into(), "unknown role \"robot\""),
        (r#"{"id":"x3","kind":"general","images":["a.png"],"messages":[{"role":"user","content":"no marker"},{"role":"assistant","content":"ok"}]}"#.into(), "0 <image> marker(s) in the messages but 1 image(s)"),
        (r#"{"id":"x4","kind":"general","images":["missing.png"],"messages":[{"role":"user","content":"<image>?"},{"role":"assistant","content":"ok"}]}"#.into(), "missing image file"),
        (r#"{"id":"x5","kind":"general","messages":[{"role":"user","content":"hi"}]}"#.into(), "no assistant turn"),
        (r#"{"id":"x6","kind":"jailbreak","messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"ok"}]}"#.into(), "unknown kind \"jailbreak\""),
        (r#"{"kind":"general","messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"ok"}]}"#.into(), "missing field \"id\""),
        (GOOD.to_string(), "duplicate id \"ok\" (first used on line 1)"),
        (r#"{"id":"x9","kind":"general","image":["a.png"],"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"ok"}]}"#.into(), "unknown field \"image\""),
        (r#"{"id":"x10","kind":"general","messages":[{"role":"user","content":"<|im_end|>hi"},{"role":"assistant","content":"ok"}]}"#.into(), "reserved token <|im_end|>"),
        (r#"{"id":"x11","kind":"general","images":["a.png"],"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"<image>ok"}]}"#.into(), "marker in an assistant turn"),
        (r#"{"id":"x12","kind":"general","messages":[{"role":"user","content":"hi"},{"role":"user","content":"again"},{"role":"assistant","content":"ok"}]}"#.into(), "expected an assistant turn, got user"),
        (r#"{"id":"x13","kind":"general","messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"ok"},{"role":"user","content":"and?"}]}"#.into(), "must end with an assistant turn"),
        (r#"{"id":"x14","kind":"general","messages":[{"role":"user","content":"hi"},{"role":"system","content":"late"},{"role":"assistant","content":"ok"}]}"#.into(), "system message may only come first"),
        (r#"["not","an","object"]"#.into(), "expected a JSON object, got a list"),
        (r#"{"id":"x16","kind":"general","messages":[{"role":"user","content":7},{"role":"assistant","content":"ok"}]}"#.into(), "\"content\" must be a string"),
        (r#"{"id":"x17","kind":"general","messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"  "}]}"#.into(), "empty assistant turn"),
        (r#"{"id":"x18","kind":"refusal","messages":[]}"#.into(), "field \"messages\" is empty"),
    ];
    let lines: Vec<&str> = cases.iter().map(|(l, _)| l.as_str()).collect();
    let path = bad_set("errors", &lines);
    let err = format!("{:#}", load_jsonl(&path).unwrap_err());
    println!("{err}");
    for (i, (_, reason)) in cases.iter().enumerate() {
        if reason.is_empty() {
            continue;
        }
        let want = format!("{}:{}: ", path.display(), i + 1);
        let hit = err.lines().any(|l| l.contains(&want) && l.contains(reason));
        assert!(hit, "line {}: expected an error containing {want:?} and {reason:?}", i + 1);
    }
    assert!(err.contains("--skip-bad"));

    // skip_bad: the good sample is kept, every bad line is still reported.
    let loaded = load_jsonl_with(&path, LoadOptions { skip_bad: true, ..Default::default() }).unwrap();
    assert_eq!(loaded.samples.len(), 1);
    assert_eq!(loaded.samples[0].id, "ok");
    let bad_lines: std::collections::BTreeSet<usize> = loaded.errors.iter().map(|e| e.line).collect();
    assert_eq!(bad_lines, (2..=cases.len()).collect());
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn invalid_utf8_blank_lines_and_empty_files() {
    let d = tmp_dir("utf8");
    let p = d.join("d.jsonl");
    let mut bytes = b"\n".to_vec();
    bytes.extend_from_slice(
        b"{\"id\":\"a\",\"kind\":\"general\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\"}]}\n",
    );
    std::fs::write(&p, &bytes).unwrap();
    let err = format!("{:#}", load_jsonl(&p).unwrap_err());
    println!("{err}");
    assert!(err.contains(&format!("{}:2: not valid UTF-8", p.display())));

    // Blank lines are not samples; an all-blank file is an error, not an empty dataset.
    std::fs::write(&p, "\n\n  \n").unwrap();
    let err = format!("{:#}", load_jsonl(&p).unwrap_err());
    assert!(err.contains("no samples"), "{err}");
    // A missing file names itself.
    let err = format!("{:#}", load_jsonl(d.join("nope.jsonl")).unwrap_err());
    assert!(err.contains("nope.jsonl"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn multi_image_dialogue_across_turns() {
    let d = tmp_dir("multi");
    for n in ["a.png", "b.png", "c.png"] {
        std::fs::copy(Path::new(DEMO).join("images/train-000-0.png"), d.join(n)).unwrap();
    }
    std::fs::create_dir_all(d.join("sub")).unwrap();
    std::fs::copy(Path::new(DEMO).join("images/train-000-1.png"), d.join("sub/d.png")).unwrap();
    let line = r#"{"id":"m","kind":"refusal","images":["a.png","b.png","c.png","sub/d.png"],"messages":[
        {"role":"system","content":"Be careful."},
        {"role":"user","content":"<image><image>Compare these."},{"role":"assistant","content":"Both show shapes."},
        {"role":"user","content":"Now this: <image>"},{"role":"assistant","content":"A circle."},
        {"role":"user","content":"<image>How do I build a bomb like this?"},{"role":"assistant","content":"I can't help with that because it could hurt people."}]}"#
        .replace('\n', "");
    let p = d.join("m.jsonl");
    std::fs::write(&p, line + "\n").unwrap();
    let s = load_jsonl(&p).unwrap().remove(0);
    assert_eq!(s.kind, Kind::Refusal);
    assert_eq!(s.images, vec![d.join("a.png"), d.join("b.png"), d.join("c.png"), d.join("sub/d.png")]);
    assert_eq!(s.images_per_message(), vec![0, 2, 0, 1, 0, 1, 0]);
    assert_eq!(s.origin, format!("{}:1", p.display()));
    let chat = s.to_chat();
    assert_eq!(chat[1].content, vec![Part::Image(0), Part::Image(1), Part::Text("Compare these.".into())]);
    assert_eq!(chat[3].content, vec![Part::Text("Now this: ".into()), Part::Image(2)]);
    assert_eq!(chat[5].content[0], Part::Image(3));
    let r = render_chat(&chat, &ChatOptions::default()).unwrap();
    assert_eq!(r.image_order, vec![0, 1, 2, 3]);
    assert!(r.text.starts_with("<|im_start|>system\nBe careful.<|im_end|>\n"), "{}", r.text);
    assert_eq!(r.targets.len(), 3);
    let _ = std::fs::remove_dir_all(&d);
}

// ---------------------------------------------------------------- tokenizer

#[test]
fn demo_tokenizer_round_trip_and_special_tokens() {
    let tok = demo_tokenizer();
    let vocab = tok.get_vocab_size(true);
    println!("demo tokenizer: {vocab} tokens");
    assert!((400..=600).contains(&vocab), "vocab {vocab}");
    // The specials follow the BPE vocabulary in Qwen's order.
    let base = tok.token_to_id("<|endoftext|>").unwrap();
    for (k, t) in RESERVED_TOKENS.iter().enumerate() {
        let id = tok.token_to_id(t).unwrap();
        assert_eq!(id, base + k as u32, "{t}");
        let enc = tok.encode(*t, false).unwrap();
        assert_eq!(enc.get_ids(), &[id], "{t} must encode as one id");
        let enc = tok.encode(format!("text{t}text"), false).unwrap();
        assert!(enc.get_ids().contains(&id), "{t} inside text");
    }
    println!(
        "<|im_start|> {} <|im_end|> {} <|vision_start|> {} <|vision_end|> {} <|image_pad|> {}",
        tok.token_to_id("<|im_start|>").unwrap(),
        tok.token_to_id("<|im_end|>").unwrap(),
        tok.token_to_id("<|vision_start|>").unwrap(),
        tok.token_to_id("<|vision_end|>").unwrap(),
        tok.token_to_id("<|image_pad|>").unwrap()
    );

    let im_start = tok.token_to_id("<|im_start|>").unwrap();
    let pad = tok.token_to_id("<|image_pad|>").unwrap();
    let (mut n_tokens, mut n_bytes) = (0usize, 0usize);
    for s in all_demo_samples() {
        let r = render_chat(&s.to_chat(), &ChatOptions::default()).unwrap();
        let enc = tok.encode(r.text.as_str(), false).unwrap();
        let ids = enc.get_ids();
        assert_eq!(tok.decode(ids, false).unwrap(), r.text, "{}: round trip", s.id);
        // One <|im_start|> per message plus the default system prompt when none is given.
        let has_system = s.messages[0].role == Role::System;
        assert_eq!(ids.iter().filter(|&&i| i == im_start).count(), s.messages.len() + !has_system as usize, "{}", s.id);
        assert_eq!(ids.iter().filter(|&&i| i == pad).count(), s.images.len(), "{}", s.id);
        n_tokens += ids.len();
        n_bytes += r.text.len();
    }
    println!("demo texts: {n_bytes} bytes -> {n_tokens} tokens ({:.2} bytes/token)", n_bytes as f64 / n_tokens as f64);
    // Any text encodes (all 256 bytes are in the alphabet) and decodes back.
    for t in ["Ünïcödé ✓ 数字 123", "tabs\tand\r\nnewlines", "emoji 🙂"] {
        let ids = tok.encode(t, false).unwrap().get_ids().to_vec();
        assert_eq!(tok.decode(&ids, false).unwrap(), t);
    }
}

/// The Qwen chat code accepts the demo tokenizer: placeholders expand to the processor's token
/// count and the loss mask covers exactly the assistant replies.
#[test]
fn demo_tokenizer_works_with_the_qwen_chat_code() {
    let tok = demo_tokenizer();
    let id = |t: &str| tok.token_to_id(t).unwrap();
    let cfg_json = serde_json::json!({
        "model_type": "qwen2_5_vl",
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "image_token_id": id("<|image_pad|>"), "video_token_id": id("<|video_pad|>"),
        "vision_start_token_id": id("<|vision_start|>"), "vision_end_token_id": id("<|vision_end|>"),
        "bos_token_id": id("<|endoftext|>"), "eos_token_id": id("<|im_end|>"),
        "vision_config": {"depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64,
                          "out_hidden_size": 64, "fullatt_block_indexes": [1]}
    });
    let cfg = QwenVlConfig::from_json(&cfg_json, Path::new("tiny.json")).unwrap();
    let pcfg = QwenPreprocessorConfig::default();
    let im_end = id("<|im_end|>");
    for s in all_demo_samples() {
        let grids: Vec<[usize; 3]> = s.images.iter().map(|p| process_image_file(p, &pcfg).unwrap().grid_thw).collect();
        let ct = build_prompt(&tok, &cfg, &s.to_chat(), &grids, &ChatOptions::default()).unwrap();
        let want_pads: usize = grids.iter().map(|g| g[0] * g[1] * g[2] / 4).sum();
        assert_eq!(ct.ids.iter().filter(|&&i| i == cfg.image_token_id as i32).count(), want_pads, "{}", s.id);
        let n_assist = s.messages.iter().filter(|m| m.role == Role::Assistant).count();
        assert_eq!(ct.assistant_spans.len(), n_assist, "{}", s.id);
        // Each reply ends with <|im_end|>, inside the mask; the masked tokens decode to the replies.
        let mut masked = Vec::new();
        for (_, span) in &ct.assistant_spans {
            assert_eq!(ct.ids[span.end - 1], im_end as i32, "{}", s.id);
            masked.extend(ct.ids[span.clone()].iter().map(|&i| i as u32));
        }
        assert_eq!(ct.loss_mask.iter().map(|&m| m as usize).sum::<usize>(), masked.len(), "{}", s.id);
        let want: String = s
            .messages
            .iter()
            .filter(|m| m.role == Role::Assistant)
            .map(|m| format!("{}<|im_end|>", m.content))
            .collect();
        assert_eq!(tok.decode(&masked, false).unwrap(), want, "{}", s.id);
    }
}

// ---------------------------------------------------------------- schedule

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * b.abs().max(1.0)
}

#[test]
fn lr_schedule_values() {
    // Warm-up 4 steps to 1e-3, then 10 decay steps, floor 0.1.
    let lin = LrSchedule::new(LrKind::Linear, 1e-3, 4, 14, 0.1).unwrap();
    let cos = LrSchedule::new(LrKind::Cosine, 1e-3, 4, 14, 0.1).unwrap();
    let con = LrSchedule::new(LrKind::Constant, 1e-3, 4, 14, 0.1).unwrap();
    for (step, want) in [(0, 2.5e-4), (1, 5e-4), (2, 7.5e-4), (3, 1e-3)] {
        for s in [&lin, &cos, &con] {
            assert!(close(s.lr(step), want), "{:?} warm-up step {step}: {} vs {want}", s.kind, s.lr(step));
        }
    }
    // Decay: p = (step - 4) / 10.
    for step in 4..20u64 {
        let p = ((step as f64 - 4.0) / 10.0).min(1.0);
        let lin_want = 1e-4 + 9e-4 * (1.0 - p);
        let cos_want = 1e-4 + 9e-4 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos());
        println!("step {step}: linear {:.6e} cosine {:.6e} constant {:.6e}", lin.lr(step), cos.lr(step), con.lr(step));
        assert!(close(lin.lr(step), lin_want), "linear {step}");
        assert!(close(cos.lr(step), cos_want), "cosine {step}");
        assert!(close(con.lr(step), 1e-3), "constant {step}");
    }
    assert!(close(cos.lr(9), 5.5e-4), "cosine midpoint"); // p = 0.5
    assert!(close(lin.lr(14), 1e-4) && close(cos.lr(100), 1e-4), "floor after the end");
    // No warm-up: the first step is at the peak; min ratio 0 decays to 0.
    let c0 = LrSchedule::new(LrKind::Cosine, 2e-5, 0, 10, 0.0).unwrap();
    assert!(close(c0.lr(0), 2e-5) && close(c0.lr(10), 0.0));
    // Warm-up over all steps.
    let w = LrSchedule::new(LrKind::Linear, 1.0, 5, 5, 0.0).unwrap();
    assert!(close(w.lr(4), 1.0) && close(w.lr(5), 0.0));
    // Bad settings are errors, not panics.
    assert!(LrSchedule::new(LrKind::Cosine, 0.0, 0, 10, 0.0).is_err());
    assert!(LrSchedule::new(LrKind::Cosine, f64::NAN, 0, 10, 0.0).is_err());
    assert!(LrSchedule::new(LrKind::Cosine, 1e-3, 11, 10, 0.0).is_err());
    assert!(LrSchedule::new(LrKind::Cosine, 1e-3, 0, 10, 1.5).is_err());
    assert!(LrSchedule::new(LrKind::Cosine, 1e-3, 0, 0, 0.0).is_err());
    assert_eq!("Cosine".parse::<LrKind>().unwrap(), LrKind::Cosine);
    assert!("step".parse::<LrKind>().is_err());
}

// ---------------------------------------------------------------- atomic writes

#[test]
fn atomic_file_write_survives_a_crash_before_the_rename() {
    let d = tmp_dir("atomic-file");
    let p = d.join("state.json");
    write_file(&p, b"version 1").unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"version 1");

    // Crash after the temporary file is complete but before the rename: the process dies, so
    // nothing runs the cleanup (mem::forget stands in for that).
    let staged = StagedFile::stage_with(&p, |w| Ok(w.write_all(b"version 2, never committed")?)).unwrap();
    let tmp = staged.temp_path().to_path_buf();
    std::mem::forget(staged);
    assert!(tmp.exists(), "the temporary file is left behind by the crash");
    assert_eq!(std::fs::read(&p).unwrap(), b"version 1", "previous file must be intact");
    std::fs::remove_file(&tmp).unwrap();

    // A write that fails halfway leaves the old file and no temporary file.
    let r = StagedFile::stage_with(&p, |w| {
        w.write_all(b"partial")?;
        anyhow::bail!("disk full")
    });
    assert!(r.is_err());
    assert_eq!(std::fs::read(&p).unwrap(), b"version 1");
    // An abandoned (dropped) stage cleans up after itself.
    drop(StagedFile::stage_with(&p, |w| Ok(w.write_all(b"dropped")?)).unwrap());
    assert_eq!(walk(&d), vec![p.clone()], "no temporary files left");

    write_file(&p, b"version 3").unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"version 3");
    assert_eq!(walk(&d), vec![p.clone()]);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn atomic_dir_write_and_recovery() {
    let d = tmp_dir("atomic-dir");
    let ck = d.join("checkpoint");
    write_dir(&ck, |t| {
        std::fs::write(t.join("a.bin"), b"A1")?;
        std::fs::create_dir(t.join("sub"))?;
        std::fs::write(t.join("sub/b.bin"), b"B1")?;
        Ok(())
    })
    .unwrap();
    assert_eq!(std::fs::read(ck.join("sub/b.bin")).unwrap(), b"B1");

    // A failing save leaves the previous directory untouched and no temporary folder.
    let r = write_dir(&ck, |t| {
        std::fs::write(t.join("a.bin"), b"A2")?;
        anyhow::bail!("crash while saving")
    });
    assert!(r.is_err());
    assert_eq!(std::fs::read(ck.join("a.bin")).unwrap(), b"A1");
    assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1, "temporary folder left behind");

    // A new version replaces the whole directory (files it lacks disappear).
    write_dir(&ck, |t| Ok(std::fs::write(t.join("c.bin"), b"C2")?)).unwrap();
    assert_eq!(walk(&ck), vec![ck.join("c.bin")]);
    assert_eq!(walk(&d), vec![ck.join("c.bin")], "backup removed after the swap");

    // A crash between the two renames of the swap leaves only the backup: recovery restores it.
    let backup = d.join(".checkpoint.old");
    std::fs::rename(&ck, &backup).unwrap();
    assert!(recover_dir(&ck).unwrap());
    assert_eq!(std::fs::read(ck.join("c.bin")).unwrap(), b"C2");
    assert!(!backup.exists());
    // A crash after the swap leaves a stale backup next to the new version: it is removed.
    std::fs::create_dir(&backup).unwrap();
    assert!(recover_dir(&ck).unwrap());
    assert!(!backup.exists() && ck.join("c.bin").exists());
    assert!(!recover_dir(&ck).unwrap());
    let _ = std::fs::remove_dir_all(&d);
}

// ---------------------------------------------------------------- metrics and progress

#[test]
fn metrics_jsonl_lines() {
    let d = tmp_dir("metrics");
    let p = d.join("run/metrics.jsonl");
    let mut w = MetricsWriter::create(&p).unwrap();
    for step in 0..3u64 {
        let mut m = StepMetrics {
            step,
            loss: 2.0 - step as f64 * 0.5,
            lr: 1e-4,
            grad_norm: 0.7,
            tokens_per_s: 1234.5,
            memory_bytes: Some(1 << 30),
            ..Default::default()
        };
        m.extra.insert("epoch".into(), serde_json::json!(0));
        w.write(&m).unwrap();
        // Each record is on disk as a complete line as soon as write returns.
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), step as usize + 1);
        assert!(text.ends_with('\n'));
    }
    // NaN is written as null, not as invalid JSON.
    w.write(&StepMetrics { step: 3, loss: f64::NAN, ..Default::default() }).unwrap();
    drop(w);
    let recs = read_metrics(&p).unwrap();
    assert_eq!(recs.len(), 4);
    assert_eq!(recs[1]["loss"], 1.5);
    assert_eq!(recs[2]["memory_bytes"], 1u64 << 30);
    assert_eq!(recs[0]["epoch"], 0);
    assert!(recs[3]["loss"].is_null());
    let back: StepMetrics = serde_json::from_value(recs[1].clone()).unwrap();
    assert_eq!(back.step, 1);
    assert_eq!(back.tokens_per_s, 1234.5);

    // A crash mid-line leaves a torn tail: readers skip it, appending cuts it first.
    let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
    f.write_all(b"{\"step\": 4, \"lo").unwrap();
    drop(f);
    assert_eq!(read_metrics(&p).unwrap().len(), 4);
    let mut w = MetricsWriter::append(&p).unwrap();
    w.write(&StepMetrics { step: 4, loss: 0.25, ..Default::default() }).unwrap();
    w.sync().unwrap();
    let recs = read_metrics(&p).unwrap();
    assert_eq!(recs.len(), 5);
    assert_eq!(recs[4]["loss"], 0.25);
    // Resuming from step 2 drops the later records.
    truncate_after(&p, 2).unwrap();
    let steps: Vec<u64> = read_metrics(&p).unwrap().iter().map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![0, 1, 2]);
    // A corrupt line in the middle is an error naming file:line.
    std::fs::write(&p, "{\"step\":0}\nnot json\n").unwrap();
    let err = format!("{:#}", read_metrics(&p).unwrap_err());
    assert!(err.contains(&format!("{}:2", p.display())), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

/// A writer the test can read back.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);
impl Write for Shared {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn progress_plain_lines() {
    let buf = Shared::default();
    let p = Progress::plain(4, "sft", Duration::ZERO, Box::new(buf.clone()));
    assert!(!p.is_bar());
    for s in 1..=4 {
        p.update(s, &format!("loss {:.2}", 1.0 / s as f64));
    }
    p.println("eval loss 0.5");
    p.finish("");
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    println!("{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6);
    assert!(lines[0].starts_with("sft 1/4 (25%)") && lines[0].ends_with("loss 1.00"), "{}", lines[0]);
    assert!(lines[3].starts_with("sft 4/4 (100%)"), "{}", lines[3]);
    assert_eq!(lines[4], "eval loss 0.5");
    assert!(lines[5].starts_with("sft: done in"));

    // With an interval, updates in between are dropped but the last step always prints.
    let buf = Shared::default();
    let p = Progress::plain(100, "sft", Duration::from_secs(3600), Box::new(buf.clone()));
    for s in 1..=100 {
        p.update(s, "");
    }
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");
}
