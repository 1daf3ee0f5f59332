#!/usr/bin/env python3
"""Writes the Hugging Face interop fixtures under tests/fixtures/ (transformers on CPU, seconds):

- hf-tiny-mixtral/: a random MixtralForCausalLM (V65 C32, 2 layers, 4 query / 2 kv heads, 4 experts
  of width 32, top-2, untied head, rope_theta 1e4, rms_norm_eps 1e-5), saved by save_pretrained
  (per-expert tensor names), plus our char tokenizer of data/tinyshakespeare.txt.
- hf-tiny-qwen2-moe/: a random Qwen2MoeForCausalLM (same width, GQA, decoder_sparse_step 2: block 0
  dense with intermediate_size 4C, block 1 sparse; top-1 with norm_topk_prob false (Switch); tied
  head; rms_norm_eps 1e-6; a zero shared expert of width 1; no qkv biases).
- each holds expected.safetensors: input_ids (2, 12) i64 and the logits transformers computes
  (2, 12, 65) f32, prompt_ids (1, 8) and greedy_ids (1, 8 + 24), transformers' greedy decoding.
- hf-cache/hub/models--gumbel-moe-fixtures--tiny-mixtral/: the Mixtral's files laid out as a hub
  model cache (its only copy: tests read the snapshot folder as a model directory too).

Weights are drawn N(0, 0.2) (norm gains 1 + 0.1 N) and the seed is advanced until every router
choice and every greedy step has a margin > 1e-3 over the runner-up, so no near-tie can flip a
choice between two implementations. Run: python3 scripts/make_hf_fixtures.py (the Python of
scripts/hf_env.py: the repo's .venv-bench, transformers installed on first use).
"""
import hashlib
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_env  # noqa: E402

hf_env.ensure()

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIX = os.path.join(ROOT, "tests", "fixtures")
MARGIN = 1e-3


def char_tokenizer(path):
    """Our char tokenizer (src/data/tokenizer.rs `to_hf`) of the repo's Tiny Shakespeare, training split."""
    text = open(os.path.join(ROOT, "data", "tinyshakespeare.txt"), encoding="utf-8").read()
    chars = sorted(set(text[: int(len(text) * 0.9)]))
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated", "invert": False},
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": {c: i for i, c in enumerate(chars)}, "unk_token": "<unk>"},
    }


def redraw(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "shared_expert" in name:
                p.zero_()
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def router_margins(model, ids, k):
    """The smallest gap between consecutive top-(k+1) router logits over every token and MoE layer."""
    gaps = []

    def hook(_m, inp, _out):
        x = inp[0].reshape(-1, inp[0].shape[-1])
        logits = x @ _m.weight.T
        top = logits.topk(k + 1, dim=-1).values
        gaps.append((top[:, :-1] - top[:, 1:]).min().item())

    hs = [m.register_forward_hook(hook) for n, m in model.named_modules() if n.endswith("mlp.gate")]
    with torch.no_grad():
        model(ids)
    for h in hs:
        h.remove()
    return min(gaps)


def greedy(model, prompt, n):
    # An explicit mask: without one, transformers masks every id equal to pad_token_id.
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                         min_new_tokens=n, pad_token_id=0)
    # The margin of each greedy pick over the runner-up.
    with torch.no_grad():
        logits = model(out).logits[0, prompt.shape[1] - 1 : -1]
    top = logits.topk(2, dim=-1).values
    return out, (top[:, 0] - top[:, 1]).min().item()


def build(kind, seed):
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    common = dict(vocab_size=65, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, hidden_act="silu", max_position_embeddings=64,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                  bos_token_id=None, eos_token_id=None, pad_token_id=None, attention_dropout=0.0)
    if kind == "mixtral":
        cfg = MixtralConfig(**common, intermediate_size=32, rms_norm_eps=1e-5, num_local_experts=4,
                            num_experts_per_tok=2, tie_word_embeddings=False, sliding_window=None,
                            router_jitter_noise=0.0, router_aux_loss_coef=0.01)
        model, k = MixtralForCausalLM(cfg), 2
    else:
        cfg = Qwen2MoeConfig(**common, intermediate_size=128, moe_intermediate_size=32, rms_norm_eps=1e-6,
                             num_experts=4, num_experts_per_tok=1, norm_topk_prob=False, decoder_sparse_step=2,
                             shared_expert_intermediate_size=1, qkv_bias=False, tie_word_embeddings=True,
                             use_sliding_window=False, router_aux_loss_coef=0.01)
        model, k = Qwen2MoeForCausalLM(cfg), 1
    model.eval()
    redraw(model, seed)
    return model, k


def write(kind, dirname):
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, 65, (2, 12), generator=g)
    prompt = torch.randint(0, 65, (1, 8), generator=g)
    for seed in range(100):
        model, k = build(kind, seed)
        if router_margins(model, ids, k) <= MARGIN:
            continue
        out, gap = greedy(model, prompt, 24)
        if gap > MARGIN and router_margins(model, out, k) > MARGIN:
            break
    else:
        sys.exit(f"{kind}: no seed below 100 without a near-tie")
    out_dir = os.path.join(FIX, dirname)
    shutil.rmtree(out_dir, ignore_errors=True)
    model.save_pretrained(out_dir)
    with torch.no_grad():
        logits = model(ids).logits.float().contiguous()
    from safetensors.torch import save_file

    save_file({"input_ids": ids, "logits": logits, "prompt_ids": prompt, "greedy_ids": out},
              os.path.join(out_dir, "expected.safetensors"))
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(char_tokenizer(None), f, ensure_ascii=False, indent=2)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 64,
                   "clean_up_tokenization_spaces": False}, f, indent=2)
    print(f"{dirname}: seed {seed}, greedy margin {gap:.4f}, logits std {logits.std().item():.3f}")
    return out_dir


def hub_cache(src, owner, name):
    """Lays `src` out as hf-hub stores a model repo: refs/main, snapshots/<commit>/F -> ../../blobs/<sha1>."""
    repo = os.path.join(FIX, "hf-cache", "hub", f"models--{owner}--{name}")
    shutil.rmtree(repo, ignore_errors=True)
    files = sorted(f for f in os.listdir(src) if f != "expected.safetensors")
    blobs = {}
    for f in files:
        data = open(os.path.join(src, f), "rb").read()
        blobs[f] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # the git blob id
        os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
        shutil.copyfile(os.path.join(src, f), os.path.join(repo, "blobs", blobs[f]))
    commit = hashlib.sha1("".join(f + blobs[f] for f in files).encode()).hexdigest()
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    snap = os.path.join(repo, "snapshots", commit)
    os.makedirs(snap)
    for f in files:
        os.symlink(f"../../blobs/{blobs[f]}", os.path.join(snap, f))
    print(f"hub cache: {owner}/{name} at {commit}")


if __name__ == "__main__":
    torch.manual_seed(0)
    mixtral = write("mixtral", "hf-tiny-mixtral")
    write("qwen2_moe", "hf-tiny-qwen2-moe")
    hub_cache(mixtral, "gumbel-moe-fixtures", "tiny-mixtral")
    # One copy of the Mixtral: its model files live in the hub cache, expected.safetensors here.
    for f in os.listdir(mixtral):
        if f != "expected.safetensors":
            os.remove(os.path.join(mixtral, f))
