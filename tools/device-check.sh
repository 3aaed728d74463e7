#!/usr/bin/env bash
# GPU checks in one call. Two halves:
#   tools/device-check.sh build   (here, with Rust): builds the test and bench binaries in release
#                                 and copies them, the am3 binary and the fixtures into .device/
#   tools/device-check.sh run     (on the GPU machine, no Rust needed): runs every test binary,
#                                 then the kernel benches, and prints a short table last.
# Typical device call:  carry [".device"], command: bash tools/device-check.sh run
# Knobs: AM3_BENCH_ARGS (bench suites/flags), AM3_TESTS=regex (only matching test binaries),
#   AM3_SKIP_GRPO7B=1 (skip the 7B GRPO steps, ~5 min),
#        AM3_SKIP_NVRTC=1, AM3_SKIP_SFT=1 (the GPU run of the main job, am3 demo), AM3_SKIP_BENCH=1.
#        AM3_SKIP_WORKLOADS=1 (the 7B rollout and GRPO workload suites).
# The timeouts add up to more than one 600 s device call: a first call with AM3_SKIP_WORKLOADS=1
# AM3_SKIP_BENCH=1, a second with AM3_TESTS='^$' AM3_SKIP_NVRTC=1 AM3_SKIP_SFT=1 (the run times
# are estimates: no device has run them yet).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
mode="${1:-run}"
dst="$root/.device"

if [ "$mode" = build ]; then
  set -e
  stage="$(mktemp -d)"; mkdir -p "$stage/bin" "$stage/fixtures"
  cargo build --release --bins --benches >&2
  # --message-format=json lists the test executables cargo produced.
  cargo test --release --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import sys,json
