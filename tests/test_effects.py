"""The effects on the model's output (qkvmean.engine.effects) against the float64
reference, for a language model with a tied head (the synthetic demo, GPT-2's layout)
and an encoder (MiniLM)."""

from __future__ import annotations

import numpy as np
import pytest
from model_support import padded_ids, write_gpt2_dir
from support import skip_or_fail

from qkvmean.engine import reference as ref
from qkvmean.engine import synthetic
from qkvmean.engine import transformer as T
from qkvmean.engine.effects import EFFECTS, effects_of, output_effects
from qkvmean.io import models as M

TEXTS = ["the cat sat on the mat", "mean keys make every row uniform", "short", ""]


@pytest.fixture(scope="module")
def minilm():
    if not M.minilm_available():
        skip_or_fail("MINILM", f"all-MiniLM-L6-v2 is not installed ({M.MINILM_INSTALL})")
    return M.load_model("minilm")


def _effects(weights, tok, over, layers=(0,), texts=TEXTS):
    ids, lengths = padded_ids(tok, texts)
    c = T.model_conditions(weights, ids, lengths, over=over, ablate_layers=layers, hidden=True)
    hidden = np.stack([c.hidden[name] for name in c.names])
    return (
        output_effects(weights, hidden, ids, lengths),
        ref.output_effects(weights, hidden, ids, lengths),
        lengths,
    )


def _agree(got, want, lengths):
    assert set(got) == set(want)
    for name in got:
        assert got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=1e-4, err_msg=name)
    for name, value in got.items():  # the baseline's own row, and an empty input
        own = np.where(lengths > 0, 1.0 if name == EFFECTS[3] else 0.0, 0.0)
        np.testing.assert_array_equal(value[0], own, err_msg=name)
        assert (value[:, lengths == 0] == 0).all(), name


@pytest.mark.parametrize("over", ["causal", "zero", "window:2"])
def test_language_model_effects_match_the_reference(over):
    weights, tok = synthetic.build()
    got, want, lengths = _effects(weights, tok, over, layers=(1,))
    assert set(got) == {"hidden_change", "kl_next_token", "ce_change"}
    _agree(got, want, lengths)
    # the substitution moves the output: KL > 0 for every valid input of every condition
    assert (got["kl_next_token"][1:, lengths > 1] > 0).all()  # (one token: its own mean)
    assert (got["hidden_change"][1:, lengths > 1] > 0).all()


def test_gpt2_layout_has_its_tied_head(tmp_path):
    model = M.load_model(str(write_gpt2_dir(tmp_path / "gpt2")))
    assert model.weights.unembed is model.weights.tok_emb
    got, want, lengths = _effects(model.weights, model.tokenizer, "causal", layers=(0,))
    _agree(got, want, lengths)


def test_encoder_effects_are_the_embedding_cosine(minilm):
    assert effects_of(minilm.weights) == ("hidden_change", "embedding_cosine")
    got, want, lengths = _effects(minilm.weights, minilm.tokenizer, "tokens", layers=(0, 3))
    _agree(got, want, lengths)
    valid = got["embedding_cosine"][1:, lengths > 0]
    assert (valid < 1).all() and (valid > -1).all()


def test_mismatched_shapes_are_refused():
    weights, _ = synthetic.build()
    with pytest.raises(ValueError, match="do not match"):
        output_effects(weights, np.zeros((2, 3, 4, weights.d_model)), np.zeros((2, 4)), [1, 1])
