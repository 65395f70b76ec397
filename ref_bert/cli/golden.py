"""``ref-bert golden``: write a golden file (the work is in :mod:`ref_bert.golden`).

    ref-bert golden --config tiny --out tiny.golden.safetensors [--seed 0 --dtype float64 --batch 2 --seq-len 16 --steps 2]
    ref-bert golden --hf path/to/hf-model --out model.golden.safetensors
"""
from __future__ import annotations


def add_arguments(parser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", metavar="PRESET", help="a ref-bert preset (e.g. tiny, albert-base)")
    src.add_argument("--hf", metavar="DIR", help="a Hugging Face ALBERT/BERT model directory")
    parser.add_argument("--out", required=True, metavar="FILE", help="the golden .safetensors file to write")
    parser.add_argument("--seed", type=int, default=0, help="weights (presets) and inputs seed (default 0)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64", help="default float64")
    parser.add_argument("--backend", default="numpy", help="numpy (default) or cupy")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    parser.add_argument("--seq-len", type=int, default=16, help="sequence length (default 16)")
    parser.add_argument("--steps", type=int, default=1, help="optimiser steps K (default 1)")


def run(args) -> int:
    import json

    from ref_bert.config import Config
    from ref_bert.golden import make_inputs, write_golden
    from ref_bert.model import Model

    if args.config is not None:
        model = Model(Config.preset(args.config), backend=args.backend, dtype=args.dtype, seed=args.seed)
        source = f"preset:{args.config}"
    else:
        model = Model.from_hf(args.hf, backend=args.backend, dtype=args.dtype, seed=args.seed)
        source = f"hf:{args.hf}"
    inputs = make_inputs(model.config, args.batch, args.seq_len, args.seed)
    meta = write_golden(args.out, model, inputs, steps=args.steps, seed=args.seed, source=source)
    order = json.loads(meta["tensor_order"])
    print(f"wrote {args.out}: {len(order)} tensors ({sum(n.startswith('forward/') for n in order)} activations, "
          f"{sum(n.startswith('grads/') for n in order)} gradients, {args.steps} optimiser steps), "
          f"{args.dtype}, {source}")
    return 0
