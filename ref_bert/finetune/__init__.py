"""Fine-tuning: ``ref-bert finetune`` and its library (:func:`finetune`).

    >>> from ref_bert.finetune import finetune
    >>> result = finetune(task="classification", out="runs/cls")          # doctest: +SKIP
    >>> result.scores                                                     # doctest: +SKIP

The package, in reading order:

    data.py      the JSON-lines schema of each task, reading and validating a whole file, encoding it
    embedded.py  the shipped default data of each task, and how it is made from the packaged corpus
    heads.py     the head each task trains (the model's own heads, ref_bert/tasks.py) and putting it on a model
    metrics.py   each task's scores (scikit-learn, scipy, seqeval; SQuAD's rules)
    loop.py      finetune(): prepare, pretraining's loop with a fine-tuning step, evaluation

The run directory is pretraining's (:mod:`ref_bert.pretrain.rundir`: atomic checkpoints, OUT/latest,
exact resume; the model files hold the task's head, its config.json names the architecture) plus
``task.json`` (task, num_labels, class names) in every checkpoint and in OUT, and OUT/eval.json with
the scores.
"""
from .data import SCHEMAS, TASKS, TaskData, encode, load_task_file, read_jsonl
from .embedded import embedded_path, make_examples
from .heads import TASK_HEADS, with_task_head
from .loop import EVAL_NAME, FinetuneConfig, FinetuneResult, evaluate, finetune

__all__ = ["TASKS", "SCHEMAS", "TaskData", "TASK_HEADS", "with_task_head", "FinetuneConfig", "FinetuneResult", "finetune", "evaluate",
           "encode", "load_task_file", "read_jsonl", "embedded_path", "make_examples", "EVAL_NAME"]
