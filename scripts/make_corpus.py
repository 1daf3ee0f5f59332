#!/usr/bin/env python3
"""Synthesizes a text corpus of a given size for scripts/bench_prepare.sh (numpy needed).

Not a repeated text (a BPE word cache would flatter every tokenizer on that): 30,000 made-up words
(1-4 random syllables, lower-case and capitalized forms) drawn with Zipf frequencies (p ~ 1/(r+2.7),
as in English), 60 common English words among the most frequent, punctuation, line breaks, and
documents of ~150 words separated by "\n<|endoftext|>\n" as in TinyStories. Seeded: the same
arguments give the same bytes.

usage: make_corpus.py MEGABYTES OUT [SEED]
"""
import sys

import numpy as np


def vocabulary(rng, n=30_000):
    common = (
        "the a and to of in was he she it his her they that with for on as at said but had "
        "one day little big very so then there were not all when what will up out like can "
        "would could time mom dad friend happy saw went wanted go play tree sun ball home"
    ).split()
    cons = list("bcdfghjklmnprstvwz") + ["ch", "sh", "th", "st", "br", "pl", "tr"]
    vows = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "y"]
    words, seen = list(common), set(common)
    while len(words) < n:
        k = int(rng.integers(1, 5))
        w = "".join(cons[rng.integers(len(cons))] + vows[rng.integers(len(vows))] for _ in range(k))
        if rng.random() < 0.3:
            w += cons[rng.integers(len(cons))]
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def main():
    megabytes, out = float(sys.argv[1]), sys.argv[2]
    rng = np.random.default_rng(int(sys.argv[3]) if len(sys.argv) > 3 else 1234)
    words = vocabulary(rng)
    n = len(words)
    seps = [" ", ", ", ". ", ".\n", "! ", "? ", ".\n<|endoftext|>\n"]
    sep_p = np.array([0.86, 0.05, 0.065, 0.015, 0.005, 0.005, 0.0])
    # Entries: n lower-case words, n capitalized, then the separators.
    entries = words + [w[:1].upper() + w[1:] for w in words] + seps
    blobs = [e.encode() for e in entries]
    lens = np.array([len(b) for b in blobs], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    flat = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    ranks = np.arange(n)
    p = 1.0 / (ranks + 2.7)
    p /= p.sum()
    target = int(megabytes * 1e6)
    written = 0
    capital_next = True
    with open(out, "wb") as f:
        while written < target:
            m = 1 << 20
            w = rng.choice(n, size=m, p=p)
            s = rng.choice(len(seps), size=m, p=sep_p / sep_p.sum())
            # A sentence end closes the document with probability 0.08 (~150 words a document).
            ends = (s == 2) | (s == 3)
            s[ends & (rng.random(m) < 0.08)] = len(seps) - 1
            # Capitalize the word after a sentence end (and the first word).
            after_end = np.concatenate([[capital_next], s[:-1] >= 2])
            capital_next = bool(s[-1] >= 2)
            w = w + after_end * n
            seq = np.empty(2 * m, dtype=np.int64)
            seq[0::2], seq[1::2] = w, 2 * n + s
            L = lens[seq]
            total = int(L.sum())
            offs = np.repeat(starts[seq] - np.concatenate([[0], np.cumsum(L)[:-1]]), L)
            chunk = flat[offs + np.arange(total)]
            chunk = chunk[: max(0, min(total, target - written))]
            f.write(chunk.tobytes())
            written += len(chunk)
    print(f"wrote {written} bytes to {out}")


if __name__ == "__main__":
    main()
