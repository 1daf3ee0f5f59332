#!/usr/bin/env python3
"""gumbel-moe's model in plain PyTorch eager (no torch.compile): the baseline of
scripts/bench_vs_pytorch.sh.

It reads the same TOML configs as the crate (configs/*.toml over the crate's built-in defaults,
src/config.rs, plus `--set key=value` overrides) and builds the same network:

- token embedding `wte` (V, C) ~ N(0, 0.02), LM head tied to it, or its own (V, C) `lm_head` with
  model.tie_embeddings = false; learned positions `wpe` only with
  model.positions = "learned" (the default configs use "rotary": no position table);
- n_layer pre-norm blocks: x += attn(ln_1(x)); x += ffn(ln_2(x)); then ln_f (src/model.rs);
- LayerNorm with bias (model.bias), or RMSNorm (src/nn/norm.rs), eps model.norm_eps;
- causal self-attention, c_attn C -> 3C (C + 2 kv widths with grouped-query attention,
  model.n_kv_head) and c_proj C -> C with biases, rotary half-split (GPT-NeoX
  layout) on q and k with theta model.rope_theta (src/nn/attention.rs, src/nn/rotary.rs);
- dense blocks: GELU (exact erf) MLP C -> 4C -> C (src/nn/mlp.rs); c_proj init std
  0.02 / sqrt(2 n_layer), as every residual projection;
- MoE blocks where (i + 1) % moe_every == 0 (Config::is_moe_layer: blocks 2 and 4 of 4 with
  moe_every = 2): E experts (the same MLP, hidden model.moe.expert_hidden), a Gumbel router
  (src/moe/routers/gumbel.rs) reading the hidden state (weight (E, C)) or, with
  model.router.input = "token", a (V, E) table of logits per input token id (init N(0, init_std));
  top-K prefilter, Gumbel noise, y = softmax((cand + g) / tau) over the K candidates, the top_m
  largest perturbed candidates with straight-through weight exactly 1/m (hard) or the renormalised
  y (soft); Switch balance loss E * sum f_i P_i and router z-loss (src/moe/losses.rs), both
  added to the cross-entropy;
- expert dispatch as eager PyTorch MoE code does it: sort the (token, slot) pairs by expert,
  index_select the rows, run each expert on its contiguous block, scale by the routing weight,
  index_add back (dropless unless model.moe.capacity_factor > 0);
- AdamW (betas train.beta1/beta2, eps, decoupled weight decay on tensors of rank >= 2 only, the
  router's lr x model.router.lr_scale and decay x model.router.decay_scale; src/train/optim.rs),
  global-norm gradient clipping train.grad_clip (src/train/trainer.rs).

Parameter names are the crate's (`h.1.moe.experts.3.c_fc.weight`, `h.1.moe.router.token_logits`,
...), so `--list-params` can be compared name by name with src/model.rs.

Prints, after the timed steps, one machine-readable line
    tok_per_s=... step_ms=... fwd_ms=... bwd_ms=... opt_ms=... params=... loss_first=... loss_last=...
The timed step is: for each of the train.grad_accum micro-batches forward + loss (+ .item()) and
backward (gradients summed), then clip (unless --no-clip), AdamW step, zero_grad; tokens per step
= batch_size x grad_accum x block_size. The batches are drawn before the clock starts.

Examples:
  python scripts/torch_gpt.py --threads 2 --steps 20
  python scripts/torch_gpt.py --dense --threads 1
  python scripts/torch_gpt.py --config-gpu --device cuda
"""

