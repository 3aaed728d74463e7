//! `am3 forward` on the Qwen2.5-VL fixture: the file it writes matches transformers' reference
//! (logits, token log-probs, objective, position ids, gradients), and bad inputs are errors.
mod common;
use am3safety::checkpoint::read_tensor_file;
use common::*;
use std::process::Command;

fn am3(args: &[&str]) -> std::process::Output {
    Command::new(am3_bin()).args(args).output().unwrap()
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

#[test]
fn forward_cli_matches_reference() {
    let fx = fixture_dir("qwen2_5_vl_tiny");
    let out = std::env::temp_dir().join(format!("am3-fwd-{}.safetensors", std::process::id()));
    let o = am3(&["forward", "--device", "cpu", "--grads", "--model", fx.to_str().unwrap(), "--inputs", fx.join("inputs.safetensors").to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "am3 forward failed: {}", String::from_utf8_lossy(&o.stderr));
    let got = read_tensor_file(&out).unwrap();
    let want = read_tensor_file(fx.join("reference.safetensors")).unwrap();
    for (name, tol) in [("logits", 1e-4), ("token_logprobs", 1e-4), ("objective", 1e-5)] {
        assert_eq!(got[name].0, want[name].0, "{name} shape");
        let e = rel_err(&f32s(&got[name].1), &f32s(&want[name].1));
        println!("am3 forward {name}: rel err {e:.2e}");
        assert!(e <= tol, "{name}: rel err {e:.2e} > {tol:.0e}");
    }
    assert_eq!(got["position_ids"].1, want["position_ids"].1, "position ids differ");
    let grads = read_tensor_file(fx.join("grads.safetensors")).unwrap();
    let mut worst = 0f64;
    for (name, (shape, g)) in &grads {
        let (gs, gv) = got.get(name).unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_eq!(gs, shape, "{name} shape");
        worst = worst.max(rel_err(&f32s(gv), &f32s(g)));
    }
    println!("am3 forward grads: {} tensors, worst rel err {worst:.2e}", grads.len());
    assert!(worst <= 1e-3);
}

#[test]
fn forward_cli_reports_bad_inputs() {
    let fx = fixture_dir("qwen2_5_vl_tiny");
    let o = am3(&["forward", "--device", "cpu", "--model", fx.to_str().unwrap(), "--inputs", "/nonexistent/in.safetensors", "--out", "/tmp/x.safetensors"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("/nonexistent/in.safetensors"), "error does not name the file: {err}");
    // The reference file has no input_ids.
    let o = am3(&["forward", "--device", "cpu", "--model", fx.to_str().unwrap(), "--inputs", fx.join("reference.safetensors").to_str().unwrap(), "--out", "/tmp/x.safetensors"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("input_ids"), "{err}");
}
