#!/usr/bin/env python3
"""Hugging Face interop check: what `am3` writes loads in transformers and PEFT and computes
the same logits as `am3 forward`.

Cases, for both families (Qwen2.5-VL: the embedded tiny default; LLaVA-NeXT: a tiny random
model that transformers builds and saves): a full `am3 sft` checkpoint, a merged LoRA
checkpoint and a PEFT adapter (`PeftModel.from_pretrained` on the base the adapter names).
Each is loaded by transformers (+ peft), run on one image+text chat made by the model's own
processor, and compared with `am3 forward` on the same inputs (relative L2 error of the logits
<= 1e-4). Also: `am3 export` of the tiny default loads with AutoProcessor, its tokenizer's eos
is the model's, `apply_chat_template` renders the ChatML prompt am3 trains on, and `generate`
runs.

Run through tools/install-interop.sh's venv (see README, "Hugging Face interop"):
    python tools/interop-check.py --am3 target/release/am3
Ends with "interop: N passed, M failed"; exit status 1 when anything failed.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
import warnings

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import peft
import transformers
from peft import PeftModel
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    MistralConfig,
    Qwen2_5_VLForConditionalGeneration,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4
# The adapters must move the logits well past the tolerance, or a PEFT load that applied
# nothing would pass.
MIN_EFFECT = 100 * TOL

results = []


def check(name, fn):
    try:
        detail = fn()
        results.append((name, True))
        print(f"PASS {name}: {detail}", flush=True)
    except Exception as e:  # report every case, then fail at the end
        results.append((name, False))
        print(f"FAIL {name}: {e}", flush=True)
        traceback.print_exc()


def run_am3(am3, *args):
    p = subprocess.run([am3, *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"am3 {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return p


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def am3_logits(am3, model_dir, inputs_file, out_file):
    run_am3(am3, "forward", "--device", "cpu", "--model", model_dir, "--inputs", inputs_file, "--out", out_file)
    return load_file(out_file)["logits"]


@torch.no_grad()
def hf_logits(model, inputs):
    model.eval()
    return model(**inputs).logits[0].float()


def save_inputs(inputs, path):
    keep = {k: v.contiguous() for k, v in inputs.items() if k in ("input_ids", "pixel_values", "image_grid_thw", "image_sizes")}
    save_file(keep, path)


def latest(out):
    with open(os.path.join(out, "latest")) as f:
        return os.path.join(out, f.read().strip())


def load_peft(adapter_dir, cls):
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        base_path = json.load(f)["base_model_name_or_path"]
    if not os.path.isabs(base_path):
        raise AssertionError(f"base_model_name_or_path {base_path!r} is not an absolute path")
    base = cls.from_pretrained(base_path, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, adapter_dir)
    bad = [str(w.message) for w in caught if "adapter" in str(w.message).lower() or "target" in str(w.message).lower()]
    if bad:
        raise AssertionError(f"PEFT warned: {bad}")
    # Every tensor of the file is in the model, with its value.
    saved = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    loaded = peft.get_peft_model_state_dict(model)
    if set(saved) != set(loaded):
        raise AssertionError(f"PEFT's keys differ from the file's: only in file {sorted(set(saved) - set(loaded))[:4]}, only in model {sorted(set(loaded) - set(saved))[:4]}")
    worst = max(float((saved[k].float() - loaded[k].float()).abs().max()) for k in saved)
    if worst != 0.0:
        raise AssertionError(f"PEFT holds other adapter values (max diff {worst:.2e})")
    return model, base_path, len(saved)


def compare(tag, am3, model_dir, inputs, inputs_file, work, hf_model):
    got = am3_logits(am3, model_dir, inputs_file, os.path.join(work, f"{tag}-out.safetensors"))
    want = hf_logits(hf_model, inputs)
    if got.shape != want.shape:
        raise AssertionError(f"logits shape {tuple(got.shape)} vs transformers {tuple(want.shape)}")
    e = rel_err(got, want)
    if not e <= TOL:
        raise AssertionError(f"am3 forward vs transformers: logits rel err {e:.2e} > {TOL:.0e}")
    return e, want


def same_config(src_dir, ck_dir):
    """Every field of the source config survives the save; the dtype says float32 (CPU runs)."""
    src, got = (json.load(open(os.path.join(d, "config.json"))) for d in (src_dir, ck_dir))

    def walk(s, g, path):
        for k, v in s.items():
            p = f"{path}.{k}" if path else k
            if k == "_name_or_path" and not path:
                continue
            if k not in g:
                raise AssertionError(f"config.json lost {p}")
            if k in ("dtype", "torch_dtype"):
                if g[k] != "float32":
                    raise AssertionError(f"{p} is {g[k]!r}, the tensors are float32")
            elif isinstance(v, dict) and isinstance(g[k], dict):
                walk(v, g[k], p)
            elif g[k] != v:
                raise AssertionError(f"config.json changed {p}: {v!r} -> {g[k]!r}")

    walk(src, got, "")
    return len(src)


def demo_image(name):
    return Image.open(os.path.join(ROOT, "data/demo/images", name)).convert("RGB")


# ---------------------------------------------------------------------------------------------
# Qwen2.5-VL: the tiny default.

QWEN_EXPECTED = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What shapes are in this image?<|im_end|>\n"
    "<|im_start|>assistant\nA red circle.<|im_end|>\n"
    "<|im_start|>user\nAnd now?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def qwen_messages():
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shapes are in this image?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
        {"role": "user", "content": [{"type": "text", "text": "And now?"}]},
    ]


def qwen_cases(am3, work):
    base = os.path.join(work, "qwen-export")
    run_am3(am3, "export", "--out", base)
    proc = AutoProcessor.from_pretrained(base)
    text = proc.apply_chat_template(qwen_messages(), tokenize=False, add_generation_prompt=True)
    inputs = proc(text=[text], images=[demo_image("train-000-0.png")], return_tensors="pt")
    inputs_file = os.path.join(work, "qwen-inputs.safetensors")
    save_inputs(inputs, inputs_file)
    cls = Qwen2_5_VLForConditionalGeneration

    def export_check():
        cfg = json.load(open(os.path.join(base, "config.json")))
        tok = AutoTokenizer.from_pretrained(base)
        gen = json.load(open(os.path.join(base, "generation_config.json")))
        if not (tok.eos_token == "<|im_end|>" and tok.eos_token_id == cfg["eos_token_id"] == gen["eos_token_id"]):
            raise AssertionError(f"eos: tokenizer {tok.eos_token!r} ({tok.eos_token_id}), config {cfg['eos_token_id']}, generation_config {gen['eos_token_id']}")
        if tok.pad_token != "<|endoftext|>":
            raise AssertionError(f"pad token {tok.pad_token!r}")
        for t in (tok.apply_chat_template(qwen_messages(), tokenize=False, add_generation_prompt=True), text):
            if t != QWEN_EXPECTED:
                raise AssertionError(f"chat template renders {t!r}, expected {QWEN_EXPECTED!r}")
        model = cls.from_pretrained(base, dtype=torch.float32)
        e, _ = compare("qwen-export", am3, base, inputs, inputs_file, work, model)
        # generate: text-only through the tokenizer's template, and with the image.
        enc = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out1 = model.generate(**enc, max_new_tokens=6, do_sample=False)
        out2 = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        n1, n2 = out1.shape[1] - enc["input_ids"].shape[1], out2.shape[1] - inputs["input_ids"].shape[1]
        if n1 <= 0 or n2 <= 0:
            raise AssertionError("generate produced no tokens")
        return f"AutoProcessor {type(proc).__name__}, eos {tok.eos_token!r}={tok.eos_token_id}, ChatML prompt ok, generate {n1}+{n2} tokens ({tok.decode(out2[0, -n2:])!r}), logits rel err {e:.2e}"

    check("qwen2_5_vl export: AutoProcessor + apply_chat_template + generate", export_check)

    common = ["sft", "--device", "cpu", "--steps", "3", "--save-every", "3", "--warmup", "0"]
    full = os.path.join(work, "qwen-full")
    merged = os.path.join(work, "qwen-merged")
    adapter = os.path.join(work, "qwen-adapter")
    targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,visual.qkv,visual.proj,visual.up_proj"

    def full_case():
        run_am3(am3, *common, "--out", full, "--lr", "1e-2")
        ck = latest(full)
        e, want = compare("qwen-full", am3, ck, inputs, inputs_file, work, cls.from_pretrained(ck, dtype=torch.float32))
        n = same_config(base, ck)
        return f"{os.path.basename(ck)}: logits rel err {e:.2e}; {n} config fields kept"

    def merged_case():
        run_am3(am3, *common, "--out", merged, "--lr", "5e-2", "--lora-rank", "4", "--lora-targets", targets, "--lora-save", "merged")
        ck = latest(merged)
        e, want = compare("qwen-merged", am3, ck, inputs, inputs_file, work, cls.from_pretrained(ck, dtype=torch.float32))
        moved = rel_err(want, hf_logits(cls.from_pretrained(base, dtype=torch.float32), inputs))
        if moved < MIN_EFFECT:
            raise AssertionError(f"the merged LoRA barely changed the logits ({moved:.2e})")
        return f"logits rel err {e:.2e} (LoRA moved them {moved:.2e})"

    def adapter_case():
        run_am3(am3, *common, "--out", adapter, "--lr", "5e-2", "--lora-rank", "4", "--lora-targets", targets, "--lora-save", "adapter")
        ck = latest(adapter)
        model, base_path, n = load_peft(ck, cls)
        e, want = compare("qwen-adapter", am3, ck, inputs, inputs_file, work, model)
        moved = rel_err(want, hf_logits(cls.from_pretrained(base_path, dtype=torch.float32), inputs))
        if moved < MIN_EFFECT:
            raise AssertionError(f"the adapter barely changed the logits ({moved:.2e})")
        return f"{n} adapter tensors on {base_path}; logits rel err {e:.2e} (adapter moved them {moved:.2e})"

    check("qwen2_5_vl full checkpoint", full_case)
    check("qwen2_5_vl merged LoRA", merged_case)
    check("qwen2_5_vl PEFT adapter", adapter_case)


# ---------------------------------------------------------------------------------------------
# LLaVA-NeXT: a tiny random Mistral-decoder model that transformers builds and saves.

MISTRAL_TEMPLATE = (
    "{{- bos_token -}}{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{- '[INST] ' -}}"
    "{%- for c in m['content'] -%}{%- if c['type'] == 'image' -%}{{- '<image>\\n' -}}{%- elif c['type'] == 'text' -%}{{- c['text'] -}}{%- endif -%}{%- endfor -%}"
    "{{- ' [/INST]' -}}"
    "{%- elif m['role'] == 'assistant' -%}{{- ' ' + m['content'][0]['text'] + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)
PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]


def make_llava(src):
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(os.path.join(ROOT, "data/demo/tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ["<s>", "</s>", "<image>", "[INST]", "[/INST]"]])
    os.makedirs(src, exist_ok=True)
    tok.save(os.path.join(src, "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in ["<s>", "</s>", "<image>"]}
    text = MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        vocab_size=tok.get_vocab_size(), rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096, sliding_window=None,
        tie_word_embeddings=False, bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], initializer_range=0.05,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=56, patch_size=14,
        projection_dim=32, hidden_act="quick_gelu", layer_norm_eps=1e-5, initializer_range=0.05,
    )
    cfg = LlavaNextConfig(
        text_config=text, vision_config=vision, image_token_index=ids["<image>"], image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(cfg).float()
    with torch.no_grad():  # non-trivial norms and biases
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(src)
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor, PreTrainedTokenizerFast

    ptok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(src, "tokenizer.json"), bos_token="<s>", eos_token="</s>", pad_token="</s>")
    ip = LlavaNextImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, image_grid_pinpoints=PINPOINTS)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=ptok, patch_size=14, vision_feature_select_strategy="default", chat_template=MISTRAL_TEMPLATE, num_additional_image_tokens=1)
    proc.save_pretrained(src)
    ip.save_pretrained(src)  # preprocessor_config.json too, which am3 reads
    return proc


def llava_cases(am3, work):
    src = os.path.join(work, "llava-src")
    proc = make_llava(src)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shapes are in this image?"}]}]
    text = proc.apply_chat_template(msgs, tokenize=False)
    inputs = proc(text=[text], images=[demo_image("train-000-0.png")], return_tensors="pt")
    inputs_file = os.path.join(work, "llava-inputs.safetensors")
    save_inputs(inputs, inputs_file)
    cls = LlavaNextForConditionalGeneration

    def source_case():
        e, _ = compare("llava-src", am3, src, inputs, inputs_file, work, cls.from_pretrained(src, dtype=torch.float32))
        return f"am3 reads what transformers saved: logits rel err {e:.2e}"

    check("llava_next source (saved by transformers)", source_case)
    # Relative, from the working directory: the adapter must still record an absolute base.
    common = ["sft", "--device", "cpu", "--model", os.path.relpath(src, work), "--steps", "3", "--save-every", "3", "--warmup", "0"]
    full = os.path.join(work, "llava-full")
    merged = os.path.join(work, "llava-merged")
    adapter = os.path.join(work, "llava-adapter")

    def full_case():
        run_am3(am3, *common, "--out", full, "--lr", "1e-2")
        ck = latest(full)
        e, _ = compare("llava-full", am3, ck, inputs, inputs_file, work, cls.from_pretrained(ck, dtype=torch.float32))
        n = same_config(src, ck)
        return f"{os.path.basename(ck)}: logits rel err {e:.2e}; {n} config fields kept"

    def merged_case():
        run_am3(am3, *common, "--out", merged, "--lr", "5e-2", "--lora-rank", "4", "--lora-save", "merged")
        ck = latest(merged)
        e, want = compare("llava-merged", am3, ck, inputs, inputs_file, work, cls.from_pretrained(ck, dtype=torch.float32))
        moved = rel_err(want, hf_logits(cls.from_pretrained(src, dtype=torch.float32), inputs))
        if moved < MIN_EFFECT:
            raise AssertionError(f"the merged LoRA barely changed the logits ({moved:.2e})")
        return f"logits rel err {e:.2e} (LoRA moved them {moved:.2e})"

    def adapter_case():
        run_am3(am3, *common, "--out", adapter, "--lr", "5e-2", "--lora-rank", "4", "--lora-save", "adapter")
        ck = latest(adapter)
        os.chdir("/")  # PEFT resolves the base from elsewhere
        try:
            model, base_path, n = load_peft(ck, cls)
        finally:
            os.chdir(work)
        if os.path.realpath(base_path) != os.path.realpath(src):
            raise AssertionError(f"the adapter names {base_path} as its base, not {src}")
        e, want = compare("llava-adapter", am3, ck, inputs, inputs_file, work, model)
        moved = rel_err(want, hf_logits(cls.from_pretrained(src, dtype=torch.float32), inputs))
        if moved < MIN_EFFECT:
            raise AssertionError(f"the adapter barely changed the logits ({moved:.2e})")
        return f"{n} adapter tensors; logits rel err {e:.2e} (adapter moved them {moved:.2e})"

    check("llava_next full checkpoint", full_case)
    check("llava_next merged LoRA", merged_case)
    check("llava_next PEFT adapter", adapter_case)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--am3", default=os.path.join(ROOT, "target/release/am3"))
    ap.add_argument("--work", help="a new or empty working directory, kept (default: a temporary one, removed at the end)")
    a = ap.parse_args()
    am3 = os.path.abspath(a.am3)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(f"interop: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, am3 {am3}", flush=True)
    work = os.path.abspath(a.work) if a.work else tempfile.mkdtemp(prefix="am3-interop-")
    if a.work and os.path.exists(work) and os.listdir(work):
        sys.exit(f"interop: --work {work} is not empty")
    os.makedirs(work, exist_ok=True)
    try:
        # Relative paths in the runs must not matter: run from elsewhere.
        os.chdir(work)
        for fam, fn in (("qwen2_5_vl", qwen_cases), ("llava_next", llava_cases)):
            try:
                fn(am3, work)
            except Exception as e:
                results.append((f"{fam} setup", False))
                print(f"FAIL {fam} setup: {e}", flush=True)
                traceback.print_exc()
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    passed = sum(ok for _, ok in results)
    print(f"interop: {passed} passed, {len(results) - passed} failed")
    sys.exit(0 if passed == len(results) and results else 1)


if __name__ == "__main__":
    main()