import argparse
import copy
import math
import os
import sys
import time

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # pragma: no cover
    tomllib = None

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Config::default() of src/config.rs (every key, so `--set` and the config files are checked the
# same way as by the crate: an unknown key is an error).
DEFAULTS = {
    "seed": 1337,
    "model": {
        "vocab_size": 0,
        "block_size": 64,
        "n_layer": 4,
        "n_head": 4,
        "n_embd": 128,
        "dropout": 0.0,
        "bias": True,
        "positions": "learned",
        "rope_theta": 10000.0,
        "norm": "layer",
        "fused_layers": True,
        "moe_every": 1,
        "n_kv_head": 0,
        "tie_embeddings": True,
        "norm_eps": 1e-5,
        "moe": {
            "num_experts": 8,
            "expert_hidden": 0,
            "activation": "gelu",
            "capacity_factor": 0.0,
            "balance_coef": 0.01,
            "z_coef": 0.001,
        },
        "router": {
            "kind": "gumbel",
            "top_m": 1,
            "prefilter": 4,
            "hard": True,
            "tau0": 1.0,
            "tau_min": 0.5,
            "tau_decay": 1e-3,
            "eval_mode": "argmax",
            "impl": "fused",
            "init_std": 0.02,
            "lr_scale": 1.0,
            "decay_scale": 1.0,
            "input": "hidden",
            "noise_init_std": 0.0,
            "load_coef": 0.01,
            "importance_coef": 0.01,
            "bias_update_rate": 1e-3,
            "reinforce_baseline_decay": 0.99,
        },
    },
    "data": {
        "source": "hf://SamPIngram/tinyshakespeare/input.txt",
        "tokenizer": "char",
        "bpe_vocab_size": 1024,
        "train_fraction": 0.9,
    },
    "train": {
        "batch_size": 12,
        "grad_accum": 1,
        "max_iters": 2000,
        "lr": 1e-3,
        "min_lr": 1e-4,
        "warmup_iters": 100,
        "lr_decay_iters": 2000,
        "weight_decay": 0.1,
        "beta1": 0.9,
        "beta2": 0.99,
        "eps": 1e-8,
        "grad_clip": 1.0,
        "eval_interval": 250,
        "eval_iters": 20,
        "log_interval": 10,
        "ckpt_interval": 500,
        "keep_last": 2,
        "final_full_eval": True,
        "device": "cpu",
        "tf32": False,
        "dead_expert_window": 100,
        "threads": 0,
        "expert_parallel": 1,
    },
}


# ----------------------------------------------------------------------------- config


def merge(dst, src, prefix, origin):
    """src into dst, keys must exist in dst with the same type (an int is accepted for a float)."""
    for k, v in src.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in dst:
            # A key of a newer crate (e.g. train.threads, the data-parallel workers, or an
            # implementation switch): said, not fatal, as it may not change the network.
            print(f"# note: {origin}: config key `{key}` is unknown to torch_gpt.py, ignored", file=sys.stderr)
            continue
        d = dst[k]
        if isinstance(d, dict):
            if not isinstance(v, dict):
                sys.exit(f"{origin}: config key `{key}` expects a table")
            merge(d, v, key, origin)
        elif isinstance(d, bool) or isinstance(v, bool):
            if not (isinstance(d, bool) and isinstance(v, bool)):
                sys.exit(f"{origin}: config key `{key}` expects a {type(d).__name__}, got {v!r}")
            dst[k] = v
        elif isinstance(d, float) and isinstance(v, (int, float)):
            dst[k] = float(v)
        elif type(d) is type(v):
            dst[k] = v
        else:
            sys.exit(f"{origin}: config key `{key}` expects a {type(d).__name__}, got {v!r}")


def parse_override(s):
    if "=" not in s:
        sys.exit(f"override `{s}` is not of the form key=value")
    key, raw = s.split("=", 1)
    key, raw = key.strip(), raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except Exception:
        value = raw  # a bare word, as the crate reads it
    table = cur = {}
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return table


def load_config(path, overrides):
    cfg = copy.deepcopy(DEFAULTS)
    with open(path, "rb") as f:
        merge(cfg, tomllib.load(f), "", path)
    for o in overrides:
        merge(cfg, parse_override(o), "", "--set")
    return cfg


def is_moe_layer(cfg, layer):
    n = cfg["model"]["moe_every"]
    return n > 0 and (layer + 1) % n == 0


def expert_hidden(cfg):
    h = cfg["model"]["moe"]["expert_hidden"]
    return 4 * cfg["model"]["n_embd"] if h == 0 else h


def tau_at(r, it):
    return max(r["tau_min"], r["tau0"] * math.exp(-r["tau_decay"] * it))


def lr_at(t, it):
    """nanoGPT's schedule as src/train/schedule.rs (only with --schedule)."""
    if it < t["warmup_iters"]:
        return t["lr"] * (it + 1) / (t["warmup_iters"] + 1)
    if it > t["lr_decay_iters"]:
        return t["min_lr"]
    span = max(t["lr_decay_iters"] - t["warmup_iters"], 1)
    coeff = 0.5 * (1.0 + math.cos(math.pi * (it - t["warmup_iters"]) / span))
    return t["min_lr"] + coeff * (t["lr"] - t["min_lr"])


# ----------------------------------------------------------------------------- data


def find_text(source, explicit):
    """The training text: --data, a local data.source, the hub cache of an hf:// source, or the
    shared copy of Tiny Shakespeare. None: random ids."""
    if explicit:
        return explicit
    cands = []
    if not source.startswith("hf:"):
        cands.append(source if os.path.isabs(source) else os.path.join(REPO, source))
    else:
        # hf://OWNER/NAME/FILE -> <hub cache>/datasets--OWNER--NAME/snapshots/*/FILE
        spec = source.split("://", 1)[-1].split("hf:", 1)[-1].lstrip("/")
        parts = spec.split("/")
        if len(parts) >= 3:
            repo_dir = f"datasets--{parts[0]}--{parts[1]}"
            fname = "/".join(parts[2:])
            hubs = [os.environ.get("HF_HUB_CACHE")]
            if os.environ.get("HF_HOME"):
                hubs.append(os.path.join(os.environ["HF_HOME"], "hub"))
            hubs += [
                os.path.expanduser("~/.cache/huggingface/hub"),
                os.path.join(REPO, "..", "shared", "data", "hf-cache", "hub"),
                "/work/shared/data/hf-cache/hub",
            ]
            for h in filter(None, hubs):
                snap = os.path.join(h, repo_dir, "snapshots")
                if os.path.isdir(snap):
                    for c in sorted(os.listdir(snap)):
                        cands.append(os.path.join(snap, c, fname))
    cands += [
        os.path.join(REPO, "data", "tinyshakespeare.txt"),
        os.path.join(REPO, "..", "shared", "data", "tinyshakespeare", "input.txt"),
        "/work/shared/data/tinyshakespeare/input.txt",
    ]
    for c in cands:
        if os.path.isfile(c):
            return follow_flattened_link(c)
    return None


def follow_flattened_link(path):
    """A hub-cache snapshot copied without symlinks holds the link text `../../blobs/<etag>` as a
    small plain file: follow it to the blob (as src/data/source.rs does)."""
    if os.path.getsize(path) > 512:
        return path
    with open(path, encoding="utf-8", errors="replace") as f:
        link = f.read()
    rest, ups = link, 0
    while rest.startswith("../"):
        rest, ups = rest[3:], ups + 1
    etag = rest[len("blobs/"):] if rest.startswith("blobs/") else ""
    if ups >= 2 and etag and all(ch.isalnum() or ch in "-_" for ch in etag):
        target = os.path.join(os.path.dirname(path), link)
        if os.path.isfile(target):
            return os.path.normpath(target)
    return path


class Batches:
    """Random (x, y) windows of block_size tokens from the training split (char tokenizer: the
    sorted character set of the training split, as the crate and nanoGPT), or random ids."""

    def __init__(self, path, train_fraction, vocab_default, block, batch, seed):
        self.block, self.batch = block, batch
        self.gen = torch.Generator().manual_seed(seed)
        if path:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            train = text[: int(math.floor(len(text) * train_fraction))]
            chars = sorted(set(train))
            stoi = {c: i for i, c in enumerate(chars)}
            self.ids = torch.tensor([stoi[c] for c in train], dtype=torch.long)
            self.vocab = len(chars)
            self.what = f"{path} (train split: {len(train)} chars, vocab {self.vocab})"
        else:
            self.vocab = vocab_default or 65
            self.ids = torch.randint(0, self.vocab, (1 << 20,), generator=self.gen)
            self.what = f"random ids in [0, {self.vocab})"

    def get(self, device):
        ix = torch.randint(0, len(self.ids) - self.block - 1, (self.batch,), generator=self.gen)
        offs = torch.arange(self.block + 1)
        w = self.ids[ix[:, None] + offs[None, :]]  # (B, T + 1)
        x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)


