use am3safety::data::image::{resize_bicubic, RgbImage};
#[test]
fn pil() {
    let meta: Vec<[usize; 4]> = serde_json::from_str(&std::fs::read_to_string("/tmp/pilcheck/meta.json").unwrap()).unwrap();
    for (i, [w, h, ww, hh]) in meta.into_iter().enumerate() {
        let inp = std::fs::read(format!("/tmp/pilcheck/in{i}.bin")).unwrap();
        let want = std::fs::read(format!("/tmp/pilcheck/out{i}.bin")).unwrap();
        let img = RgbImage::new(w, h, inp).unwrap();
        let got = resize_bicubic(&img, ww, hh).unwrap();
        let v1 = resize_bicubic(&img, w, hh).unwrap();
        let vf = resize_bicubic(&v1, ww, hh).unwrap();
        let cmp = |g: &RgbImage| { let d = g.data.iter().zip(&want).filter(|(a, b)| a != b).count(); let m = g.data.iter().zip(&want).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap(); (d, m) };
        println!("{w}x{h} -> {ww}x{hh}: h-first {:?} v-first {:?} of {}", cmp(&got), cmp(&vf), want.len());
    }
}
