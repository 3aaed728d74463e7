#!/usr/bin/env bash
# Regenerates data/demo/ (train/eval/grpo JSONL dialogues, the SafeMT sample, PNG images,
# tokenizer.json) from src/data/demo/.
# Deterministic (fixed seed): rerunning it leaves the committed files unchanged, which
# `cargo test --test sft_data` checks. Usage: tools/make-demo-data.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --release --quiet --bin make_demo -- "${1:-data/demo}"