# ----------------------------------------------------------------------------- model


class Norm(nn.Module):
    def __init__(self, dim, kind, bias, eps):
        super().__init__()
        self.rms, self.eps = kind == "rms", eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if (bias and not self.rms) else None

    def forward(self, x):
        if self.rms:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def linear(i, o, bias, std):
    lin = nn.Linear(i, o, bias=bias)
    nn.init.normal_(lin.weight, 0.0, std)
    if bias:
        nn.init.zeros_(lin.bias)
    return lin


class Mlp(nn.Module):
    def __init__(self, cfg, hidden):
        super().__init__()
        m = cfg["model"]
        c, bias = m["n_embd"], m["bias"]
        proj_std = 0.02 / math.sqrt(2 * m["n_layer"])
        self.swiglu = m["moe"]["activation"] == "swiglu"
        self.c_fc = linear(c, hidden, bias, 0.02)
        if self.swiglu:
            self.c_gate = linear(c, hidden, bias, 0.02)
        self.c_proj = linear(hidden, c, bias, proj_std)

    def forward(self, x):
        h = self.c_fc(x)
        h = F.silu(self.c_gate(x)) * h if self.swiglu else F.gelu(h)  # exact (erf) GELU
        return self.c_proj(h)


class Rotary(nn.Module):
    """Half-split RoPE; tables computed in f64 and stored in f32 as src/nn/rotary.rs."""

    def __init__(self, head_size, max_t, theta):
        super().__init__()
        half = head_size // 2
        i = torch.arange(half, dtype=torch.float64)
        freq = 1.0 / theta ** (2.0 * i / head_size)
        a = torch.arange(max_t, dtype=torch.float64)[:, None] * freq[None, :]  # (T, hs/2)
        self.register_buffer("cos", a.cos().float(), persistent=False)
        self.register_buffer("sin", a.sin().float(), persistent=False)

    def forward(self, x):  # (B, nh, T, hs)
        t, half = x.shape[2], x.shape[3] // 2
        cos, sin = self.cos[:t], self.sin[:t]
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg, attn_impl):
        super().__init__()
        m = cfg["model"]
        c = m["n_embd"]
        self.n_head, self.dropout, self.impl = m["n_head"], m["dropout"], attn_impl
        self.n_kv = m["n_kv_head"] or m["n_head"]  # grouped-query attention when < n_head
        if m["n_head"] % self.n_kv:
            sys.exit(f"model.n_kv_head ({self.n_kv}) must divide model.n_head ({m['n_head']})")
        self.c_attn = linear(c, c + 2 * self.n_kv * (c // m["n_head"]), m["bias"], 0.02)
        self.c_proj = linear(c, c, m["bias"], 0.02 / math.sqrt(2 * m["n_layer"]))
        self.rotary = Rotary(c // m["n_head"], m["block_size"], m["rope_theta"]) if m["positions"] == "rotary" else None

    def forward(self, x):
        b, t, c = x.shape
        hs = c // self.n_head
        q, k, v = self.c_attn(x).split([c, self.n_kv * hs, self.n_kv * hs], dim=2)
        q = q.view(b, t, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k, v = (z.view(b, t, self.n_kv, hs).transpose(1, 2) for z in (k, v))  # (B, nkv, T, hs)
        if self.n_kv != self.n_head:  # each kv head serves n_head / n_kv consecutive query heads
            k, v = (z.repeat_interleave(self.n_head // self.n_kv, dim=1) for z in (k, v))
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        p = self.dropout if self.training else 0.0
        if self.impl == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:  # "manual": the crate's own formulation (additive -1e9 mask, explicit softmax)
            mask = torch.full((t, t), -1e9, device=x.device, dtype=x.dtype).triu(1)
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs)) + mask
            att = F.dropout(att.softmax(-1), p, self.training)
            y = att @ v
        y = y.transpose(1, 2).reshape(b, t, c)
        return F.dropout(self.c_proj(y), self.dropout, self.training)


class GumbelRouter(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        m, r = cfg["model"], cfg["model"]["router"]
        e = m["moe"]["num_experts"]
        if r["kind"] != "gumbel":
            sys.exit(f"torch_gpt.py implements only the gumbel router, not `{r['kind']}`")
        if not (1 <= r["top_m"] <= r["prefilter"] <= e):
            sys.exit(f"gumbel router needs 1 <= top_m <= prefilter <= num_experts")
        self.k, self.m, self.hard = r["prefilter"], r["top_m"], r["hard"]
        self.eval_sample = r["eval_mode"] == "sample"
        self.token = r["input"] == "token"
        if self.token:
            self.token_logits = nn.Parameter(torch.randn(m["vocab_size"], e) * r["init_std"])  # (V, E)
        else:
            self.weight = nn.Parameter(torch.randn(e, m["n_embd"]) * r["init_std"])  # (E, C)

    def forward(self, xf, ids, tau):
        """xf (N, C), ids (N,) -> (indices (N, m'), weights (N, m'), logits (N, E))."""
        logits = self.token_logits[ids] if self.token else xf @ self.weight.t()  # (N, E)
        k, m = self.k, self.m
        cand, cand_idx = logits.topk(k, dim=-1)  # (N, K), best first
        if self.training or self.eval_sample:
            u = torch.rand_like(cand).clamp_(1e-10, 1.0 - 1e-7)
            g = -torch.log(-torch.log(u))
        else:
            g = torch.zeros_like(cand)
        y = F.softmax((cand + g) * (1.0 / tau), dim=-1)  # (N, K)
        if not self.hard and m >= k:
            return cand_idx, y, logits
        sel = (cand.detach() + g).topk(m, dim=-1).indices  # (N, m) positions within K
        idx = cand_idx.gather(1, sel)  # (N, m) experts
        ys = y.gather(1, sel)
        w = ys - ys.detach() + 1.0 / m if self.hard else ys / ys.sum(-1, keepdim=True)
        return idx, w, logits


class MoeLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        mo = cfg["model"]["moe"]
        self.e = mo["num_experts"]
        self.router = GumbelRouter(cfg)
        self.experts = nn.ModuleList(Mlp(cfg, expert_hidden(cfg)) for _ in range(self.e))
        self.capacity_factor, self.balance_coef, self.z_coef = mo["capacity_factor"], mo["balance_coef"], mo["z_coef"]

    def forward(self, x, ids, tau):
        b, t, c = x.shape
        n, e = b * t, self.e
        xf = x.reshape(n, c)
        idx, w, logits = self.router(xf, ids.reshape(n), tau)
        m = idx.shape[1]
        # Dispatch: the N*m (token, slot) pairs in slot-major order (every first choice before any
        # second, as src/moe/dispatch.rs), stably sorted by expert.
        flat_e = idx.t().reshape(-1)  # (m*N)
        flat_tok = torch.arange(n, device=x.device).repeat(m)
        flat_w = w.t().reshape(-1)
        order = torch.argsort(flat_e, stable=True)
        counts = torch.bincount(flat_e, minlength=e)
        tok, ws, es = flat_tok[order], flat_w[order], flat_e[order]
        if self.capacity_factor > 0:
            cap = max(1, math.ceil(self.capacity_factor * n * m / e))
            starts = torch.cumsum(counts, 0) - counts
            keep = (torch.arange(n * m, device=x.device) - starts[es]) < cap
            tok, ws = tok[keep], ws[keep]
            counts = counts.clamp(max=cap)
        xs = xf.index_select(0, tok)  # (N_kept, C), grouped by expert
        outs, start = [], 0
        for expert, n_e in zip(self.experts, counts.tolist()):  # one host sync, as the crate's plan
            if n_e:
                outs.append(expert(xs[start : start + n_e]))
                start += n_e
        ys = torch.cat(outs, 0) * ws[:, None]
        y = torch.zeros_like(xf).index_add(0, tok, ys)
        # Aux losses (src/moe/losses.rs): Switch balance E * sum_i f_i P_i (f hard, P = mean softmax
        # over all E experts), ST-MoE z-loss mean logsumexp^2.
        probs = F.softmax(logits, dim=-1)
        f = torch.bincount(idx.reshape(-1), minlength=e).to(probs.dtype) / (n * m)
        balance = (probs.mean(0) * f).sum() * e
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        aux = self.balance_coef * balance + self.z_coef * z
        # The crate's per-call routing statistics (detached): mean entropy and top-1 probability.
        with torch.no_grad():
            pd = probs.detach()
            stats = ((pd * pd.clamp(1e-12, 1.0).log()).sum(-1).neg().mean(), pd.max(-1).values.mean())
        return y.view(b, t, c), aux, stats


class Block(nn.Module):
    def __init__(self, cfg, i, attn_impl):
        super().__init__()
        m = cfg["model"]
        self.ln_1 = Norm(m["n_embd"], m["norm"], m["bias"], m["norm_eps"])
        self.attn = CausalSelfAttention(cfg, attn_impl)
        self.ln_2 = Norm(m["n_embd"], m["norm"], m["bias"], m["norm_eps"])
        if is_moe_layer(cfg, i):
            self.moe = MoeLayer(cfg)
        else:
            self.mlp = Mlp(cfg, 4 * m["n_embd"])
        self.dropout = m["dropout"]


class Gpt(nn.Module):
    def __init__(self, cfg, attn_impl="sdpa"):
        super().__init__()
        m = cfg["model"]
        self.cfg = cfg
        self.wte = nn.Embedding(m["vocab_size"], m["n_embd"])
        nn.init.normal_(self.wte.weight, 0.0, 0.02)
        if m["positions"] == "learned":
            self.wpe = nn.Embedding(m["block_size"], m["n_embd"])
            nn.init.normal_(self.wpe.weight, 0.0, 0.02)
        else:
            self.wpe = None
        self.h = nn.ModuleList(Block(cfg, i, attn_impl) for i in range(m["n_layer"]))
        # (V, C) untied output layer, or None: the LM head is wte (model.tie_embeddings).
        self.lm_head = None if m["tie_embeddings"] else linear(m["n_embd"], m["vocab_size"], False, 0.02)
        self.ln_f = Norm(m["n_embd"], m["norm"], m["bias"], m["norm_eps"])
        self.dropout = m["dropout"]

    def forward(self, idx, tau):
        b, t = idx.shape
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(t, device=idx.device))
        x = F.dropout(x, self.dropout, self.training)
        aux = x.new_zeros(())
        for blk in self.h:
            x = x + blk.attn(blk.ln_1(x))
            h = blk.ln_2(x)
            if hasattr(blk, "moe"):
                f, a, _stats = blk.moe(h, idx, tau)
                aux = aux + a
            else:
                f = blk.mlp(h)
            x = x + F.dropout(f, self.dropout, self.training)
        x = self.ln_f(x)
        logits = F.linear(x, self.wte.weight) if self.lm_head is None else self.lm_head(x)
        return logits, aux


def make_optimizer(model, cfg, kind, device):
    """AdamW as src/train/optim.rs: decay only on rank >= 2 tensors; router lr x lr_scale and
    decay x decay_scale (parameters named `.moe.router.`)."""
    t, r = cfg["train"], cfg["model"]["router"]
    groups = {}
    for name, p in model.named_parameters():
        router = ".moe.router." in f".{name}"
        scale = r["lr_scale"] if router else 1.0
        wd = t["weight_decay"] * (r["decay_scale"] if router else 1.0) if p.dim() >= 2 else 0.0
        groups.setdefault((scale, wd), []).append(p)
    param_groups = [
        {"params": ps, "lr": t["lr"] * scale, "lr_scale": scale, "weight_decay": wd} for (scale, wd), ps in groups.items()
    ]
    kw = {"betas": (t["beta1"], t["beta2"]), "eps": t["eps"]}
    if kind == "fused":
        try:
            return torch.optim.AdamW(param_groups, fused=True, **kw), "fused"
        except (RuntimeError, TypeError, ValueError):
            kind = "foreach"
    if kind == "foreach":
        return torch.optim.AdamW(param_groups, foreach=True, **kw), "foreach"
    return torch.optim.AdamW(param_groups, foreach=False, **kw), "for-loop"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="TOML config (default configs/shakespeare-char-cpu.toml)")
    ap.add_argument("--config-gpu", action="store_true", help="use configs/shakespeare-char-gpu.toml (device from it: cuda)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--dense", action="store_true", help="the dense twin: model.moe_every=0")
    ap.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: train.device of the config)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--lr", type=float, default=None, help="constant learning rate (default train.lr)")
    ap.add_argument("--schedule", action="store_true", help="nanoGPT warmup + cosine lr (train.*) instead of constant")
    ap.add_argument("--no-clip", action="store_true", help="no gradient clipping (examples/bench_step does not clip)")
    ap.add_argument("--attn", choices=["sdpa", "manual"], default="sdpa",
                    help="sdpa: F.scaled_dot_product_attention(is_causal) as nanoGPT; manual: mask + softmax as the crate")
    ap.add_argument("--adamw", choices=["fused", "foreach", "forloop"], default="fused")
    ap.add_argument("--data", default=None, help="training text (default: found from data.source)")
    ap.add_argument("--random-data", action="store_true", help="random token ids instead of text")
    ap.add_argument("--log-every", type=int, default=0, help="print the loss every N steps")
    ap.add_argument("--list-params", action="store_true", help="print every parameter's name and shape")
    a = ap.parse_args()

    if tomllib is None:
        sys.exit("torch_gpt.py needs Python >= 3.11 (tomllib)")
    path = a.config or os.path.join(REPO, "configs", "shakespeare-char-gpu.toml" if a.config_gpu else "shakespeare-char-cpu.toml")
    sets = list(a.set) + (["model.moe_every=0"] if a.dense else [])
    cfg = load_config(path, sets)
    m, t = cfg["model"], cfg["train"]
    if cfg["data"]["tokenizer"] != "char" and not a.random_data:
        sys.exit("torch_gpt.py has the char tokenizer only; pass --random-data with --set model.vocab_size=N")
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device or t["device"])
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: torch.cuda.is_available() is False")
        torch.backends.cuda.matmul.allow_tf32 = bool(t["tf32"])
        torch.backends.cudnn.allow_tf32 = bool(t["tf32"])
    elif device.type != "cpu":
        sys.exit(f"device {device} not supported here (cpu or cuda)")
    torch.manual_seed(cfg["seed"])

    text = None if a.random_data else find_text(cfg["data"]["source"], a.data)
    data = Batches(text, cfg["data"]["train_fraction"], m["vocab_size"], m["block_size"], t["batch_size"], cfg["seed"])
    if m["vocab_size"] == 0:
        m["vocab_size"] = data.vocab
    elif m["vocab_size"] < data.vocab:
        sys.exit(f"model.vocab_size = {m['vocab_size']} is below the tokenizer's {data.vocab}")

    model = Gpt(cfg, a.attn).to(device)
    model.train()
    opt, opt_kind = make_optimizer(model, cfg, a.adamw, device)
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    moe_layers = [i for i in range(m["n_layer"]) if is_moe_layer(cfg, i)]
    if a.list_params:
        for name, p in model.named_parameters():
            print(f"{name}\t{tuple(p.shape)}")
    print(
        f"# torch {torch.__version__} on {device} ({torch.get_num_threads()} threads, cpu capability "
        f"{torch.backends.cpu.get_cpu_capability()}); config {os.path.relpath(path, REPO)} {' '.join(sets)}".rstrip()
    )
    print(
        f"# {m['n_layer']} layers, C={m['n_embd']}, {m['n_head']} heads, T={m['block_size']}, "
        f"B={t['batch_size']} x {t['grad_accum']} micro-batches, "
        f"V={m['vocab_size']}, MoE blocks (0-based) {moe_layers}, E={m['moe']['num_experts']}, hidden {expert_hidden(cfg)}, "
        f"top_m={m['router']['top_m']}/K={m['router']['prefilter']}, router input {m['router']['input']}; "
        f"{n_params} parameters; attention {a.attn}; AdamW {opt_kind}; clip {'off' if a.no_clip else t['grad_clip']}"
    )
    print(f"# data: {data.what}")

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    base_lr = a.lr if a.lr is not None else t["lr"]
    fwd = bwd = optt = 0.0
    losses = []
    total = a.warmup + a.steps
    accum = t["grad_accum"]
    for step in range(total):
        tau = tau_at(m["router"], step)
        lr = lr_at(t, step) if a.schedule else base_lr
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        batches = [data.get(device) for _ in range(accum)]
        sync()
        tf = tb = lv = 0.0
        cur = time.perf_counter()
        for x, y in batches:  # micro-batches (train.grad_accum); gradients summed
            logits, aux = model(x, tau)
            ce = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
            loss = (ce + aux) / accum
            lv += ce.item() / accum  # a sync point, as the crate's loss.to_scalar()
            ta = time.perf_counter()
            loss.backward()
            sync()
            tz = time.perf_counter()
            tf, tb, cur = tf + (ta - cur), tb + (tz - ta), tz
        t2 = time.perf_counter()
        if not a.no_clip and t["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, t["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        if not math.isfinite(lv):
            sys.exit(f"non-finite loss at step {step}")
        losses.append(lv)
        if step >= a.warmup:
            fwd, bwd, optt = fwd + tf, bwd + tb, optt + (t3 - t2)
        if a.log_every and (step % a.log_every == 0 or step == total - 1):
            print(f"step {step}: loss {lv:.4f} (aux {aux.item():.4f}, tau {tau:.3f}, lr {lr:.2e})")
    n = max(a.steps, 1)
    tok = a.steps * t["batch_size"] * accum * m["block_size"]
    secs = fwd + bwd + optt
    print(
        f"tok_per_s={tok / secs if secs > 0 else float('nan'):.1f} step_ms={secs / n * 1e3:.2f} fwd_ms={fwd / n * 1e3:.2f} "
        f"bwd_ms={bwd / n * 1e3:.2f} opt_ms={optt / n * 1e3:.2f} params={n_params} threads={torch.get_num_threads()} "
        f"loss_first={losses[0]:.4f} loss_last={losses[-1]:.4f}"
    )


if __name__ == "__main__":
    main()
