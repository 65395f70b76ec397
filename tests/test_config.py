"""Config validation, presets with the exact published parameter counts, and the sharing schedule."""
import pytest

from ref_bert import Config, Model, count_parameters

# docs/reference.md §1.8: AlbertModel / BertModel (with pooler, heads excluded) and
# AlbertForPreTraining (unique parameters, tied decoder counted once).
EXPECTED = {
    "albert-base": (11_683_584, 11_813_810),
    "albert-large": (17_683_968, 17_847_474),
    "albert-xlarge": (58_724_864, 59_021_490),
    "albert-xxlarge": (222_595_584, 223_158_450),
    "bert-base": (109_482_240, None),
    "bert-large": (335_141_888, None),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_parameter_counts(name):
    body, with_heads = EXPECTED[name]
    config = Config.preset(name)
    assert count_parameters(config) == body
    if with_heads is not None:
        assert count_parameters(config, heads=True) == with_heads


def test_bert_base_pretraining_count():
    # BertForPreTraining: body + transform dense (H*H + H) + LayerNorm (2H) + output bias (V) + NSP (2H + 2)
    c = Config.preset("bert-base")
    H, V = 768, 30522
    assert count_parameters(c, heads=True) == 109_482_240 + H * H + H + 2 * H + V + 2 * H + 2


def test_model_num_parameters_albert_base():
    model = Model("albert-base", dtype="float32", seed=0)
    assert model.num_parameters() == 11_683_584
    assert model.num_parameters(include_heads=True) == 11_813_810
    assert model.params.flat.size == 11_813_810  # the flat buffer holds exactly the unique parameters


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", 10, "hidden_size=10.*multiple of num_attention_heads=4"),
    ("num_attention_heads", 0, "num_attention_heads=0.*positive integer"),
    ("vocab_size", -5, "vocab_size=-5.*positive integer"),
    ("embedding_size", 2.5, "embedding_size=2.5.*positive integer"),
    ("hidden_act", "swish", "hidden_act='swish'.*one of"),
    ("sharing", "everything", "sharing='everything'.*one of"),
    ("group_rule", "jax", "group_rule='jax'"),
    ("initializer", "xavier", "initializer='xavier'"),
    ("hidden_dropout_prob", 1.0, r"hidden_dropout_prob=1.0.*\[0, 1\)"),
    ("attention_probs_dropout_prob", -0.1, "attention_probs_dropout_prob=-0.1"),
    ("layer_norm_eps", 0.0, "layer_norm_eps=0.0.*positive"),
    ("num_hidden_groups", 3, "num_hidden_groups=3.*at most num_hidden_layers=2"),
    ("pad_token_id", 1000, r"pad_token_id=1000.*\[0, vocab_size=1000\)"),
    ("attention_mask_value", float("-inf"), "attention_mask_value=-inf.*finite negative"),
    ("max_position_embeddings", 0, "max_position_embeddings=0"),
])
def test_invalid_config_names_field_and_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        Config.preset("tiny", **{field: value})


def test_unknown_preset_and_unknown_fields():
    with pytest.raises(ValueError, match="unknown preset 'albert-huge'"):
        Config.preset("albert-huge")
    with pytest.raises(ValueError, match=r"unknown Config fields \['hiden_size'\]"):
        Config.from_dict({**Config.preset("tiny").to_dict(), "hiden_size": 3})


def test_round_trip_through_dict():
    c = Config.preset("albert-large", num_hidden_groups=2)
    assert Config.from_dict(c.to_dict()) == c


def test_group_rules_hf_and_tf_disagree_somewhere_and_schedule_follows_the_rule():
    # HF int(i / (L / G)) and TF int(i / L * G) are different float expressions (docs/reference.md §1.7).
    differing = [(L, G, i) for L in range(1, 40) for G in range(1, L + 1) for i in range(L)
                 if int(i / (L / G)) != int(i / L * G)]
    assert differing, "expected at least one (L, G) where the two rules disagree"
    L, G, i = differing[0]
    for rule, expected in (("hf", int(i / (L / G))), ("tf", int(i / L * G))):
        try:
            c = Config.preset("tiny", num_hidden_layers=L, num_hidden_groups=G, group_rule=rule)
        except ValueError:
            continue  # that rule leaves a group unused for this (L, G); Config refuses it
        assert c.group_of_layer(i) == expected
        assert c.block_schedule()[i][0] == (expected, expected)


@pytest.mark.parametrize("sharing, attn_sets, ffn_sets", [
    ("all", 2, 2), ("attention", 2, 8), ("ffn", 8, 2), ("none", 8, 8)])
def test_sharing_schedule(sharing, attn_sets, ffn_sets):
    # 4 layers, 1 group, 2 inner blocks: shared sublayers have K sets, unshared L*K.
    c = Config.preset("tiny", num_hidden_layers=4, inner_group_num=2, sharing=sharing)
    sched = c.block_schedule()
    assert len(sched) == 4 and all(len(blocks) == 2 for blocks in sched)
    assert len({a for blocks in sched for a, _ in blocks}) == attn_sets == c.num_attention_sets
    assert len({f for blocks in sched for _, f in blocks}) == ffn_sets == c.num_ffn_sets


def test_all_shared_with_one_group_per_layer_is_bert_layout():
    a = Config.preset("tiny", num_hidden_layers=3, num_hidden_groups=3, sharing="all")
    b = Config.preset("tiny", num_hidden_layers=3, sharing="none")
    assert a.block_schedule() == b.block_schedule()
    assert count_parameters(a) == count_parameters(b)
