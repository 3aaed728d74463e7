//! `make_demo [OUT_DIR]`: regenerates the synthetic demo dataset and its tokenizer (default
//! `data/demo`). Deterministic: the output matches the committed files byte for byte.

use am3safety::data::demo;

fn main() {
    let out = std::env::args().nth(1).unwrap_or_else(|| "data/demo".to_string());
    match demo::generate(&out) {
        Ok(s) => println!(
            "{out}: {} train + {} eval samples, {} images, tokenizer with {} tokens",
            s.train_samples, s.eval_samples, s.images, s.vocab_size
        ),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
