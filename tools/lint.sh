#!/usr/bin/env bash
# Lint: rustfmt (rustfmt.toml), clippy with warnings as errors, and the file-size budget
# (Rust files under src/ at most 800 lines, under tests/ and benches/ at most 600). Lists every
# file over its budget with its line count and fails; run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --check
cargo clippy --release --all-targets -- -D warnings

over=0
while IFS= read -r f; do
  case "$f" in
    src/*) budget=800 ;;
    tests/* | benches/*) budget=600 ;;
    *) continue ;;
  esac
  n=$(wc -l <"$f")
  if [ "$n" -gt "$budget" ]; then
    echo "size: $f: $n lines, over the budget of $budget" >&2
    over=1
  fi
done < <(find src tests benches -name '*.rs' 2>/dev/null | sort)
if [ "$over" = 1 ]; then
  echo "lint: files over their line budget (split them by topic)" >&2
  exit 1
fi
echo "lint: ok"
