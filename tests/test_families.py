"""The families beyond MiniLM's BERT and GPT-2 (test_models.py): loaders, the forward pass
against transformers (golden maps) and the numpy reference, GQA semantics, bad configs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from model_support import (
    FAMILY_DIRS,
    LEGACY_DIRS,
    convert_to_bfloat16,
    edit_config,
    padded_ids,
    write_family_dir,
    write_layout_dir,
    write_llama_dir,
)

from qkvmean.engine import reference as R
from qkvmean.engine import transformer as T
from qkvmean.engine.kernels import products
from qkvmean.engine.plan import Plan
from qkvmean.files import InputError
from qkvmean.io import models as M

GOLDEN = np.load(Path(__file__).parent / "data" / "golden_families.npz")
GOLDEN_TEXTS = ("the quick brown fox jumps", "mean keys and values")  # make_family_golden.py
CONDITIONS = ("baseline", "mean_q", "mean_k", "mean_v")


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: write_family_dir(name, root / name) for name in (*FAMILY_DIRS, *LEGACY_DIRS)}


@pytest.fixture(scope="module")
def loaded(family_dirs):
    return {name: M.load_model(str(path)) for name, path in family_dirs.items()}


@pytest.mark.parametrize("name", [*FAMILY_DIRS, *LEGACY_DIRS])
@pytest.mark.parametrize("setting", ["causal", "tokens_heads"])
def test_every_layer_matches_transformers(loaded, name, setting):
    """Every layer's baseline and mean-Q/K/V maps (substituted at layer 1) against
    transformers' eager attention with hooks on the projections: the loader's names and
    layouts (GPT-NeoX's interleaved QKV), RMSNorm, SwiGLU, rotary with llama3/linear
    scaling and partial rotary, GQA, Qwen3's q/k norm, parallel residual; and the older
    configs' keys and a base model's checkpoint (LEGACY_DIRS), as transformers 5 reads
    them."""
    model = loaded[name]
    arch = model.weights.arch
    heads = None
    over = "causal"
    if setting == "tokens_heads":  # the last KV group's query heads, mean over tokens
        heads = list(range(arch.n_heads - arch.group_size, arch.n_heads))
        over = "tokens"
    for i, text in enumerate(GOLDEN_TEXTS):
        ids = np.array(model.tokenizer.encode(text).ids)
        np.testing.assert_array_equal(ids, GOLDEN[f"{name}/ids/{i}"])
        got = T.model_conditions(
            model.weights, ids[None], [len(ids)], over=over, heads=heads, ablate_layers=(1,)
        )
        for cond in CONDITIONS:
            want = GOLDEN[f"{name}/{setting}/{cond}/{i}"]
            np.testing.assert_allclose(got.weights[cond][0], want, atol=1e-5, rtol=0)
        # the substitution changed something downstream (the golden maps would catch a
        # substitution that did nothing only if they differ, which they must)
        assert np.abs(got.weights["mean_k"][0, 2] - got.weights["baseline"][0, 2]).max() > 1e-3


def _splits_a_token_normed_group(arch, heads):
    """Do ``heads`` take some but not all query heads of a KV group, with a key norm over
    the whole projection (OLMo 2's)?"""
    if heads is None or not arch.qk_norm or arch.qk_norm_over != "token":
        return False
    groups = {h // arch.group_size for h in heads}
    return any(
        not set(range(g * arch.group_size, (g + 1) * arch.group_size)) <= set(heads) for g in groups
    )


@pytest.mark.parametrize("name", list(FAMILY_DIRS))
@pytest.mark.parametrize(
    ("layers", "heads", "over"),
    [
        ((0,), None, "tokens"),
        ((0, 2), [1], "causal"),
        ((2,), [0, 3], "tokens"),
        ((1,), [2], "causal"),
        ((0, 2), [1, 2], "dataset"),
    ],
)
def test_forward_pass_matches_reference(loaded, name, layers, heads, over):
    """The fast forward pass against the float64 reference, at several ablated layers and
    head subsets (partial GQA groups among them), and the final hidden states; the dataset
    mean (over these three texts) before rotary and q/k norm, per query head."""
    model = loaded[name]
    ids, lengths = padded_ids(model.tokenizer, ["a model reads every word", "mean keys", "the"])
    means = None
    if over == "dataset":
        means = T.dataset_means(model.weights, ids, lengths, layers=layers)
    kw = dict(over=over, heads=heads, ablate_layers=layers, hidden=True, means=means)
    targets = ("q", "k", "v")
    if _splits_a_token_normed_group(model.weights.arch, heads):  # OLMo 2: K per KV head
        with pytest.raises(ValueError, match=r"select all of query heads \d+\.\.\d+ \(KV head"):
            T.model_conditions(model.weights, ids, lengths, targets=("k",), **kw)
        targets = ("q", "v")
    got = T.model_conditions(model.weights, ids, lengths, targets=targets, **kw)
    for cond in ("baseline", *(f"mean_{t}" for t in targets)):
        target = None if cond == "baseline" else cond[-1]
        want, hidden = R.transformer_forward(
            model.weights, ids, lengths, target=target, over=over, heads=heads,
            ablate_layers=layers,
        )  # fmt: skip
        for layer, w in enumerate(want):
            for b, n in enumerate(lengths):
                np.testing.assert_allclose(
                    got.weights[cond][b, layer, :, :n, :n], w[b, :, :n, :n], atol=2e-5, rtol=0
                )
        for b, n in enumerate(lengths):
            np.testing.assert_allclose(got.hidden[cond][b, :n], hidden[b, :n], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(FAMILY_DIRS))
def test_an_input_alone_on_every_thread_has_its_bits_in_a_batch(loaded, name):
    """One input has the compute threads to itself (``cpu.spread``: products, attention,
    norms, activations, head layout and rotary on every thread, in the same blocks), two
    inputs run one per thread: the same bits, maps, metrics, hidden states and effects,
    for every family's vocabulary (rotary, SwiGLU, q/k norm, GQA, parallel residual)."""
    model = loaded[name]
    # long enough that the stacked conditions' products take two blocks of rows
    ids, lengths = padded_ids(model.tokenizer, ["a model reads every word " * 12, "mean keys"])
    assert 3 * lengths[0] > products.ROWS
    arch = model.weights.arch  # (OLMo 2's keys go by whole KV groups)
    heads = list(range(arch.group_size)) if _splits_a_token_normed_group(arch, [1]) else [1]
    kw = dict(ablate_layers=(0, 2), heads=heads, hidden=True, effects=True)
    batch = T.model_conditions(model.weights, ids, lengths, **kw)
    alone = T.model_conditions(model.weights, ids[:1], lengths[:1], seq=ids.shape[1], **kw)
    for cond in batch.names:
        np.testing.assert_array_equal(alone.weights[cond][0], batch.weights[cond][0])
        np.testing.assert_array_equal(alone.hidden[cond][0], batch.hidden[cond][0])
    for metric, values in batch.metrics.items():
        np.testing.assert_array_equal(alone.metrics[metric][:, :1], values[:, :1])
    for effect, values in batch.effects.items():
        np.testing.assert_array_equal(alone.effects[effect][:, :1], values[:, :1])


def test_a_sliding_window_gives_zero_weight_beyond_it(loaded):
    """Gemma 2/3's sliding layers: a query's weights on keys W or more tokens back are
    exactly 0 (and its window's sum to 1); ModernBERT's local layers: keys more than W // 2
    away on either side; the global layers see every (earlier) key."""
    for name in ("gemma2", "gemma3", "modernbert"):
        model = loaded[name]
        arch = model.weights.arch
        ids = np.array(model.tokenizer.encode("a model reads every word").ids)
        n = len(ids)
        got = T.model_conditions(model.weights, ids[None], [n], ablate_layers=(1,))
        assert any(arch.windows) and not all(arch.windows) and n > 2 * max(arch.windows)
        i, j = np.indices((n, n))
        for layer, window in enumerate(arch.windows):
            for cond in CONDITIONS:
                w = got.weights[cond][0, layer]
                if arch.causal:
                    seen = (j <= i) & (j > i - window) if window else j <= i
                else:
                    seen = np.abs(i - j) <= window // 2 if window else i >= 0
                assert np.all(w[:, ~seen] == 0.0), (name, layer, cond)
                assert np.all(w[:, seen] > 0.0), (name, layer, cond)
                np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)


def test_gqa_substitution_is_per_query_head(loaded):
    """K of query head 0 replaced: head 1, which shares its KV head, keeps the baseline's
    map at the substituted layer; selecting both heads of the group equals the whole-KV-
    head substitution that the golden maps (hooks on k_proj) check."""
    model = loaded["llama"]
    assert model.weights.arch.group_size == 2
    ids, lengths = padded_ids(model.tokenizer, ["the quick brown fox jumps over"])
    one = T.model_conditions(model.weights, ids, lengths, targets=("k",), heads=[0], over="causal")
    base, sub = one.weights["baseline"][:, 0], one.weights["mean_k"][:, 0]
    # heads 1..3 untouched at layer 0: the same maps up to the order of BLAS's sums (the
    # substituted condition's products have other shapes; OpenBLAS 0.3.31 rounds them
    # differently, 2e-7), a thousandth of what the substitution does to head 0
    np.testing.assert_allclose(sub[:, 1:], base[:, 1:], atol=1e-6, rtol=0)
    assert np.abs(sub[:, 0] - base[:, 0]).max() > 1e-3


def test_olmo2_token_norm_couples_the_heads_of_a_token(loaded):
    """OLMo 2 norms each token's whole query (and key) projection, all heads together, as
    transformers does: substituting Q of head 0 changes the norm's statistic, so every
    other head's queries at that layer change too (by one factor per token), where a
    per-head norm (Qwen3) leaves them as they were. Hooks on ``q_proj`` do the same."""
    ids = None
    for name, coupled in (("olmo2", True), ("qwen3", False)):
        model = loaded[name]
        arch = model.weights.arch
        assert arch.qk_norm and (arch.qk_norm_over == "token") == coupled
        ids, lengths = padded_ids(model.tokenizer, ["the quick brown fox jumps over"])
        c = T.model_conditions(model.weights, ids, lengths, targets=("q",), heads=[0])
        base, sub = c.weights["baseline"][:, 0], c.weights["mean_q"][:, 0]
        assert np.abs(sub[:, 0] - base[:, 0]).max() > 1e-3  # the substituted head
        others = np.abs(sub[:, 1:] - base[:, 1:]).max()
        assert others > 1e-4 if coupled else others < 1e-6, (name, others)
    # whole KV groups of keys are what a hook on k_proj can replace: they run
    olmo = loaded["olmo2"].weights
    group = olmo.arch.group_size
    assert group > 1
    T.model_conditions(olmo, ids, lengths, targets=("k",), heads=list(range(group)))


def test_fast_paths_are_not_used_with_rotary(loaded):
    """With rotary positions, mean-K over tokens does not give uniform rows: the plan picks
    the general path, and the maps match transformers (test above) — not 1/n."""
    arch = loaded["qwen2"].weights.arch
    assert not arch.exact_fast_paths
    assert Plan().step("k", causal=True, exact_fast=False).substitute
    model = loaded["qwen2"]
    ids, lengths = padded_ids(model.tokenizer, ["the quick brown fox jumps over"])
    c = T.model_conditions(model.weights, ids, lengths, targets=("k",), over="tokens")
    row = c.weights["mean_k"][0, 0, 0, 5, :6]
    assert np.abs(row - 1 / 6).max() > 1e-3


def test_tokenizers_add_bos_as_their_post_processors_do(loaded):
    for name, bos in [("llama", "<|begin_of_text|>"), ("mistral", "<s>")]:
        enc = loaded[name].tokenizer.encode("mean keys")
        assert enc.tokens[0] == bos and bos not in enc.tokens[1:]
    for name in ("qwen2", "qwen3", "gpt_neox"):
        enc = loaded[name].tokenizer.encode("mean keys")
        assert enc.tokens[0] != "<s>" and "<|begin_of_text|>" not in enc.tokens


def test_sharded_checkpoint_and_sliding_window(loaded, family_dirs):
    assert (family_dirs["mistral"] / "model.safetensors.index.json").is_file()
    assert not (family_dirs["mistral"] / "model.safetensors").exists()
    w = loaded["mistral"].weights
    assert w.n_kv_heads == 1 and w.max_positions == 128  # window 4096 > positions


def test_bfloat16_weights_read_as_float32(tmp_path):
    """Checkpoints in bf16 (as Llama-3.2 ships) are read exactly: each weight is the bf16
    value as float32."""
    d = write_family_dir("llama", tmp_path / "bf16")
    bits = convert_to_bfloat16(d)
    model = M.load_model(str(d))
    want = (bits["model.embed_tokens.weight"].astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(model.weights.tok_emb, want)
    gate = (bits["model.layers.1.mlp.gate_proj.weight"].astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(model.weights.layers[1].w1[:, : gate.shape[0]], gate.T)


def _refused(path, rx):
    with pytest.raises(InputError, match=rx) as info:
        M.load_model(str(path))
    assert "\n" not in str(info.value)


def test_bad_configs_are_one_line(tmp_path):
    base = write_llama_dir(tmp_path / "base")

    def variant(name, **changes):
        d = tmp_path / name
        shutil.copytree(base, d)
        edit_config(d, **changes)
        return d

    _refused(
        variant("yarn", rope_scaling={"rope_type": "yarn", "factor": 4.0}),
        r"rope type 'yarn' is not supported \(qkvmean runs 'default', 'linear' and 'llama3'\)",
    )
    _refused(
        variant("kv", num_key_value_heads=3),
        r"4 query heads cannot share 3 key/value heads equally",
    )
    _refused(variant("heads", num_attention_heads=5), r"hidden_size 32 is not a multiple of")
    _refused(variant("act", hidden_act="relu"), r"hidden_act 'relu' is not supported for llama")
    _refused(
        variant("llama3", rope_scaling={"rope_type": "llama3", "factor": 8.0}),
        r"rope low_freq_factor must be a positive number, got None",
    )
    _refused(variant("bias", attention_bias=True), r"no tensor 'layers.0.self_attn.q_proj.bias'")
    _refused(
        variant("layers", num_hidden_layers=2),
        r"tensor 'model.layers.2.input_layernorm.weight' and 8 more has no place",
    )
    _refused(variant("type", model_type=["llama"]), r"model_type \['llama'\] is not supported")
    _refused(variant("actlist", hidden_act=["silu"]), r"hidden_act \['silu'\] is not supported")
    _refused(
        variant("scaling", rope_scaling="linear"),
        r"rope_scaling must be an object, got 'linear'",
    )
    # transformers 5 fills rope_parameters from the top-level keys: so does the loader
    merged = variant("merged", rope_parameters={"rope_theta": 500.0}, partial_rotary_factor=0.5)
    rotary = M.load_model(str(merged)).weights.arch.rotary
    assert (rotary.theta, rotary.dim) == (500.0, 4)
    # a sequence-classification (reward model) head has no place but is not a mismatch
    from safetensors.numpy import load_file, save_file

    scored = variant("score")
    t = load_file(str(scored / "model.safetensors"))
    t["score.weight"] = np.zeros((2, 32), np.float32)
    save_file(t, str(scored / "model.safetensors"))
    assert M.load_model(str(scored)).family == "llama"
    missing = variant("missing")
    t = load_file(str(missing / "model.safetensors"))
    del t["model.layers.1.mlp.up_proj.weight"]  # (load_file, save_file imported above)
    save_file(t, str(missing / "model.safetensors"))
    _refused(missing, r"no tensor 'layers.1.mlp.up_proj.weight'")


def test_variants_the_new_families_do_not_run_are_refused_in_one_line(tmp_path):
    """What a family's loader cannot run exactly is refused, never run as something else."""
    for name, changes, rx in [
        ("opt", {"word_embed_proj_dim": 16}, r"word_embed_proj_dim 16 differs from hidden_size"),
        ("opt", {"do_layer_norm_before": False}, r"only OPT's pre-norm block"),
        ("opt", {"activation_function": "gelu"}, r"activation_function 'gelu' is not supported"),
        ("stablelm", {"qk_layernorm": True}, r"qk_layernorm: per-head LayerNorms"),
        ("stablelm", {"use_parallel_residual": True}, r"use_parallel_residual: the parallel"),
        ("gemma", {"use_bidirectional_attention": True}, r"use_bidirectional_attention is not"),
        ("distilbert", {"sinusoidal_pos_embds": True}, r"sinusoidal_pos_embds is not supported"),
        ("roberta", {"is_decoder": True}, r"is_decoder: qkvmean runs RoBERTa as an encoder"),
        ("gptj", {"rotary_dim": 3}, r"rotary dimensions must be even"),
        (
            "gemma3",
            {"sliding_window_pattern": 0, "layer_types": None},
            r"sliding_window_pattern must be a positive integer, got 0",
        ),
        ("gemma2", {"query_pre_attn_scalar": 0}, r"query_pre_attn_scalar must be a positive"),
    ]:
        d = write_family_dir(name, tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}")
        edit_config(d, **changes)
        _refused(d, rx)


def test_older_gemma2_configs_take_transformers_defaults(tmp_path):
    """A Gemma 2 config.json without the soft-cap and query-scalar keys (written before
    they were saved) gets transformers' defaults: caps 50 and 30, scalar 256."""
    import json

    d = write_family_dir("gemma2", tmp_path / "gemma2")
    cfg = json.loads((d / "config.json").read_text())
    for key in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"):
        del cfg[key]
    (d / "config.json").write_text(json.dumps(cfg))
    arch = M.load_model(str(d)).weights.arch
    assert (arch.softcap, arch.final_softcap, arch.query_scale) == (50.0, 30.0, 256**-0.5)


@pytest.mark.parametrize(
    ("layout", "changes", "activation"),
    [
        # Gemma 1 reads hidden_act, whose "gelu" transformers rewrites to the tanh GELU
        ("gemma", {"hidden_act": "gelu", "hidden_activation": "gelu"}, "gelu_tanh_gated"),
        ("gemma", {"hidden_act": "gelu_new", "hidden_activation": "gelu"}, "gelu_tanh_gated"),
        # Gemma 2/3 read hidden_activation alone: an explicit "gelu" is the exact GELU
        ("gemma2", {"hidden_activation": "gelu", "hidden_act": "gelu_pytorch_tanh"}, "gelu_gated"),
        ("gemma3", {"hidden_activation": "gelu"}, "gelu_gated"),
        ("gemma3", {"hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu"},
         "gelu_tanh_gated"),
    ],
)  # fmt: skip
def test_gemma_activations_are_read_as_transformers_reads_them(tmp_path, layout, changes,
                                                               activation):  # fmt: skip
    """The GeGLU's GELU from the key each Gemma reads in transformers 5.25 (checked there:
    the ``act_fn`` class of each of these configs), not from whichever key is present."""
    d = write_layout_dir(tmp_path / layout, layout, config=changes)
    assert M.load_model(str(d)).weights.arch.activation == activation


def test_mixtures_of_experts_are_refused_in_one_line(tmp_path):
    """A mixture of experts, by its model_type or by an experts key in a dense family's
    config.json, is refused before any tensor is read, in one line that says so."""
    base = write_llama_dir(tmp_path / "base")
    for name, changes in {
        "mixtral": dict(model_type="mixtral", num_local_experts=8),
        "qwen_moe": dict(model_type="qwen2_moe"),
        "llama_experts": dict(num_local_experts=4),
    }.items():
        d = tmp_path / name
        shutil.copytree(base, d)
        edit_config(d, **changes)
        _refused(d, r"a mixture of experts, which qkvmean does not run .* use a dense model")
    d = tmp_path / "gemma3_multimodal"
    shutil.copytree(base, d)
    edit_config(d, model_type="gemma3")
    _refused(
        d,
        r"'gemma3' is a multimodal checkpoint .* text-only checkpoint \(model_type 'gemma3_text'",
    )


def test_the_families_listed_are_the_registry(capsys):
    """``--version --verbose`` names every registered model_type (``run --help`` points
    there: the help loads no loader), as many as the README says."""
    from qkvmean.cli import main

    assert main(["--version", "--verbose"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("families"))
    assert line.split(None, 1)[1] == M.families_text()
    assert [part.split(" (")[0] for part in M.families_text().split("), ")] == list(M.FAMILIES)
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "of a family that 'qkvmean --version --verbose' lists" in text
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert f"of one of {len(M.FAMILIES)} `model_type`s" in readme


def test_cli_runs_a_family_and_warns_about_tokens_on_causal(family_dirs, tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "qkvmean", "run", "--quiet", *args],
            capture_output=True, text=True, cwd=tmp_path,
        )  # fmt: skip

    d = family_dirs["qwen3"]
    ok = run("--model", str(d), "--ablate-layers", "1", "--over", "causal", "--out", "a.h5")
    assert ok.returncode == 0, ok.stderr
    assert "leaks" not in ok.stderr
    shown = subprocess.run(
        [sys.executable, "-m", "qkvmean", "inspect", "a.h5"], capture_output=True, text=True,
        cwd=tmp_path,
    ).stdout  # fmt: skip
    assert "architecture pre-norm rms, silu_gated, rotary (theta 10000, 16 dims, linear x2), " \
        "4 heads / 2 KV heads of 16, q/k norm" in shown  # fmt: skip
    warned = run("--model", str(d), "--heads", "0,1", "--over", "tokens", "--out", "b.h5")
    assert warned.returncode == 0, warned.stderr
    lines = [line for line in warned.stderr.splitlines() if "leaks later tokens" in line]
    assert len(lines) == 1 and "--over causal" in lines[0]
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    edit_config(bad, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4})
    refused = run("--model", str(bad), "--out", "c.h5")
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "rope type 'dynamic'" in refused.stderr
    # OLMo 2's keys by whole KV groups: a split group refused before any work, in one
    # line; a head sweep of K likewise; Q alone in the same heads runs
    olmo = str(family_dirs["olmo2"])
    for args in (("--heads", "1"), ("--sweep", "heads", "--targets", "k")):
        split = run("--model", olmo, *args, "--out", "d.h5")
        assert split.returncode == 2, split.stderr
        assert split.stderr.count("\n") == 1, split.stderr
        assert "select all of query heads 0..1 (KV head 0) or none" in split.stderr
        assert not list(tmp_path.glob("d.h5*"))
    assert run("--model", olmo, "--heads", "1", "--targets", "q", "--out", "e.h5").returncode == 0


def test_model_conditions_refuses_what_the_kernels_cannot_take(loaded):
    w = loaded["llama"].weights
    ids = np.array([[1, 2, 3]])
    for kwargs, rx in [
        (dict(ablate_layers=(-1,)), "layer -1 is out of range for 3 layers"),
        (dict(seq=2), r"seq >= 3"),
    ]:
        with pytest.raises(ValueError, match=rx):
            T.model_conditions(w, ids, [3], **kwargs)
    with pytest.raises(ValueError, match=r"lengths of shape \(1,\) within \[0, 3\]"):
        T.model_conditions(w, ids, [4])
    # (CuPy wraps an index past the embeddings around instead of raising)
    for bad in (w.vocab_size, -1):
        with pytest.raises(ValueError, match=rf"token ids must lie in \[0, {w.vocab_size}\)"):
            T.model_conditions(w, np.array([[1, bad, 3]]), [3])
    import dataclasses

    short = dataclasses.replace(w.layers[0], bqkv=w.layers[0].bqkv[:-1])
    with pytest.raises(ValueError, match=r"layer 0: bqkv has shape \(63,\), the architecture"):
        dataclasses.replace(w, layers=[short, *w.layers[1:]])
