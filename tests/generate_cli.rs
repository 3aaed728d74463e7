//! `am3 generate` on the embedded tiny model and on both fixture checkpoints (given a
//! tokenizer with their special ids): the output is one valid JSON line per rollout with every
//! user turn answered; a bad data line or a missing image is an error naming the file (and line).
#[path = "support/fixture_tokenizers.rs"]
mod fixture_tokenizers;

use std::path::{Path, PathBuf};
use std::process::Command;

fn am3() -> PathBuf {
    std::env::var("AM3_BIN").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from(env!("CARGO_BIN_EXE_am3")))
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("am3-generate-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fixture(model: &str) -> PathBuf {
    am3safety::check::fixture_dir(model)
}

fn demo_image(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/demo/images").join(name).display().to_string()
}

/// Two dialogues: one with an image in each of two turns, one text-only single turn.
fn data(dir: &Path) -> PathBuf {
    let imgs = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/demo/images"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".png"))
        .take(2)
        .collect::<Vec<_>>();
    let lines = [
        serde_json::json!({"id": "a", "kind": "general", "images": [demo_image(&imgs[0]), demo_image(&imgs[1])],
            "messages": [{"role": "user", "content": "<image>What is this?"}, {"role": "user", "content": "<image>And this one?"}]}),
        serde_json::json!({"id": "b", "kind": "general", "messages": [{"role": "user", "content": "Say hello."}]}),
    ];
    let p = dir.join("data.jsonl");
    std::fs::write(&p, lines.iter().map(|l| l.to_string() + "\n").collect::<String>()).unwrap();
    p
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(am3()).args(args).env("AM3_FORCE_CPU", "1").output().unwrap()
}

fn check_output(out: &Path, n: usize) {
    let text = std::fs::read_to_string(out).unwrap();
    let rows: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2 * n, "{text}");
    for r in &rows {
        let want = if r["id"] == "a" { 2 } else { 1 };
        let turns = r["turns"].as_array().unwrap();
        assert_eq!(turns.len(), want, "{r}");
        for t in turns {
            assert!(
                !t["ids"].as_array().unwrap().is_empty()
                    && t["text"].is_string()
                    && t["end"].as_u64() > t["start"].as_u64(),
                "{t}"
            );
        }
    }
}

/// A fixture checkpoint with a tokenizer.json beside it (links to the fixture's files).
fn with_tokenizer(model: &str, tok: tokenizers::Tokenizer) -> PathBuf {
    let src = fixture(model);
    let dir = tmp(model);
    for f in ["config.json", "model.safetensors", "preprocessor_config.json", "generation_config.json"] {
        std::os::unix::fs::symlink(src.join(f), dir.join(f)).unwrap();
    }
    tok.save(dir.join("tokenizer.json"), false).unwrap();
    dir
}

#[test]
fn generate_on_the_tiny_default_and_both_fixtures() {
    let dir = tmp("runs");
    let d = data(&dir);
    let out = dir.join("tiny.jsonl");
    let o = run(&[
        "generate",
        "--data",
        d.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--n",
        "2",
        "--max-new-tokens",
        "6",
        "--seed",
        "1",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("tok/s"));
    check_output(&out, 2);
    let qcfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("qwen2_5_vl_tiny").join("config.json")).unwrap())
            .unwrap();
    for (name, tok) in [
        ("qwen2_5_vl_tiny", fixture_tokenizers::qwen_fixture_tokenizer(&qcfg)),
        ("llava_next_tiny", fixture_tokenizers::llava_fixture_tokenizer()),
    ] {
        let m = with_tokenizer(name, tok);
        let out = dir.join(format!("{name}.jsonl"));
        let o = run(&[
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--data",
            d.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--greedy",
            "--max-new-tokens",
            "5",
        ]);
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        check_output(&out, 1);
    }
    // One prompt, no data file.
    let o = run(&[
        "generate",
        "--prompt",
        "What shapes are there?",
        "--image",
        &demo_image(
            &std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/demo/images"))
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
                .file_name()
                .to_string_lossy(),
        ),
        "--max-new-tokens",
        "4",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn bad_line_and_missing_image_name_the_file() {
    let dir = tmp("bad");
    let d = data(&dir);
    let mut text = std::fs::read_to_string(&d).unwrap();
    text.push_str(
        "{\"id\": \"c\", \"kind\": \"general\", \"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}\n",
    );
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, text).unwrap();
    let o = run(&["generate", "--data", bad.to_str().unwrap(), "--out", dir.join("o.jsonl").to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("bad.jsonl:3"), "{err}");
    let gone = dir.join("gone.jsonl");
    std::fs::write(&gone, "{\"id\": \"g\", \"kind\": \"general\", \"images\": [\"nowhere.png\"], \"messages\": [{\"role\": \"user\", \"content\": \"<image>What?\"}]}\n").unwrap();
    let o = run(&["generate", "--data", gone.to_str().unwrap(), "--out", dir.join("o.jsonl").to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("gone.jsonl:1") && err.contains("nowhere.png"), "{err}");
    assert!(!dir.join("o.jsonl").exists(), "no output on error");
}
