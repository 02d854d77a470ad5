"""The effects on the model's output (qkvmean.engine.effects) against Hugging Face
transformers with forward hooks doing the same substitution (golden_effects.npz, made by
tests/data/make_effects_golden.py).

For GPT-2 (tied head), every family directory (GQA, Qwen2's biases, Qwen3's q/k norm,
GPT-NeoX's, Phi-3's and BLOOM's fused QKV, rope scaling, GPT-J's head bias, Gemma 2's
soft-capped output logits, the encoders' embedding cosine) and the real all-MiniLM-L6-v2,
and for mean-Q over tokens in one head, the causal prefix mean of V in every head, zero K
in every head and mean-K over tokens in one whole KV group: qkvmean's loader, forward
pass with the substitution, final norm, head and effect definitions must give
transformers' ``kl_next_token`` and ``ce_change`` to 1e-4 (absolute), its ``hidden_change``
to 1e-4 relative (1e-5 absolute) and its ``embedding_cosine`` to 1e-5. The texts
run here as one padded batch, in transformers each alone: padding must not matter.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from model_support import FAMILY_DIRS, padded_ids, write_family_dir, write_gpt2_dir
from support import skip_or_fail

from qkvmean.engine import transformer as T
from qkvmean.engine.effects import effects_of, output_effects
from qkvmean.io import models as M

GOLDEN = np.load(Path(__file__).parent / "data" / "golden_effects.npz")
#: As make_effects_golden.py has them (checked against the golden file below).
TEXTS = (
    "the quick brown fox jumps over the lazy dog",
    "mean keys and values",
    "a model reads",
)
HEAD = 1
CONDITIONS = {
    "q_tokens_head": ("q", "tokens", 1, "head"),
    "v_causal": ("v", "causal", 0, "all"),
    "k_zero": ("k", "zero", 1, "all"),
    "k_tokens_group": ("k", "tokens", 1, "group"),
}
MODELS = ("gpt2", *FAMILY_DIRS, "minilm")
#: effect → (atol, rtol): KL and cross-entropy to 1e-4 nats, as the issue asks; the
#: embedding cosine (0.96 to 0.9999 here) absolutely, as a relative 1e-4 of a value near 1
#: would hide changes of 1 - cos (1e-4 and up); float32 rounding gives 1e-7 (KL 1e-6).
TOLERANCE = {
    "kl_next_token": (1e-4, 0.0),
    "ce_change": (1e-4, 0.0),
    "hidden_change": (1e-5, 1e-4),
    "embedding_cosine": (1e-5, 0.0),
}


def test_golden_file_was_made_for_these_inputs():
    assert tuple(GOLDEN["texts"]) == TEXTS
    assert json.loads(str(GOLDEN["conditions"])) == {
        "head": HEAD,
        "conditions": {k: list(v) for k, v in CONDITIONS.items()},
    }
    models = {key.split("/")[0] for key in GOLDEN.files if "/" in key}
    assert models == set(MODELS)


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    return tmp_path_factory.mktemp("effects_golden")


def _load(name, root):
    if name == "minilm":
        if not M.minilm_available():
            skip_or_fail("MINILM", f"all-MiniLM-L6-v2 is not installed ({M.MINILM_INSTALL})")
        return M.load_model("minilm")
    path = write_gpt2_dir(root / name) if name == "gpt2" else write_family_dir(name, root / name)
    return M.load_model(str(path))


def _heads(arch, which):
    """None (every head), [HEAD], or the query heads of the last KV group."""
    return {
        "all": None,
        "head": [HEAD],
        "group": list(range(arch.n_heads - arch.group_size, arch.n_heads)),
    }[which]


@pytest.mark.parametrize("name", MODELS)
def test_effects_match_transformers(name, model_root):
    model = _load(name, model_root)
    weights = model.weights
    ids, lengths = padded_ids(model.tokenizer, TEXTS)
    assert len(set(lengths)) > 1  # padding in the batch
    for i, n in enumerate(lengths):
        np.testing.assert_array_equal(ids[i, :n], GOLDEN[f"{name}/ids/{i}"])
    want_effects = {"hidden_change"} | (
        {"kl_next_token", "ce_change"} if weights.causal else {"embedding_cosine"}
    )
    assert set(effects_of(weights)) == want_effects
    for cond, (target, over, layer, which) in CONDITIONS.items():
        c = T.model_conditions(
            weights, ids, lengths, targets=(target,), over=over,
            heads=_heads(weights.arch, which), ablate_layers=(layer,), hidden=True, maps=False,
        )  # fmt: skip
        assert len(c.names) == 2 and c.names[0] == "baseline"  # then the condition's
        got = output_effects(weights, np.stack([c.hidden[n] for n in c.names]), ids, lengths)
        assert set(got) == want_effects
        for effect, value in got.items():
            want = GOLDEN[f"{name}/{cond}/{effect}"]
            atol, rtol = TOLERANCE[effect]
            np.testing.assert_allclose(
                value[1], want, atol=atol, rtol=rtol, err_msg=f"{name} {cond} {effect}"
            )
        # the condition moves the output far more than the tolerance: the test can fail
        assert (GOLDEN[f"{name}/{cond}/hidden_change"] > 1e-3).all()
        if weights.causal:
            assert (GOLDEN[f"{name}/{cond}/kl_next_token"] > 1e-6).all()
