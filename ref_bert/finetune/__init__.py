"""Fine-tuning: ``ref-bert finetune`` and its library (:func:`finetune`).

    >>> from ref_bert.finetune import finetune
    >>> result = finetune(task="classification", out="runs/cls")          # doctest: +SKIP
    >>> result.scores                                                     # doctest: +SKIP

The package, in reading order:

    data.py      the JSON-lines schema of each task, reading and validating a whole file, encoding it
    embedded.py  the shipped default data of each task, and how it is made from the packaged corpus
    losses.py    mean squared error and label-smoothed cross-entropy (forward/backward)
    heads.py     TaskModel: the encoder plus one task head, forward, loss, backward
    metrics.py   each task's scores (scikit-learn, scipy, seqeval; SQuAD's rules)
    loop.py      finetune(): prepare, pretraining's loop with a fine-tuning step, evaluation

The run directory is pretraining's (:mod:`ref_bert.pretrain.rundir`: atomic checkpoints, OUT/latest,
exact resume) plus the head: ``head.safetensors`` (the head's parameters) and ``task.json`` (task,
num_labels, class names) in every checkpoint and in OUT, and OUT/eval.json with the scores.
"""
from .data import SCHEMAS, TASKS, TaskData, encode, load_task_file, read_jsonl
from .embedded import embedded_path, make_examples
from .heads import TaskModel
from .loop import EVAL_NAME, FinetuneConfig, FinetuneResult, evaluate, finetune

__all__ = ["TASKS", "SCHEMAS", "TaskData", "TaskModel", "FinetuneConfig", "FinetuneResult", "finetune", "evaluate",
           "encode", "load_task_file", "read_jsonl", "embedded_path", "make_examples", "EVAL_NAME"]
