#!/usr/bin/env python3
"""Loads a `gumbel-moe export-hf --with-logits` directory with transformers (AutoModelForCausalLM and
AutoTokenizer, CPU, float32) and compares it with ours:

- the logits for the fixed ids in gumbel_moe_logits.safetensors: max |difference| <= --tol (1e-4);
- greedy decoding (generate(do_sample=False)) of its prompt: the same token ids as our
  `generate --temperature 0` (greedy_ids);
- the tokenizer: decoding the greedy ids and encoding the text gives the ids back;
- loading: no missing or unexpected tensors.

Prints one JSON line; exits 1 when a check fails.
Usage: python scripts/check_hf_export.py DIR [--tol 1e-4]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_env  # noqa: E402

hf_env.ensure()

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args()
    ours_file = os.path.join(a.dir, "gumbel_moe_logits.safetensors")
    if not os.path.exists(ours_file):
        sys.exit(f"{ours_file} is missing: export with `gumbel-moe export-hf ... --with-logits`")
    ours = load_file(ours_file)
    model, info = AutoModelForCausalLM.from_pretrained(a.dir, dtype=torch.float32, output_loading_info=True)
    model.eval()
    tok = AutoTokenizer.from_pretrained(a.dir)
    with torch.no_grad():
        logits = model(ours["input_ids"]).logits
    diff = (logits - ours["logits"]).abs().max().item()
    prompt, want = ours["prompt_ids"], ours["greedy_ids"]
    n = want.shape[1] - prompt.shape[1]
    # An explicit mask: without one, transformers masks every id equal to pad_token_id.
    got = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0)
    ids = want[0].tolist()
    text = tok.decode(ids)
    roundtrip = tok(text, add_special_tokens=False)["input_ids"] == ids
    loading = {k: list(info.get(k, [])) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    result = {
        "dir": a.dir,
        "architecture": model.config.architectures,
        "max_abs_logit_diff": diff,
        "logits_std": ours["logits"].std().item(),
        "greedy_equal": got[0].tolist() == ids,
        "greedy_tokens": n,
        "greedy_text": text,
        "tokenizer_roundtrip": roundtrip,
        "tokenizer_class": type(tok).__name__,
        **loading,
    }
    print(json.dumps(result))
    ok = diff <= a.tol and result["greedy_equal"] and roundtrip and not any(loading.values())
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
