"""Bad input gets a ValueError that names the argument, the offending value and what was expected."""
import numpy as np
import pytest

from ref_bert import Config, Model

CFG = Config.preset("tiny", vocab_size=40, max_position_embeddings=12, type_vocab_size=2)
MODEL = Model(CFG)
IDS = np.arange(12).reshape(2, 6) % 40


@pytest.mark.parametrize("kwargs, message", [
    (dict(input_ids=IDS.astype(np.float32)), "input_ids must have an integer dtype, got float32"),
    (dict(input_ids=IDS[0]), r"input_ids must be 2-D \(batch, seq_len\), got shape \(6,\)"),
    (dict(input_ids=IDS[:, :0]), r"input_ids must be non-empty, got shape \(2, 0\)"),
    (dict(input_ids=IDS + 40), r"input_ids contains \d+, outside the valid range \[0, 40\)"),
    (dict(input_ids=IDS - 1), r"input_ids contains -1, outside the valid range \[0, 40\)"),
    (dict(input_ids=np.zeros((1, 13), dtype=np.int64)), "sequence length 13 exceeds max_position_embeddings=12"),
    (dict(input_ids=IDS, token_type_ids=np.full((2, 6), 2)),
     r"token_type_ids contains 2, outside the valid range \[0, 2\)"),
    (dict(input_ids=IDS, token_type_ids=np.zeros((2, 5), dtype=np.int64)),
     r"token_type_ids has shape \(2, 5\), expected \(2, 6\)"),
    (dict(input_ids=IDS, token_type_ids=np.zeros((2, 6))), "token_type_ids must have an integer dtype"),
    (dict(input_ids=IDS, attention_mask=np.ones((2, 5))),
     r"attention_mask has shape \(2, 5\), expected \(2, 6\) \(padding mask\) or \(2, 6, 6\)"),
    (dict(input_ids=IDS, attention_mask=np.ones((2, 6, 5))), r"attention_mask has shape \(2, 6, 5\)"),
    (dict(input_ids=IDS, attention_mask=np.full((2, 6), 2)), "attention_mask must contain only 0 and 1"),
    (dict(input_ids=IDS, attention_mask=np.full((2, 6), "1")), "attention_mask must be boolean or numeric"),
    (dict(input_ids=IDS, position_ids=np.full((2, 6), 12)),
     r"position_ids contains 12, outside the valid range \[0, 12\)"),
    (dict(input_ids=IDS.tolist()), "input_ids must be a numpy array, got builtins.list"),
])
def test_forward_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MODEL.forward(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "needs mlm_labels, sop_labels or both"),
    (dict(mlm_labels=np.full((2, 6), 40)), r"mlm_labels contains 40, outside the valid range \[0, 40\) \(or -100\)"),
    (dict(mlm_labels=np.full((2, 6), -1)), r"mlm_labels contains -1"),
    (dict(mlm_labels=np.zeros((2, 7), dtype=np.int64)), r"mlm_labels has shape \(2, 7\), expected \(2, 6\)"),
    (dict(sop_labels=np.array([0, 2])), r"sop_labels contains 2, outside the valid range \[0, 2\)"),
    (dict(sop_labels=np.array([0])), r"sop_labels has shape \(1,\), expected \(2,\)"),
])
def test_loss_rejects_bad_labels(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MODEL.loss_and_grads(IDS, **kwargs)


def test_ignore_label_is_allowed_and_all_ignored_gives_zero_mlm_loss():
    _result = MODEL.loss_and_grads(IDS, mlm_labels=np.full((2, 6), -100), sop_labels=np.array([0, -100]))
    loss, grads, parts = _result.loss, _result.grads, _result.parts
    assert float(parts["mlm"]) == 0.0 and float(parts["sop"]) > 0
    assert not np.any(grads["mlm.bias"])


def test_config_type_checked():
    with pytest.raises(ValueError, match="config must be a ref_bert.Config or a preset name, got dict"):
        Model({"hidden_size": 8})
