use am3safety::data::image::{resize_bicubic, RgbImage};
#[test]
fn pil() {
    let meta: Vec<[usize; 4]> = serde_json::from_str(&std::fs::read_to_string("/tmp/pilcheck2/meta.json").unwrap()).unwrap();
    for (i, [w, h, ww, hh]) in meta.into_iter().enumerate() {
        let inp = std::fs::read(format!("/tmp/pilcheck2/in{i}.bin")).unwrap();
        let want = std::fs::read(format!("/tmp/pilcheck2/out{i}.bin")).unwrap();
        let img = RgbImage::new(w, h, inp).unwrap();
        let got = resize_bicubic(&img, ww, hh).unwrap();
        let v1 = resize_bicubic(&img, w, hh).unwrap();
        let vf = resize_bicubic(&v1, ww, hh).unwrap();
        let hm = got.data == want; let vm = vf.data == want;
        println!("CASE {w} {h} {ww} {hh} {} {}", hm as u8, vm as u8);
    }
}
