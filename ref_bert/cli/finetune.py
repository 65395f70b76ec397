"""``ref-bert finetune``: fine-tune a task head (:mod:`ref_bert.finetune`).

    ref-bert finetune --task classification                      # embedded data, tiny config from scratch
    ref-bert finetune --task qa --train train.jsonl --eval dev.jsonl --init runs/pretrain
    ref-bert finetune --task tokens --out runs/ner --until 100   # stop early with a checkpoint
    ref-bert finetune --out runs/ner --resume                    # continue with the recorded settings
    mpiexec -n 2 ref-bert finetune --grad-accum 2                # data parallel, bit-identical to one process
"""
from __future__ import annotations


from . import add_run_arguments, parse_override
from ..config import PRESETS
from ..model import DTYPES
from ..optim import OPTIMIZERS

# Flags whose value a resume takes from the checkpoint unless given (argparse default None).
RECORDED_FLAGS = ("task", "train", "eval", "init", "config", "num_labels", "steps", "batch_size", "grad_accum",
                  "seq_len", "optimizer", "lr", "warmup", "seed", "dtype", "label_smoothing", "mask_prob",
                  "checkpoint_every", "keep_checkpoints", "log_every")


def add_arguments(parser) -> None:
    from ..finetune import SCHEMAS, TASKS, FinetuneConfig

    d = FinetuneConfig()
    parser.epilog = ("JSON-lines schemas (one object per line): "
                     + "; ".join(f"{task}: {schema}" for task, schema in SCHEMAS.items())
                     + ". Without --train the task's embedded data is used (made from the packaged corpus; "
                       "see ref_bert/finetune/embedded.py). Writes OUT/checkpoints, OUT/metrics.jsonl and "
                       "OUT/eval.json (also printed as a table).")
    a = parser.add_argument
    a("--task", default=None, metavar="TASK", help=f"one of {', '.join(TASKS)} (default {d.task})")
    a("--train", default=None, metavar="FILE", help="training JSON lines (default: the task's embedded data)")
    a("--eval", default=None, metavar="FILE",
      help="evaluation JSON lines (default: the embedded evaluation file when --train is not given, else none)")
    a("--init", default=None, metavar="DIR",
      help="start from a model directory: ref-bert's (e.g. a pretrain OUT) or Hugging Face's; its encoder gets "
           "the task's head (default: a new model from --config)")
    a("--config", default=None, metavar="PRESET|FILE|DIR",
      help=f"model config without --init: a preset ({', '.join(sorted(PRESETS))}), a config.json or a model "
           f"directory (default {d.config})")
    a("--set", action="append", default=[], metavar="KEY=VALUE", dest="config_set",
      help="override a config field with --config, e.g. --set hidden_dropout_prob=0 (repeatable; default: none)")
    a("--tokenizer", default=None, metavar="FILE|DIR",
      help="a SentencePiece model file, or a checkpoint directory whose tokenizer to use (WordPiece vocab.txt / "
           "tokenizer.json, spiece.model) (default: the --init directory's own tokenizer, else a SentencePiece "
           "model trained on the packaged corpus)")
    a("--num-labels", type=int, default=None, help="classes of the head (default: from the training file)")
    a("--out", default=d.out, metavar="DIR", help=f"output directory (default {d.out})")
    a("--backend", default=None, help="numpy or cupy (default: $REF_BERT_BACKEND or numpy)")
    from . import DTYPE_RULE

    a("--dtype", default=None, choices=DTYPES, help=f"(default {d.dtype}: {DTYPE_RULE})")
    a("--steps", type=int, default=None, help=f"optimiser steps (default {d.steps})")
    a("--batch-size", type=int, default=None, help=f"examples per micro-batch (default {d.batch_size})")
    a("--grad-accum", type=int, default=None, help=f"micro-batches per step (default {d.grad_accum})")
    a("--seq-len", type=int, default=None, help=f"tokens per example, [CLS] and [SEP]s included (default {d.seq_len})")
    a("--optimizer", default=None, choices=OPTIMIZERS,
      help=f"(default {d.optimizer}: BERT's AdamW, global-norm clipping 1.0, no decay on LayerNorm and biases)")
    a("--lr", type=float, default=None, help="peak learning rate (default: 5e-5 with --init, 1e-3 without)")
    a("--warmup", type=int, default=None, help="warmup steps of the linear schedule (default: 10%% of --steps)")
    a("--seed", type=int, default=None, help=f"weights, head, dropout and data order (default {d.seed})")
    a("--label-smoothing", type=float, default=None, help=f"seq2seq only (default {d.label_smoothing})")
    a("--mask-prob", type=float, default=None,
      help=f"seq2seq only: share of target tokens predicted per example (default {d.mask_prob})")
    a("--checkpoint-every", type=int, default=None, metavar="N", help=f"(default {d.checkpoint_every})")
    a("--keep-checkpoints", type=int, default=None, metavar="K", help=f"0 keeps all (default {d.keep_checkpoints})")
    a("--log-every", type=int, default=None, metavar="N", help=f"(default {d.log_every})")
    add_run_arguments(parser, "fine-tuning")



def run(args) -> int:
    from ..finetune import FinetuneConfig, finetune
    from ..finetune.metrics import format_table

    given = {name: getattr(args, name) for name in RECORDED_FLAGS if getattr(args, name) is not None}
    if args.config_set:
        given["config_overrides"] = dict(parse_override(text) for text in args.config_set)
    base = FinetuneConfig(out=args.out, tokenizer=args.tokenizer, backend=args.backend, resume=args.resume,
                          until=args.until, threads=args.threads, comm=args.comm, overwrite=args.overwrite,
                          progress=not args.no_progress)
    try:
        result = finetune(base, **given)
    except KeyboardInterrupt:
        return 130
    if result.rank != 0:   # a data-parallel run: rank 0 reports
        return 0
    print(f"done: step {result.step} in {result.wall_time:.1f} s; checkpoint {result.checkpoint}")
    if result.history:
        print(f"loss: {result.history[0]['loss']:.4f} (step {result.history[0]['step']}) -> "
              f"{result.history[-1]['loss']:.4f} (step {result.history[-1]['step']})")
    if result.scores is not None:
        print(format_table(result.scores, f"evaluation ({result.out_dir / 'eval.json'}):"))
    print(f"model directory: {result.out_dir} (config.json, model.safetensors, the tokenizer's files, task.json)")
    return 0
