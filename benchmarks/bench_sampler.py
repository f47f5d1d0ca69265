"""The hf engine's per-step sampling, against the sampler it replaced, in one process.

The engine samples every running row once per decoding step. The previous sampler sorted
each row's whole vocabulary (for top-p) and drew row by row; the current one
(`service.engines.hf.sample_tokens`) skips the sort for rows with top_p >= 1 (nothing to
truncate) and draws all unseeded rows in one call. A profile of the engine alone (py-spy,
16 concurrent requests, tiny model) had put sampling at 31 % of the engine thread.

Rows: 16 rows of the tiny model's vocabulary, temperature 1, top_p 1 (the API's default),
and the same with top_p 0.9 (the sort is needed then); interleaved repeats, medians.

    python benchmarks/bench_sampler.py [--rows 16 --repeats 400]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loraloop.core.sampling import outside_nucleus
from loraloop.devtools.tiny_model import ensure_tiny_model
from loraloop.service.engines.hf import MIN_SAMPLING_TEMPERATURE, sample_tokens


def previous_sampler(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline: what sample_tokens did before (sort every row, draw row by row)."""
    logits = logits.float()
    tokens = logits.argmax(-1)
    logprobs = logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
    rows = torch.arange(logits.shape[0])
    scaled = logits[rows] / temperature[rows, None].clamp(min=MIN_SAMPLING_TEMPERATURE)
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    outside = outside_nucleus(sorted_logits.softmax(-1), top_p[rows])
    logp_sorted = sorted_logits.masked_fill(outside, float("-inf")).log_softmax(-1)
    for j in range(len(rows)):
        pos = int(torch.multinomial(logp_sorted[j].exp(), 1))
        tokens[j] = order[j, pos]
        logprobs[j] = logp_sorted[j, pos]
    return tokens, logprobs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the engine thread's share of a 2-core machine
    config = json.loads((ensure_tiny_model(progress=False) / "config.json").read_text())
    vocab = config["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(args.rows, vocab, generator=gen) * 4
    temperature = torch.ones(args.rows)
    print(f"{args.rows} rows x vocabulary {vocab}, medians of {args.repeats} interleaved calls")
    for p in (1.0, 0.9):
        top_p = torch.full((args.rows,), p)
        old, new = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            previous_sampler(logits, temperature, top_p)
            old.append(time.perf_counter() - t)
            t = time.perf_counter()
            sample_tokens(logits, temperature, top_p, [None] * args.rows)
            new.append(time.perf_counter() - t)
        o, n = statistics.median(old), statistics.median(new)
        print(
            f"  top_p {p}: previous {1e6 * o:7.0f} us, now {1e6 * n:7.0f} us a step "
            f"({o / n:.2f}x faster)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
