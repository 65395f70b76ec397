"""ALBERT pretraining (MLM + SOP, or UniLM's mixed objective) with exact, atomic, resumable checkpoints.

    >>> from ref_bert.pretrain import pretrain
    >>> result = pretrain(out="runs/a", steps=2000, checkpoint_every=200)               # doctest: +SKIP
    >>> result = pretrain(out="runs/a", steps=2000, checkpoint_every=200, resume=True)  # doctest: +SKIP

``ref-bert pretrain`` (:mod:`ref_bert.cli.pretrain`) is its command line. The package, in reading order:

    settings.py      PretrainConfig and its validation, the model config, optimiser and schedule
    batches.py       the corpus stream of the objective and each step's micro-batches on the device
    accumulation.py  the gradient of an effective batch of k micro-batches, with its derivation
    data_parallel.py the global batch over N processes (mpiexec -n N), bit-identical to one process
    loop.py          pretrain(): prepare, open the output directory, the loop, the plot
    metrics.py       OUT/metrics.jsonl, the progress bar, OUT/loss.png
    rundir.py        the checkpoint layout: save, publish, prune, resume

One optimiser step (global step s = 1, 2, ..., ``steps``; :func:`ref_bert.pretrain.loop.train`):

    lr    = schedule(s - 1)          the rate is read *before* the update, from the number of updates
                                     already made (TF's global_step, HF's scheduler): with warmup the
                                     first update has lr 0, as in ALBERT and Hugging Face
    batch = k micro-batches of b examples from the data stream (k = grad_accum, b = batch_size),
            those of this rank (all of them in one process) moved to the model's backend with one
            ``backend.from_host`` per array per step
    grads = gradient of the loss of the whole effective batch of k*b examples (accumulation.py's
            weights), the micro-batches' gradients added in index order whatever the number of
            processes (data_parallel.py); micro-batch i draws its dropout masks from
            default_rng([seed, DROPOUT_KEY, s - 1, i]), so they depend on the example's place in the
            batch, not on the process that runs it (the model's own dropout generator, recorded in
            each checkpoint, is not drawn from)
    optimiser.step(grads, lr)        LAMB/AdamW; global-norm clipping is the optimiser preset's

What the default run shows (tests/test_train.py runs it): the MLM loss falls from 6.9 (ln 1000) to
5.4-5.6 and the SOP loss from ln 2 = 0.693 to 0.18-0.25 (seeds 0-2) in 1600 steps. That needs the
demo's SOP weight of 100 (``sop_weight``; ALBERT's loss is the unweighted MLM + SOP, ``--sop-weight
1``). With weight 1 the SOP loss stays at chance in this budget: the MLM gradient dominates the shared
encoder (the median ratio of the two gradients' norms over the encoder's weight matrices is 5 at
initialisation and 64 after 3000 steps), the [CLS] query's attention stays uniform (largest weight
0.018, about 1/T), so the pooled output is the same for every example, and SOP had not left chance
after 3250 steps of batch 32. Weights 4, 10 and 30 did not change that in 1200 steps; 100 and 1000
did. Trained on SOP alone the same model reaches 0.28 in 1200 steps.

Resuming restores all of it and continues exactly: N steps, resume, N more steps give parameters,
optimiser state and logged losses bit-identical to 2N steps in one go, for either objective
(tests/test_train.py). A resume takes the run's settings from the checkpoint (``resume=True`` alone
is enough); a setting given that changes the run's arithmetic (batch, schedule, seed, ...) must equal
the checkpoint's, else a ValueError names it. ``steps`` may change: that extends (or shortens) the
run, with the schedule re-derived for the new total from the checkpoint on (:func:`pretrain`).
Ctrl-C between steps writes a checkpoint of the last completed step; resuming from it is exact too.
"""
from .accumulation import effective_batch_gradients
from .loop import PretrainResult, pretrain
from .rundir import load_checkpoint_state
from .settings import OBJECTIVES, OPTIMIZERS, SCHEDULES, PretrainConfig, thread_limit

__all__ = ["PretrainConfig", "PretrainResult", "pretrain", "effective_batch_gradients", "load_checkpoint_state",
           "OBJECTIVES", "SCHEDULES", "OPTIMIZERS", "thread_limit"]
