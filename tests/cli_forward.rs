//! `am3 forward` on the Qwen2.5-VL fixture: the file it writes matches transformers' reference
//! (logits, token log-probs, objective, position ids, gradients), bad inputs are errors naming
//! the tensor (fractional, NaN or BOOL ids and grids, negative grids, NaN pixels, NaN weights),
//! and `--out` never replaces an input or a file of the model.
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
    let o = am3(&[
        "forward",
        "--device",
        "cpu",
        "--grads",
        "--model",
        fx.to_str().unwrap(),
        "--inputs",
        fx.join("inputs.safetensors").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "am3 forward failed: {}", String::from_utf8_lossy(&o.stderr));
    let got = read_tensor_file(&out).unwrap();
    let want = read_tensor_file(fx.join("reference.safetensors")).unwrap();
    for (name, tol) in [
        ("logits", Tol::FixtureLogits.value()),
        ("token_logprobs", Tol::FixtureLogits.value()),
        ("objective", Tol::FixtureObjective.value()),
    ] {
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
    assert_err("worst gradient", worst, Tol::FixtureGrads);
}

#[test]
fn forward_cli_reports_bad_inputs() {
    let fx = fixture_dir("qwen2_5_vl_tiny");
    let o = am3(&[
        "forward",
        "--device",
        "cpu",
        "--model",
        fx.to_str().unwrap(),
        "--inputs",
        "/nonexistent/in.safetensors",
        "--out",
        "/tmp/x.safetensors",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("/nonexistent/in.safetensors"), "error does not name the file: {err}");
    // The reference file has no input_ids.
    let o = am3(&[
        "forward",
        "--device",
        "cpu",
        "--model",
        fx.to_str().unwrap(),
        "--inputs",
        fx.join("reference.safetensors").to_str().unwrap(),
        "--out",
        "/tmp/x.safetensors",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("input_ids"), "{err}");
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("am3-fwd-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A writable copy of the Qwen fixture directory.
fn fixture_copy(name: &str) -> std::path::PathBuf {
    let fx = fixture_dir("qwen2_5_vl_tiny");
    let d = tmp(name);
    std::fs::create_dir_all(&d).unwrap();
    for e in std::fs::read_dir(&fx).unwrap() {
        let p = e.unwrap().path();
        let dst = d.join(p.file_name().unwrap());
        std::fs::copy(&p, &dst).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    d
}

fn run_forward(model: &std::path::Path, inputs: &std::path::Path, out: &std::path::Path) -> (bool, String) {
    let o = Command::new(am3_bin())
        .args(["forward", "--device", "cpu", "--model"])
        .arg(model)
        .arg("--inputs")
        .arg(inputs)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn forward_cli_never_overwrites_an_input_or_the_model() {
    let d = fixture_copy("guard");
    let inputs = d.join("inputs.safetensors");
    let before: Vec<(std::path::PathBuf, Vec<u8>)> = ["model.safetensors", "inputs.safetensors", "config.json"]
        .iter()
        .map(|f| (d.join(f), std::fs::read(d.join(f)).unwrap()))
        .collect();
    for out in [
        d.join("model.safetensors"),
        inputs.clone(),
        d.join("config.json"),
        d.join("fresh.safetensors"),
        d.join("./sub/../model.safetensors"),
    ] {
        let (ok, err) = run_forward(&d, &inputs, &out);
        println!("--out {}: {err}", out.display());
        assert!(!ok && err.contains("--out") && err.contains("refusing"), "{}: {err}", out.display());
        assert!(!d.join("fresh.safetensors").exists());
    }
    for (p, b) in &before {
        assert_eq!(&std::fs::read(p).unwrap(), b, "{} changed", p.display());
    }
    // Elsewhere is fine.
    let out = tmp("guard-out.safetensors");
    let (ok, err) = run_forward(&d, &inputs, &out);
    assert!(ok, "{err}");
    let _ = std::fs::remove_dir_all(&d);
    let _ = std::fs::remove_file(&out);
}

/// Raw little-endian bytes of `v` in `dt`.
fn encode(dt: safetensors::Dtype, v: &[f64]) -> Vec<u8> {
    use safetensors::Dtype as D;
    match dt {
        D::F32 => v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect(),
        D::F64 => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
        D::I64 => v.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect(),
        D::BOOL => v.iter().map(|&x| (x != 0.0) as u8).collect(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn forward_cli_checks_every_input_value_and_weight() {
    use safetensors::Dtype as D;
    let fx = fixture_dir("qwen2_5_vl_tiny");
    let base = read_tensor_file(fx.join("inputs.safetensors")).unwrap();
    let d = tmp("values");
    std::fs::create_dir_all(&d).unwrap();
    let (inp, out) = (d.join("in.safetensors"), d.join("out.safetensors"));
    // Each case: the tensor to change, its dtype, an edit, and what the error must say.
    type Edit = fn(&mut Vec<f64>);
    let cases: Vec<(&str, D, Edit, &[&str])> = vec![
        ("input_ids", D::F32, |v| v[5] += 0.5, &["`input_ids`", ".5 at [0, 5]", "whole number"]),
        ("input_ids", D::F64, |v| v[7] = f64::NAN, &["`input_ids`", "NaN at [0, 7]"]),
        ("input_ids", D::BOOL, |_| {}, &["`input_ids`", "BOOL"]),
        ("input_ids", D::I64, |v| v[3] = -4.0, &["`input_ids`", "-4 at [0, 3]", "negative"]),
        ("image_grid_thw", D::F32, |v| v[4] = 2.5, &["`image_grid_thw`", "2.5 at [1, 1]"]),
        ("image_grid_thw", D::I64, |v| v[2] = -2.0, &["`image_grid_thw`", "-2 at [0, 2]"]),
        ("image_grid_thw", D::BOOL, |_| {}, &["`image_grid_thw`", "BOOL"]),
        ("pixel_values", D::F32, |v| v[1000] = f64::NAN, &["`pixel_values`", "NaN at [0, 1000]"]),
        ("pixel_values", D::F64, |v| v[1176] = 1e300, &["`pixel_values`", "at [1, 0]", "finite"]),
        ("loss_mask", D::F32, |v| v[9] = f64::INFINITY, &["`loss_mask`", "inf at [0, 9]"]),
    ];
    for (name, dt, edit, want) in cases {
        let mut bytes: Vec<(String, D, Vec<usize>, Vec<u8>)> = Vec::new();
        for (k, (shape, v)) in &base {
            let mut v = v.clone();
            let mut t = if k.as_str() == "pixel_values" { D::F32 } else { D::I64 };
            if k.as_str() == name {
                edit(&mut v);
                t = dt;
            }
            bytes.push((k.clone(), t, shape.clone(), encode(t, &v)));
        }
        let views: std::collections::BTreeMap<String, safetensors::tensor::TensorView> = bytes
            .iter()
            .map(|(k, t, s, b)| (k.clone(), safetensors::tensor::TensorView::new(*t, s.clone(), b).unwrap()))
            .collect();
        std::fs::write(&inp, safetensors::serialize(&views, None).unwrap()).unwrap();
        let (ok, err) = run_forward(&fx, &inp, &out);
        println!("{name} as {dt:?}: {}", err.trim());
        assert!(!ok, "{name} as {dt:?} was accepted");
        for w in want {
            assert!(err.contains(w), "{name} as {dt:?}: want {w:?} in: {err}");
        }
    }
    // A NaN weight is an error naming the tensor, not NaN logits.
    let m = fixture_copy("nan-weight");
    let path = m.join("model.safetensors");
    let mut b = std::fs::read(&path).unwrap();
    let h = am3safety::checkpoint::safetensors_io::parse_header(&b, &path).unwrap();
    let t = h.tensors.iter().find(|t| t.name.contains("layers.0.mlp.up_proj.weight")).expect("an up_proj weight");
    assert_eq!(t.dtype, am3safety::checkpoint::StDtype::F32);
    b[t.start + 8..t.start + 12].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&path, &b).unwrap();
    let (ok, err) = run_forward(&m, &m.join("inputs.safetensors"), &out);
    println!("NaN weight: {}", err.trim());
    assert!(!ok && err.contains(&t.name) && err.contains("NaN at element 2"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
    let _ = std::fs::remove_dir_all(&m);
}
