//! RoPE: table builders vs f64 and hand-computed angles (1-D, M-RoPE, vision 2-D), M-RoPE vs a
//! literal transcription of transformers' split-by-`mrope_section * 2` rule, the fixture's
//! position ids, CPU forward vs the direct rotate_half formula, backward vs finite differences
//! (f64), and CUDA (bf16 and f32) vs the CPU for forward and backward.
mod common;
use am3safety::ops::rope::{self, cpu};
use am3safety::tensor::{DType, Device};
use common::*;

/// transformers' formula on a full head: out = x·cat(c, c) + rotate_half(x)·cat(s, s), with
/// rotate_half([x1, x2]) = [−x2, x1]. cos_full/sin_full are [tokens, D].
fn direct(x: &[f64], cos_full: &[f64], sin_full: &[f64], tokens: usize, heads: usize, d: usize) -> Vec<f64> {
    let half = d / 2;
    let mut out = vec![0.0; x.len()];
    for t in 0..tokens {
        for h in 0..heads {
            let o = (t * heads + h) * d;
            for j in 0..d {
                let rot = if j < half { -x[o + j + half] } else { x[o + j - half] };
                out[o + j] = x[o + j] * cos_full[t * d + j] + rot * sin_full[t * d + j];
            }
        }
    }
    out
}

