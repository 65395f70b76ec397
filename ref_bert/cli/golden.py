"""``ref-bert golden``: write a golden file (the work is in :mod:`ref_bert.golden`).

    ref-bert golden --config tiny --out tiny.golden.safetensors [--seed 0 --dtype float64 --batch-size 2 --seq-len 16 --steps 2]
    ref-bert golden --hf path/to/model --out model.golden.safetensors
    ref-bert golden --hf path/to/model --text "Your sentence." --out model.golden.safetensors

``--config`` takes a preset, a ref-bert config.json file or a model directory (its config only: the weights
are drawn from --seed); ``--hf`` takes a model directory of any kind ref-bert writes or reads (its own
``save_model``/pretrain output, ``save_hf`` output, a Hugging Face directory) and uses its weights.
"""
from __future__ import annotations

import sys

from . import DTYPE_RULE, add_progress_flag, add_text_arguments, describe_text_batch, read_texts

LARGE_FILE_BYTES = 100 * 2**20   # above this, the size is announced before the file is written


def add_arguments(parser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", metavar="PRESET|FILE|DIR",
                     help="a ref-bert preset (e.g. tiny, albert-base), a config.json file, or a model directory "
                          "(its config; weights from --seed)")
    src.add_argument("--hf", metavar="DIR",
                     help="a model directory with weights: ref-bert's (save_model, pretrain), save_hf's, or a "
                          "Hugging Face ALBERT/BERT one")
    parser.add_argument("--out", required=True, metavar="FILE", help="the golden .safetensors file to write")
    parser.add_argument("--seed", type=int, default=0, help="weights (--config) and inputs seed")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64",
                        help=f"default float64; the rule: {DTYPE_RULE}")
    parser.add_argument("--backend", default="numpy", help="numpy or cupy")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences in the batch")
    parser.add_argument("--seq-len", type=int, default=16, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=1, help="optimiser steps K")
    add_text_arguments(parser, "record")
    add_progress_flag(parser)


def announce_size(path, nbytes: int, out=None) -> None:
    """The line printed on stderr before a large golden file is written."""
    if nbytes > LARGE_FILE_BYTES:
        print(f"golden: about {nbytes / 1e6:.0f} MB will be written to {path}", file=out or sys.stderr, flush=True)


def run(args) -> int:
    import json

    from ref_bert.golden import make_inputs, text_inputs, write_golden
    from ref_bert.model import Model

    from pathlib import Path

    from . import resolve_config

    if Path(args.out).is_dir():   # before the work, not after it
        raise ValueError(f"--out {args.out} is a directory; expected the path of the golden file to write")
    texts = read_texts(args)
    if args.config is not None:
        if texts is not None:
            raise ValueError("--text and --text-file need --hf DIR (the checkpoint whose tokenizer reads them)")
        config, source = resolve_config(args.config)
        model = Model(config, backend=args.backend, dtype=args.dtype, seed=args.seed)
    else:
        from ref_bert.checkpoint import HF_DIRECTORY, describe_kind, load_any

        model, kind = load_any(args.hf, backend=args.backend, dtype=args.dtype, seed=args.seed,
                               tokenizer=texts is not None)
        print(f"golden: found {describe_kind(kind)} at {args.hf}", file=sys.stderr)
        source = f"{'hf' if kind == HF_DIRECTORY else 'ref-bert'}:{args.hf}"
    if texts is None:
        inputs = make_inputs(model.config, args.batch_size, args.seq_len, args.seed, dtype=model.dtype.name)
    else:
        from ref_bert.examples import text_batch

        inputs = text_batch(model.tokenizer, model.config, texts, truncation=args.truncate, seed=args.seed)
        for line in describe_text_batch(model.tokenizer, inputs):
            print(f"golden: {line[len('note: '):]}", file=sys.stderr)
        inputs = text_inputs(model.config, inputs, args.seed, model.dtype.name)
    meta = write_golden(args.out, model, inputs, steps=args.steps, seed=args.seed, source=source,
                        progress=not args.no_progress, before_write=lambda n: announce_size(args.out, n))
    order = json.loads(meta["tensor_order"])
    print(f"wrote {args.out}: {len(order)} tensors ({sum(n.startswith('forward/') for n in order)} activations, "
          f"{sum(n.startswith('grads/') for n in order)} gradients, {args.steps} optimiser steps), "
          f"{args.dtype}, {source}")
    return 0