for l in sys.stdin:
    try: m=json.loads(l)
    except Exception: continue
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["kind"][0], m["target"]["name"], m["executable"])' > "$stage/tests.txt"
  while read -r kind name exe; do cp "$exe" "$stage/bin/test-$kind-$name"; done < "$stage/tests.txt"
  cp target/release/am3 "$stage/bin/am3"
  bench=$(ls -t target/release/deps/kernels-* 2>/dev/null | grep -v '\.d$' | head -1)
  [ -n "$bench" ] && cp "$bench" "$stage/bin/bench-kernels"
  strip "$stage"/bin/* 2>/dev/null || true
  cp -r ../shared/fixtures/. "$stage/fixtures/"
  # One xz stream over all binaries: they share the embedded kernels and most code, which the
  # large dictionary dedups, so the carried folder stays far under the 64 MiB limit.
  rm -rf "$dst"; mkdir -p "$dst"
  tar -C "$stage" -cf - . | xz -9e -T2 --lzma2=dict=192MiB > "$dst/bundle.tar.xz"
  rm -rf "$stage"
  du -sh "$dst" >&2
  exit 0
fi

# --- run (on the device) ---
if [ -f "$dst/bundle.tar.xz" ]; then
  work=/tmp/am3-device; rm -rf "$work"; mkdir -p "$work"
  xz -dc "$dst/bundle.tar.xz" | tar -C "$work" -xf - || { echo "unpacking the bundle failed"; exit 2; }
  dst="$work"
fi
export AM3_FIXTURES="$dst/fixtures"
export AM3_LLAVA_FIXTURES="$dst/fixtures/llava_next_tiny"
export AM3_GRPO_VECTORS="$dst/fixtures/grpo_vectors.safetensors"
export AM3_SHARED_FIXTURES="$dst/fixtures"
export AM3_BIN="$dst/bin/am3"
export LD_LIBRARY_PATH="/usr/local/cuda-13.0/lib64:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
res="${OUT:-/tmp/am3-out}"; mkdir -p "$res"
out=/tmp/am3-logs; rm -rf "$out"; mkdir -p "$out"   # per-test logs; tarred into $OUT at the end
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader 2>&1 | head -1
summary=""
fail=0
for t in "$dst"/bin/test-*; do
  n=$(basename "$t")
  # AM3_TESTS=regex runs only the matching test binaries (a short re-check after a fix).
  if [ -n "${AM3_TESTS:-}" ] && ! [[ $n =~ $AM3_TESTS ]]; then continue; fi
  log="$out/$n.log"
  timeout 300 "$t" --test-threads=1 --nocapture > "$log" 2>&1
  rc=$?
  result=$(grep -E "^test result" "$log" | tail -1 | sed 's/test result: //')
  [ $rc -ne 0 ] && fail=1
  summary+=$(printf "%-34s rc=%-3s %s" "$n" "$rc" "$result")$'\n'
done
# The per-shape errors the GPU tests printed (for the note), then failures in full.
cat "$out"/test-*.log | grep -E "rel err|max abs|skipped" | grep -v "^gradcheck" > "$out/errors.txt" || true
for t in "$out"/test-*.log; do
  if grep -qE "FAILED|panicked" "$t"; then echo "=== $(basename "$t")"; grep -E "panicked|FAILED|assert|Error" -A4 "$t" | head -40; fi
done
# The NVRTC path (what a build without nvcc runs): the same binaries with the fatbins ignored.
nvrtc=""
for t in test-test-ops_rmsnorm test-test-ops_attention test-test-ops_logprob_cuda test-test-ops_logprob_grpo test-test-ops_elementwise test-test-qwen_model_cuda; do
  [ -x "$dst/bin/$t" ] && [ "${AM3_SKIP_NVRTC:-0}" != 1 ] || continue
  AM3_FORCE_NVRTC=1 timeout 300 "$dst/bin/$t" --test-threads=1 --nocapture > "$out/nvrtc-$t.log" 2>&1
  rc=$?; [ $rc -ne 0 ] && fail=1
  nvrtc+=$(printf "%-34s rc=%-3s %s" "nvrtc $t" "$rc" "$(grep -E '^test result' "$out/nvrtc-$t.log" | tail -1 | sed 's/test result: //')")$'\n'
done
# The main job end to end on the GPU: am3 demo (SFT, eval, GRPO with the rules judge, eval) on
# the tiny default model and the bundled demo data; the before/after ASR line goes in the table.
if [ -x "$dst/bin/am3" ] && [ "${AM3_SKIP_SFT:-0}" != 1 ]; then
  rm -rf /tmp/am3-demo-gpu
  AM3_DEMO_DATA="$root/data/demo/train.jsonl" timeout 300 "$dst/bin/am3" demo --device cuda --out /tmp/am3-demo-gpu > "$out/demo-gpu.log" 2>&1
  rc=$?; [ $rc -ne 0 ] && fail=1
  summary+=$(printf "%-34s rc=%-3s %s" "am3 demo --device cuda" "$rc" "$(grep -E '^(ASR|over-refusal) ' "$out/demo-gpu.log" | tr -s ' ' | tr '\n' ';')")$'\n'
fi
if [ -x "$dst/bin/am3" ] && [ "${AM3_SKIP_WORKLOADS:-0}" != 1 ]; then
  # The rollout engine on the 7B-shaped Qwen2.5-VL (not part of the kernel bench binary): decode
  # at batch 1-128 and one GRPO-shaped call (8 dialogues × 8 rollouts × 3 turns × 128 new tokens).
  timeout 240 "$dst/bin/am3" bench --shape qwen2.5-vl-7b rollout --json "$res/bench-rollout.json" > "$out/bench-rollout.txt" 2>&1
  echo "bench rollout rc=$?"
  # Whole 7B-shaped GRPO steps (issue #13): LoRA, then the full fine-tune with the per-layer step.
  if [ "${AM3_SKIP_GRPO7B:-0}" != 1 ]; then
    timeout 360 "$dst/bin/am3" bench --shape qwen2.5-vl-7b grpo --json "$res/bench-grpo.json" > "$out/bench-grpo.txt" 2>&1
    echo "bench grpo rc=$?"
    cat "$out/bench-grpo.txt" >> "$out/bench-rollout.txt"
  fi
fi
if [ -x "$dst/bin/bench-kernels" ] && [ "${AM3_SKIP_BENCH:-0}" != 1 ]; then
  timeout 400 "$dst/bin/bench-kernels" ${AM3_BENCH_ARGS:-} > "$out/bench.txt" 2>&1
  echo "bench rc=$?"
fi
cat "$out/bench-rollout.txt" >> "$out/bench.txt" 2>/dev/null
cp "$out/bench.txt" "$out/errors.txt" "$res/" 2>/dev/null
tar -C "$out" -czf "$res/logs.tgz" . 2>/dev/null
echo "=== largest GPU errors printed by the tests (all lines in errors.txt)"
grep -E "cuda|gpu|bf16" "$out/errors.txt" | sed 's/^test [a-z_0-9]* \.\.\. //' \
  | awk '{for(i=1;i<NF;i++) if($i=="err"){v=$(i+1); sub(/[^0-9.e+-].*/,"",v); print v"\t"$0; break}}' | sort -g -r | head -12 | cut -f2
echo "=== tests"; printf "%s" "$summary"; printf "%s" "$nvrtc"
echo "=== bench"; cat "$out/bench.txt" 2>/dev/null | cut -c1-150 | tail -70
exit $fail
