"""Decoding speed with and without the incremental key/value cache (not a test; prints a table).

    python benchmarks/decode_cache.py                       # target lengths 16, 64, 256
    python benchmarks/decode_cache.py --lengths 16 64 --backend cupy

Greedy decoding of a fixed number of tokens (min_length = max_length, so [SEP] never ends it early)
from a randomly initialised model. Without the cache every step re-runs the whole sequence (step cost
grows with the length, total cost with its square); with it a step runs two new positions against the
cached keys and values (step cost linear in the length, dominated by position-wise work here).
Both runs must produce the same tokens; the script checks it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from ref_bert import Config, Model  # noqa: E402
from ref_bert.generate import generate  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--source-length", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=30000)
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)

    cfg = Config(vocab_size=args.vocab, embedding_size=128, hidden_size=args.hidden, num_hidden_layers=args.layers,
                 num_attention_heads=args.hidden // 64, intermediate_size=4 * args.hidden,
                 max_position_embeddings=512, type_vocab_size=6)
    model = Model(cfg, backend=args.backend, dtype=args.dtype, seed=0)
    rng = np.random.default_rng(0)
    sources = [[int(t) for t in rng.integers(5, args.vocab, size=args.source_length)] for _ in range(args.batch)]
    print(f"model: H={cfg.hidden_size} E={cfg.embedding_size} L={cfg.num_hidden_layers} heads={cfg.num_attention_heads} "
          f"I={cfg.intermediate_size} V={cfg.vocab_size}; backend {args.backend}, {args.dtype}; batch {args.batch}, "
          f"source {args.source_length} tokens; greedy")
    generate(model, sources, max_length=4, min_length=4)                  # warm-up
    generate(model, sources, max_length=4, min_length=4, use_cache=False)
    print(f"{'target':>7} {'no cache (s)':>13} {'cache (s)':>10} {'speed-up':>9} {'ms/token no cache':>18} "
          f"{'ms/token cache':>15}")
    for length in args.lengths:
        times, outputs = {}, {}
        for use_cache in (False, True):
            model.backend.synchronize()
            start = time.perf_counter()
            outputs[use_cache] = generate(model, sources, max_length=length, min_length=length, use_cache=use_cache)
            model.backend.synchronize()
            times[use_cache] = time.perf_counter() - start
        if outputs[True].sequences != outputs[False].sequences:
            raise SystemExit(f"cached and uncached decoding disagree at target length {length}")
        print(f"{length:>7} {times[False]:>13.3f} {times[True]:>10.3f} {times[False] / times[True]:>8.1f}x "
              f"{1000 * times[False] / length:>18.2f} {1000 * times[True] / length:>15.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
