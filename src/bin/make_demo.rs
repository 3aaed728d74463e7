//! `make_demo [OUT_DIR]`: regenerates the synthetic demo dataset (SFT, eval and GRPO dialogues,
//! the SafeMT sample) and its tokenizer (default `data/demo`). Deterministic: the output matches
//! the committed files byte for byte.

use am3safety::data::demo;

fn main() {
    let out = std::env::args().nth(1).unwrap_or_else(|| "data/demo".to_string());
    match demo::generate(&out) {
        Ok(s) => println!(
            "{out}: {} train + {} eval samples ({} labelled multi-turn), {} GRPO prompts, {} SafeMT records, {} images, tokenizer with {} tokens",
            s.train_samples, s.eval_samples, s.eval_multiturn, s.grpo_prompts, s.safemt_records, s.images, s.vocab_size
        ),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
