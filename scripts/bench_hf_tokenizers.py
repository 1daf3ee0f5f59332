#!/usr/bin/env python3
"""Hugging Face `tokenizers` (Python) on the same text and tokenizer.json as `gumbel-moe prepare`:
documents split at <|endoftext|> and trimmed (as prepare does), encoded with encode_batch_fast in
batches, all cores (rayon inside tokenizers). Prints one JSON line: bytes, seconds (whole: read,
split, encode), encode-only seconds, MB/s, tokens (without end-of-text tokens), documents.

usage: bench_hf_tokenizers.py TOKENIZER_JSON CORPUS [BATCH_MB]
"""
import json
import sys
import time

from tokenizers import Tokenizer


def main():
    tok = Tokenizer.from_file(sys.argv[1])
    path = sys.argv[2]
    batch_bytes = int(float(sys.argv[3]) * 1e6) if len(sys.argv) > 3 else 8_000_000
    sep = "<|endoftext|>"
    t0 = time.perf_counter()
    enc_s, tokens, docs, nbytes, rest = 0.0, 0, 0, 0, ""
    with open(path, encoding="utf-8") as f:
        while True:
            chunk = f.read(batch_bytes)
            nbytes += len(chunk.encode()) if chunk else 0
            text = rest + chunk
            parts = text.split(sep)
            rest = parts.pop() if chunk else ""
            batch = [d.strip() for d in parts]
            batch = [d for d in batch if d]
            if batch:
                t1 = time.perf_counter()
                out = tok.encode_batch_fast(batch, add_special_tokens=False)
                tokens += sum(len(e.ids) for e in out)
                enc_s += time.perf_counter() - t1
                docs += len(batch)
            if not chunk:
                break
    wall = time.perf_counter() - t0
    print(json.dumps({"bytes": nbytes, "seconds": wall, "encode_seconds": enc_s, "mb_per_s": nbytes / 1e6 / wall,
                      "tokens": tokens, "documents": docs}))


if __name__ == "__main__":
    main()
