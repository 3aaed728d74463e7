//! Qwen2.5-VL checkpoints: loading the fixture, errors naming the tensor and the file, sharded and
//! single-file saving round trips.
mod common;

use am3safety::checkpoint::{save_sharded, Checkpoint, SaveDtype, INDEX_FILE, SINGLE_FILE};
use serde_json::{json, Value};

#[path = "support/qwen_data.rs"]
mod qwen_data_support;
use qwen_data_support::*;

#[test]
fn checkpoint_loads_fixture() {
    let dir = fixtures();
    let ck = Checkpoint::open(&dir).unwrap();
    let reference = tensors(&dir.join("model.safetensors"));
    assert_eq!(ck.names().len(), reference.len());
    assert!(
        ck.has("model.embed_tokens.weight") && ck.has("visual.patch_embed.proj.weight") && ck.has("lm_head.weight")
    );
    for (name, (shape, vals)) in &reference {
        let got = ck.get_f32(name, shape).unwrap();
        assert!(got.iter().zip(vals).all(|(a, b)| *a as f64 == *b), "{name}");
    }
    assert_eq!(ck.shape("visual.patch_embed.proj.weight"), Some(&[32, 3, 2, 14, 14][..]));
    println!("checkpoint: {} tensors read back exactly", reference.len());
}

#[test]
fn checkpoint_errors_name_tensor_and_file() {
    let dir = fixtures();
    let ck = Checkpoint::open(&dir).unwrap();
    let file = dir.join("model.safetensors").display().to_string();

    let msg = err_text(ck.get_f32("model.layers.9.mlp.up_proj.weight", &[128, 64]));
    println!("missing: {msg}");
    assert!(
        msg.contains("`model.layers.9.mlp.up_proj.weight`")
            && msg.contains("not found")
            && msg.contains("model.safetensors")
    );

    let msg = err_text(ck.get_f32("model.embed_tokens.weight", &[64, 600]));
    println!("shape: {msg}");
    assert!(msg.contains("`model.embed_tokens.weight`") && msg.contains(&file) && msg.contains("[600, 64]"));

    // Truncated: the header promises more data than the file holds.
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let t = tmp_dir("ckpt_truncated");
    std::fs::write(t.join(SINGLE_FILE), &bytes[..bytes.len() - 1000]).unwrap();
    let msg = err_text(Checkpoint::open(&t));
    println!("truncated: {msg}");
    assert!(
        msg.contains("truncated")
            && msg.contains("tensor `")
            && msg.contains(&t.join(SINGLE_FILE).display().to_string())
    );

    // Truncated inside the header, and garbage.
    std::fs::write(t.join(SINGLE_FILE), &bytes[..100]).unwrap();
    let msg = err_text(Checkpoint::open(&t));
    println!("truncated header: {msg}");
    assert!(msg.contains("model.safetensors"));
    let mut junk = bytes.clone();
    for b in junk[8..40].iter_mut() {
        *b = b'#';
    }
    std::fs::write(t.join(SINGLE_FILE), &junk).unwrap();
    let msg = err_text(Checkpoint::open(&t));
    println!("corrupt header: {msg}");
    assert!(msg.contains("model.safetensors") && msg.contains("JSON"));

    // Unsupported dtype: the fixture inputs hold I64 tensors.
    std::fs::copy(dir.join("inputs.safetensors"), t.join(SINGLE_FILE)).unwrap();
    let ck = Checkpoint::open(&t).unwrap();
    let msg = err_text(ck.get_f32("input_ids", &[1, 86]));
    println!("dtype: {msg}");
    assert!(msg.contains("`input_ids`") && msg.contains("I64") && msg.contains("model.safetensors"));

    // Empty directory.
    let e = tmp_dir("ckpt_empty");
    let msg = err_text(Checkpoint::open(&e));
    assert!(msg.contains(INDEX_FILE), "{msg}");
    let _ = std::fs::remove_dir_all(&t);
    let _ = std::fs::remove_dir_all(&e);
}

#[test]
fn save_load_roundtrip_sharded_and_single() {
    let dir = fixtures();
    let reference = tensors(&dir.join("model.safetensors"));
    let mut names: Vec<&String> = reference.keys().collect();
    names.sort();
    let list: Vec<(String, Vec<usize>, Vec<f32>)> = names
        .iter()
        .map(|n| ((*n).clone(), reference[*n].0.clone(), reference[*n].1.iter().map(|&x| x as f32).collect()))
        .collect();
    let out = tmp_dir("save_roundtrip");

    // f32 in shards of at most 256 kB (the embedding and lm_head take 150 kB each).
    save_sharded(&out, &list, SaveDtype::F32, 256 << 10).unwrap();
    let shards: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    println!("sharded save wrote {shards:?}");
    assert!(out.join(INDEX_FILE).is_file() && !out.join(SINGLE_FILE).exists());
    let n_shards = shards.iter().filter(|s| s.starts_with("model-")).count();
    assert!(n_shards >= 3, "expected several shards, got {n_shards}");
    assert!(shards.iter().all(|s| !s.contains(".tmp")), "temporary files left behind");
    // Each shard is a valid safetensors file for the reference parser too.
    for s in shards.iter().filter(|s| s.starts_with("model-")) {
        let bytes = std::fs::read(out.join(s)).unwrap();
        safetensors::SafeTensors::deserialize(&bytes).unwrap();
    }
    let ck = Checkpoint::open(&out).unwrap();
    assert_eq!(ck.names().len(), list.len());
    for (n, s, v) in &list {
        assert_eq!(&ck.get_f32(n, s).unwrap(), v, "{n}");
    }

    // bf16 into one file over the sharded save: the index and shards are removed.
    save_sharded(&out, &list, SaveDtype::BF16, usize::MAX).unwrap();
    let left: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(left, vec![SINGLE_FILE.to_string()]);
    let ck = Checkpoint::open(&out).unwrap();
    let mut worst = 0f64;
    for (n, s, v) in &list {
        let got = ck.get_f32(n, s).unwrap();
        let want: Vec<f32> = v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
        assert_eq!(got, want, "{n}");
        let bf = ck.get_bf16(n, s).unwrap();
        assert!(bf.iter().zip(&want).all(|(a, b)| a.to_f32() == *b));
        worst = worst.max(common::max_abs(&got, v));
    }
    println!("bf16 save: rounding error max abs {worst:.2e}");

    // A broken index is reported with the tensor and the shard.
    save_sharded(&out, &list, SaveDtype::F32, 256 << 10).unwrap();
    let idx_path = out.join(INDEX_FILE);
    let mut idx: Value = serde_json::from_str(&std::fs::read_to_string(&idx_path).unwrap()).unwrap();
    idx["weight_map"]["model.norm.weight"] = json!("model-00001-of-00099.safetensors");
    std::fs::write(&idx_path, idx.to_string()).unwrap();
    let msg = err_text(Checkpoint::open(&out));
    println!("bad index: {msg}");
    assert!(msg.contains("model-00001-of-00099.safetensors"));
    let _ = std::fs::remove_dir_all(&out);
}