/// cat(θ, θ) per token: [tokens, D/2] → [tokens, D].
fn dup(v: &[f64], tokens: usize, half: usize) -> Vec<f64> {
    (0..tokens)
        .flat_map(|t| {
            v[t * half..(t + 1) * half].iter().chain(&v[t * half..(t + 1) * half]).copied().collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn rope_cpu_fwd_matches_direct_formula() {
    let mut rng = Rng::new(20);
    for &(tokens, heads, d) in &[(1usize, 1usize, 2usize), (5, 3, 16), (4, 2, 10)] {
        let half = d / 2;
        // Tables straight from f64 angles (independent of the builders).
        let ang: Vec<f64> = (0..tokens * half).map(|_| rng.range(-10.0, 10.0)).collect();
        let (c, s): (Vec<f64>, Vec<f64>) = ang.iter().map(|a| (a.cos(), a.sin())).unzip();
        let x = probe(&mut rng, tokens * heads * d);
        let mut y = x.clone();
        cpu::fwd(&mut y, &c, &s, tokens, heads, d);
        let want = direct(&x, &dup(&c, tokens, half), &dup(&s, tokens, half), tokens, heads, d);
        let e = rel_err64(&y, &want);
        println!("rope cpu fwd vs direct [{tokens}x{heads}x{d}]: rel err {e:.2e}");
        assert!(e < 1e-14, "rel err {e:.2e}");
        // The backward is the inverse rotation: bwd(fwd(x)) = x.
        cpu::bwd(&mut y, &c, &s, tokens, heads, d);
        let e = rel_err64(&y, &x);
        println!("rope cpu bwd(fwd(x)) vs x [{tokens}x{heads}x{d}]: rel err {e:.2e}");
        assert!(e < 1e-14, "rel err {e:.2e}");
    }
}

#[test]
fn rope_cpu_gradcheck() {
    let mut rng = Rng::new(21);
    for &(tokens, heads, d) in &[(1usize, 1usize, 2usize), (3, 2, 6), (4, 3, 16)] {
        let half = d / 2;
        let ang: Vec<f64> = (0..tokens * half).map(|_| rng.range(-4.0, 4.0)).collect();
        let (c, s): (Vec<f64>, Vec<f64>) = ang.iter().map(|a| (a.cos(), a.sin())).unzip();
        let x = probe(&mut rng, tokens * heads * d);
        let g = probe(&mut rng, tokens * heads * d);
        let mut dx = g.clone();
        cpu::bwd(&mut dx, &c, &s, tokens, heads, d);
        println!("rope gradcheck [{tokens}x{heads}x{d}]");
        gradcheck(
            "rope dx",
            &x,
            &dx,
            &mut |xp| {
                let mut y = xp.to_vec();
                cpu::fwd(&mut y, &c, &s, tokens, heads, d);
                dot(&y, &g)
            },
            64,
            1e-6,
        );
    }
}

/// |table − f64 reference| within the f32 rounding of an angle of that size.
fn check_table(name: &str, got: &[f32], want: &[f64], angles: &[f64]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let mut worst = 0f64;
    for i in 0..got.len() {
        let tol = 4e-7 * (1.0 + angles[i].abs());
        let err = (got[i] as f64 - want[i]).abs();
        worst = worst.max(err / tol);
        assert!(err <= tol, "{name}[{i}]: {} vs {} (angle {}, err {err:.2e})", got[i], want[i], angles[i]);
    }
    println!("{name}: {} entries, worst err / tolerance {worst:.2}", got.len());
}

#[test]
fn rope_table_1d_matches_f64() {
    let (d, theta) = (128usize, 1e6f32);
    let pos: Vec<i32> = vec![0, 1, 2, 17, 100, 4095, 32767];
    let (c, s) = rope::table_1d(&pos, d, theta).unwrap();
    assert_eq!((c.len(), s.len()), (pos.len() * d / 2, pos.len() * d / 2));
    let ang: Vec<f64> = pos
        .iter()
        .flat_map(|&p| (0..d / 2).map(move |i| p as f64 / (theta as f64).powf(2.0 * i as f64 / d as f64)))
        .collect();
    check_table("table_1d cos", &c, &ang.iter().map(|a| a.cos()).collect::<Vec<_>>(), &ang);
    check_table("table_1d sin", &s, &ang.iter().map(|a| a.sin()).collect::<Vec<_>>(), &ang);
    // Position 0 is the identity rotation.
    assert!(c[..d / 2].iter().all(|&v| v == 1.0) && s[..d / 2].iter().all(|&v| v == 0.0));
    assert!(rope::table_1d(&pos, 7, theta).is_err(), "odd head_dim must be an error");
}

#[test]
fn rope_table_mrope_hand_computed() {
    // head_dim 8 → 4 frequencies 1/100^(i/4) = 1, 0.316.., 0.1, 0.0316..; sections [1, 1, 2]:
    // frequency 0 uses t, 1 uses h, 2 and 3 use w.
    let (d, theta, tokens) = (8usize, 100f32, 2usize);
    let pos3 = [3, 5, /* h */ 7, 11, /* w */ 13, 17];
    let (c, s) = rope::table_mrope(&pos3, tokens, d, theta, &[1, 1, 2]).unwrap();
    let inv = [1.0, 100f64.powf(-0.25), 0.1, 100f64.powf(-0.75)];
    let ang = [
        3.0 * inv[0],
        7.0 * inv[1],
        13.0 * inv[2],
        13.0 * inv[3],
        5.0 * inv[0],
        11.0 * inv[1],
        17.0 * inv[2],
        17.0 * inv[3],
    ];
    check_table("mrope hand cos", &c, &ang.map(f64::cos), &ang);
    check_table("mrope hand sin", &s, &ang.map(f64::sin), &ang);
    // Equal rows reduce M-RoPE to 1-D RoPE, bit for bit.
    let p: Vec<i32> = (0..9).map(|i| i * 7).collect();
    let p3: Vec<i32> = [p.clone(), p.clone(), p.clone()].concat();
    let (c3, s3) = rope::table_mrope(&p3, p.len(), 16, 1e6, &[2, 3, 3]).unwrap();
    let (c1, s1) = rope::table_1d(&p, 16, 1e6).unwrap();
    assert!(c3 == c1 && s3 == s1, "M-RoPE with equal t/h/w rows differs from 1-D RoPE");
    // Bad arguments.
    assert!(rope::table_mrope(&pos3, tokens, d, theta, &[1, 1, 1]).is_err(), "sections not summing to D/2");
    assert!(rope::table_mrope(&pos3, tokens, d, theta, &[2, 2]).is_err(), "two sections");
    assert!(rope::table_mrope(&pos3[..5], tokens, d, theta, &[1, 1, 2]).is_err(), "short pos3");
}

/// transformers' M-RoPE, transcribed literally: per axis a full [tokens, D] table cat(f, f) with
/// f = pos_axis · inv_freq; split the D dims into chunks `mrope_section * 2` and take chunk k
/// from axis k % 3. Rotating with it must equal rotating with table_mrope.
#[test]
fn rope_mrope_matches_transformers_split_rule() {
    let mut rng = Rng::new(22);
    let (tokens, heads, d, theta) = (6usize, 2usize, 16usize, 1e6f32);
    let sections = [2usize, 3, 3];
    let half = d / 2;
    let pos3: Vec<i32> = (0..3 * tokens).map(|_| rng.below(50) as i32).collect();
    let inv = rope::inv_freq(d, theta);
    let mut cos_full = vec![0.0f64; tokens * d];
    let mut sin_full = vec![0.0f64; tokens * d];
    let chunks: Vec<usize> = sections.iter().chain(&sections).copied().collect();
    for t in 0..tokens {
        let mut j0 = 0;
        for (k, &len) in chunks.iter().enumerate() {
            let axis = k % 3;
            for j in j0..j0 + len {
                let f = (pos3[axis * tokens + t] as f32 * inv[j % half]) as f64; // cat(f, f)[j]
                cos_full[t * d + j] = f.cos();
                sin_full[t * d + j] = f.sin();
            }
            j0 += len;
        }
    }
    let x = probe(&mut rng, tokens * heads * d);
    let want = direct(&x, &cos_full, &sin_full, tokens, heads, d);
    let (c, s) = rope::table_mrope(&pos3, tokens, d, theta, &sections).unwrap();
    let mut y = x.clone();
    cpu::fwd(&mut y, &to64(&c), &to64(&s), tokens, heads, d);
    let e = rel_err64(&y, &want);
    println!("rope M-RoPE vs transformers' split rule: rel err {e:.2e}");
    assert!(e < 1e-6, "rel err {e:.2e}");
}

#[test]
fn rope_table_vision_2d_hand_computed() {
    // head_dim 8 → VisionRotaryEmbedding(4): inv = [1, 1/10000^(2/4) = 0.01]; angles [h, h/100, w, w/100].
    let (hpos, wpos) = ([0, 3, 5], [1, 2, 9]);
    let (c, s) = rope::table_vision_2d(&hpos, &wpos, 8, 10000.0).unwrap();
    let ang: Vec<f64> =
        hpos.iter().zip(&wpos).flat_map(|(&h, &w)| [h as f64, h as f64 * 0.01, w as f64, w as f64 * 0.01]).collect();
    check_table("vision 2d cos", &c, &ang.iter().map(|a| a.cos()).collect::<Vec<_>>(), &ang);
    check_table("vision 2d sin", &s, &ang.iter().map(|a| a.sin()).collect::<Vec<_>>(), &ang);
    // The 7B's head_dim 80 gives 20 frequencies per axis.
    let (c80, _) = rope::table_vision_2d(&[4], &[6], 80, 10000.0).unwrap();
    assert_eq!(c80.len(), 40);
    assert_eq!(c80[0], (4.0f64).cos() as f32);
    assert_eq!(c80[20], (6.0f64).cos() as f32);
    assert!(rope::table_vision_2d(&[1], &[1, 2], 8, 1e4).is_err(), "length mismatch");
    assert!(rope::table_vision_2d(&[1], &[1], 6, 1e4).is_err(), "head_dim not a multiple of 4");
}

/// Reads `position_ids` [3, S] (i64) from the Qwen fixture and builds the text M-RoPE table
/// with the fixture config's rope settings.
#[test]
fn rope_mrope_fixture_positions() {
    let dir = fixture_dir("qwen2_5_vl_tiny");
    let bytes = match std::fs::read(dir.join("reference.safetensors")) {
        Ok(b) => b,
        Err(e) => {
            println!("rope_mrope_fixture_positions: skipped: fixture not readable ({e})");
            return;
        }
    };
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("position_ids").unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::I64);
    let shape = t.shape().to_vec();
    assert_eq!((shape.len(), shape[0]), (2, 3), "position_ids shape {shape:?}");
    let tokens = shape[1];
    let pos3: Vec<i32> = t.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as i32).collect();
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let hd = (cfg["hidden_size"].as_u64().unwrap() / cfg["num_attention_heads"].as_u64().unwrap()) as usize;
    let theta = cfg["rope_theta"].as_f64().unwrap() as f32;
    let sections: Vec<usize> =
        cfg["rope_scaling"]["mrope_section"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let (c, s) = rope::table_mrope(&pos3, tokens, hd, theta, &sections).unwrap();
    assert_eq!((c.len(), s.len()), (tokens * hd / 2, tokens * hd / 2));
    let worst = c.iter().zip(&s).map(|(c, s)| ((c * c + s * s) as f64 - 1.0).abs()).fold(0.0, f64::max);
    assert!(c.iter().chain(&s).all(|v| v.is_finite()), "non-finite table entry");
    assert!(worst < 1e-6, "cos² + sin² − 1 up to {worst:.2e}");
    // Token 0 is text at position 0 on every axis: the identity rotation.
    assert!(c[..hd / 2].iter().all(|&v| v == 1.0) && s[..hd / 2].iter().all(|&v| v == 0.0));
    // Per frequency, the entry equals the 1-D table at that token's position on the section's axis.
    let half = hd / 2;
    for t in 0..tokens {
        for i in 0..half {
            let axis = if i < sections[0] {
                0
            } else if i < sections[0] + sections[1] {
                1
            } else {
                2
            };
            let (c1, s1) = rope::table_1d(&[pos3[axis * tokens + t]], hd, theta).unwrap();
            assert!(c[t * half + i] == c1[i] && s[t * half + i] == s1[i], "token {t} frequency {i} (axis {axis})");
        }
    }
    let (tmin, tmax) = (pos3.iter().min().unwrap(), pos3.iter().max().unwrap());
    println!("rope fixture: {tokens} tokens, head_dim {hd}, sections {sections:?}, positions {tmin}..={tmax}, |cos²+sin²−1| ≤ {worst:.1e}");
}

#[test]
fn rope_bad_arguments_are_errors() {
    let dev = Device::Cpu;
    let mut x = dev.upload(&[1.0; 12], DType::F32).unwrap();
    let (c, s) = rope::upload_table(&dev, &[1.0; 3], &[0.0; 3]).unwrap();
    let e = rope::fwd(&dev, &mut x, &c, &s, 2, 1, 6).unwrap_err().to_string();
    println!("rope short table: {e}");
    assert!(e.contains("rope_fwd") && e.contains("cos"), "{e}");
    let e = rope::bwd(&dev, &mut x, &c, &s, 1, 4, 3).unwrap_err().to_string();
    println!("rope odd head_dim: {e}");
    assert!(e.contains("rope_bwd") && e.contains("head_dim"), "{e}");
    assert!(rope::upload_table(&dev, &[1.0; 3], &[0.0; 2]).is_err());
}

#[test]
fn rope_cuda_matches_cpu() {
    let Some(gpu) = cuda_or_skip("rope_cuda_matches_cpu") else { return };
    let cpu_dev = Device::Cpu;
    let mut rng = Rng::new(23);
    // (tokens, heads, head_dim). half % 8 == 0: 16-byte path for both dtypes; half 12: f32 vector,
    // bf16 scalar; half 3 and 5: scalar; the last shape needs several grid-stride passes.
    let shapes: &[(usize, usize, usize)] = &[
        (1, 1, 2),
        (3, 2, 6),
        (5, 3, 16),
        (33, 5, 10),
        (64, 4, 24),
        (7, 4, 80),
        (17, 2, 128),
        (129, 28, 128),
        (6000, 40, 128),
    ];
    for &dt in &[DType::BF16, DType::F32] {
        for &(tokens, heads, d) in shapes {
            let round = |v: Vec<f32>| if dt == DType::BF16 { bf16_round(&v) } else { v };
            let x = round(rng.normal_vec(tokens * heads * d, 1.0));
            // Non-zero positions, so an element the kernel skipped would differ from the CPU.
            let pos: Vec<i32> = (0..tokens).map(|t| 1 + t as i32 * 3).collect();
            let (c, s) = rope::table_1d(&pos, d, 10000.0).unwrap();
            let run = |dev: &Device, dt: DType, backward: bool| -> Vec<f32> {
                let mut xb = dev.upload(&x, dt).unwrap();
                let (cb, sb) = rope::upload_table(dev, &c, &s).unwrap();
                if backward {
                    rope::bwd(dev, &mut xb, &cb, &sb, tokens, heads, d).unwrap();
                } else {
                    rope::fwd(dev, &mut xb, &cb, &sb, tokens, heads, d).unwrap();
                }
                dev.to_vec(&xb).unwrap()
            };
            let tol = if dt == DType::BF16 { Tol::Bf16Op.value() } else { Tol::F32Reference.value() };
            for (name, backward) in [("fwd", false), ("bwd", true)] {
                let want = run(&cpu_dev, DType::F32, backward);
                let got = run(&gpu, dt, backward);
                let e = rel_err(&got, &want);
                println!(
                    "rope {name} {} [{tokens}x{heads}x{d}]: rel err {e:.2e} (max abs {:.2e})",
                    dt.suffix(),
                    max_abs(&got, &want)
                );
                assert!(e <= tol, "rope {name} {} [{tokens}x{heads}x{d}]: rel err {e:.2e} > {tol:.0e}", dt.suffix());
            }
        }
    }
}
