"""ref_bert.examples.make_batch: the one deterministic batch maker (golden files, bench, battery, tests)."""
import numpy as np
import pytest

from ref_bert import Config
from ref_bert.examples import BATCH_NAMES, RECIPES, make_batch

CONFIG = Config.preset("tiny", pad_token_id=3)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_is_deterministic_host_int64(recipe):
    a, b = make_batch(CONFIG, 3, 12, 5, recipe=recipe), make_batch(CONFIG, 3, 12, 5, recipe=recipe)
    assert tuple(a) == BATCH_NAMES
    for name in BATCH_NAMES:
        assert isinstance(a[name], np.ndarray) and a[name].dtype == np.int64 and np.array_equal(a[name], b[name])
    assert a["input_ids"].shape == (3, 12) and a["sop_labels"].shape == (3,)
    assert (a["position_ids"] == np.arange(12)).all()
    assert set(np.unique(a["sop_labels"])) <= {0, 1}
    labelled = a["mlm_labels"] != -100
    assert labelled.any() and not labelled[a["attention_mask"] == 0].any()
    assert (a["mlm_labels"][labelled] < CONFIG.vocab_size).all()
    assert not np.array_equal(a["input_ids"], make_batch(CONFIG, 3, 12, 6, recipe=recipe)["input_ids"])


def test_rows_recipe_pads_with_the_pad_id_only():
    x = make_batch(CONFIG, 4, 10, 0, lengths=[10, 7, 4, 1], label_rate=0.3)
    assert (x["attention_mask"].sum(axis=1) == [10, 7, 4, 1]).all()
    real = x["attention_mask"] == 1
    assert (x["input_ids"][~real] == 3).all() and (x["input_ids"][real] != 3).all()
    assert ((x["mlm_labels"] != -100).sum(axis=1) >= 1).all()      # at least one label per row
    assert (x["token_type_ids"][0] == [0] * 5 + [1] * 5).all()


def test_counted_recipe_labels_a_fixed_number_of_positions():
    x = make_batch(CONFIG, 3, 20, 1, recipe="counted", label_rate=0.15)
    assert ((x["mlm_labels"] != -100).sum(axis=1) == 3).all() and (x["mlm_labels"][:, 0] == -100).all()
    assert x["attention_mask"].all() and x["input_ids"].min() >= 5


@pytest.mark.parametrize("kwargs, message", [
    (dict(recipe="nope"), "recipe='nope' is invalid"),
    (dict(batch_size=0), "need batch >= 1"),
    (dict(seq_len=1), "seq_len >= 2"),
    (dict(seq_len=10_000), "exceeds max_position_embeddings"),
    (dict(lengths=[4]), "lengths=\\[4\\] is invalid"),
    (dict(lengths=[4, 0]), "is invalid"),
    (dict(recipe="counted", lengths=[4, 4]), "does not pad"),
])
def test_bad_arguments_raise_value_errors(kwargs, message):
    args = {"batch_size": 2, "seq_len": 8, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_batch(CONFIG, **args)
