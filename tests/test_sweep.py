"""Conditions as data (qkvmean.engine.condition) and the branching forward pass: a sweep's
conditions, each with its own layers and heads, against the float64 reference run one
condition at a time; the chunks that share the layers before a branch against running
each condition alone; ``run --sweep`` into a version 2 store (condition table, effects,
maps at --maps-layers only), its resume after SIGKILL, and its bad specs."""

from __future__ import annotations

import json
import sys

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from model_support import padded_ids
from support import killed_at, store_datasets, texts_file

import qkvmean
from qkvmean.cli import main
from qkvmean.engine import condition as C
from qkvmean.engine import plan as P
from qkvmean.engine import reference as ref
from qkvmean.engine import synthetic
from qkvmean.engine import transformer as T
from qkvmean.store import workdir

TEXTS = ["the cat sat on the mat", "mean keys make every row uniform", "short", "a b c d e"]
KINDS = ["tokens", "causal", "window:2", "zero", "resample:1"]


@pytest.fixture(scope="module")
def model():
    weights, tok = synthetic.build()
    ids, lengths = padded_ids(tok, TEXTS)
    return weights, ids, lengths


def _reference(weights, ids, lengths, cond):
    """The reference maps (per layer) and final hidden states of one condition."""
    return ref.transformer_forward(
        weights, ids, lengths, target=cond.target, over=cond.substitution.spec,
        heads=None if cond.heads is None else list(cond.heads), ablate_layers=cond.layers,
    )  # fmt: skip


def test_labels_records_and_the_sweeps():
    sub = "zero"
    layers = C.sweep("layers", "qv", [1, 3], 4, sub)
    assert [c.label for c in layers] == ["zero_q@L1", "zero_q@L3", "zero_v@L1", "zero_v@L3"]
    heads = C.sweep("heads", "k", [2], 3)
    assert [c.label for c in heads] == ["mean_k@L2H0", "mean_k@L2H1", "mean_k@L2H2"]
    assert heads[1].record() == {
        "target": "k", "layers": "[2]", "heads": "[1]", "substitution": "tokens"
    }  # fmt: skip
    assert [c.label for c in C.plain("qkv", "causal", [0])] == ["mean_q", "mean_k", "mean_v"]
    table = C.table(heads)
    for i, cond in enumerate(heads, start=1):  # a row reads back as its condition
        row = {k: v[i] for k, v in table.items()}
        assert C.from_record(cond.label, row) == cond
    assert C.from_record("baseline", {k: v[0] for k, v in table.items()}) is None
    with pytest.raises(ValueError, match="unknown sweep"):
        C.sweep("tokens", "q", [0], 2)
    with pytest.raises(ValueError, match="two conditions are named 'mean_q'"):
        P.Plan(C.plain("qq", "tokens", [0]))


def test_chunks_share_the_layers_before_each_branch(monkeypatch):
    conds = C.sweep("heads", "qk", [0, 2], 2)  # 8 conditions, branching at 0 and 2
    plan = P.Plan(conds)
    assert plan.chunks(5, 4) == [(0, (1, 2, 5, 6)), (2, (3, 4, 7, 8))]
    monkeypatch.setattr(P, "STACK_ROWS", 20)  # at most max(3, 20 // 5 - 1) = 3 a chunk
    assert plan.chunks(5, 4) == [(0, (1, 2, 5)), (0, (6,)), (2, (3, 4, 7)), (2, (8,))]
    assert P.Plan().chunks(5, 4) == [(4, ())]  # no condition: the baseline alone


@settings(max_examples=12, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    picks=st.lists(
        st.tuples(
            st.sampled_from("qkv"),
            st.lists(st.integers(0, 3), min_size=1, max_size=2, unique=True),
            st.none() | st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True),
        ),
        min_size=1,
        max_size=6,
    ),
    rows=st.sampled_from([4096, 12]),
)
def test_each_condition_of_a_branching_pass_is_the_reference(model, kind, picks, rows):
    """Conditions with their own layers and heads, in chunks (``rows=12``: three
    conditions a chunk at most, so that many start from the baseline's kept rows): every layer's
    maps and every effect as the float64 reference of that condition alone."""
    weights, ids, lengths = model
    conds = tuple(
        C.Condition(t, tuple(layers), None if heads is None else tuple(heads), kind, f"c{i}")
        for i, (t, layers, heads) in enumerate(picks)
    )
    old = P.STACK_ROWS
    P.STACK_ROWS = rows
    try:
        got = T.model_conditions(weights, ids, lengths, over=kind, conditions=conds,
                                 effects=True, hidden=True)  # fmt: skip
    finally:
        P.STACK_ROWS = old
    assert got.names == ["baseline"] + [c.label for c in conds]
    hidden = [ref.transformer_forward(weights, ids, lengths)[1]]
    for cond in conds:
        maps, final = _reference(weights, ids, lengths, cond)
        hidden.append(final)
        for layer, want in enumerate(maps):
            for b, n in enumerate(lengths):
                np.testing.assert_allclose(
                    got.weights[cond.label][b, layer, :, :n, :n], want[b, :, :n, :n],
                    atol=2e-5, err_msg=f"{cond} layer {layer} input {b}",
                )  # fmt: skip
        # before its first layer a condition is the baseline, bit for bit, with KL 0
        before = slice(0, cond.first)
        np.testing.assert_array_equal(
            got.weights[cond.label][:, before], got.weights["baseline"][:, before]
        )
        assert (got.metrics["kl_from_baseline"][got.names.index(cond.label), :, before] == 0).all()
    want = ref.output_effects(weights, np.stack(hidden).astype(np.float32), ids, lengths)
    for name, value in got.effects.items():
        np.testing.assert_allclose(value, want[name], atol=2e-5, rtol=1e-4, err_msg=name)


def test_a_sweep_is_each_condition_run_alone(model):
    """The chunks of a heads sweep (several conditions a stack, later chunks from the
    kept rows) give what running each condition in a plain pass of its own gives, to
    float32 rounding: a stack's matrix products round a row's bits by where it lies (a
    condition that changes nothing, such as the causal mean of a one-token input, is ~1e-6
    from the baseline in a stack of nine)."""
    weights, ids, lengths = model
    conds = C.sweep("heads", "qv", [1, 3], weights.n_heads, "causal")
    swept = T.model_conditions(weights, ids, lengths, over="causal", conditions=conds,
                               effects=True, map_layers=[2, 3])  # fmt: skip
    for cond in conds:
        alone = T.model_conditions(weights, ids, lengths, targets=(cond.target,),
                                   over="causal", heads=cond.heads, ablate_layers=cond.layers,
                                   effects=True)  # fmt: skip
        c = swept.names.index(cond.label)
        for name, value in swept.metrics.items():
            np.testing.assert_allclose(value[c], alone.metrics[name][1], atol=1e-6, err_msg=name)
        for name, value in swept.effects.items():
            np.testing.assert_allclose(value[c], alone.effects[name][1], atol=1e-5, err_msg=name)
        got = swept.weights[cond.label]
        assert got.shape[1] == 2  # maps at layers 2 and 3 only
        np.testing.assert_allclose(got, alone.weights[alone.names[1]][:, 2:], atol=1e-6)


def test_bad_conditions_are_refused(model):
    weights, ids, lengths = model
    for conds, match in (
        ((C.Condition("q", (), None),), "substitutes at no layer"),
        ((C.Condition("q", (4,), None),), "layer 4 is out of range"),
        ((C.Condition("q", (0,), (7,)),), r"heads \[7\] out of range"),
        ((C.Condition("q", (0,), None, "zero"),), "a run has one substitution"),
    ):
        with pytest.raises(ValueError, match=match):
            T.model_conditions(weights, ids, lengths, conditions=conds)
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        T.model_conditions(weights, ids, lengths, map_layers=[9])


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    return texts_file(tmp_path_factory.mktemp("texts") / "t.txt", TEXTS)


def test_run_sweep_heads_writes_the_table_and_effects(tmp_path, texts, model):
    weights, ids, lengths = model
    out = tmp_path / "s.h5"
    assert main(["run", "--model", "synthetic", "--text", str(texts), "--sweep", "heads",
                 "--over", "causal", "--batch-size", "3", "-o", str(out), "-q"]) == 0  # fmt: skip
    conds = C.sweep("heads", "qkv", range(4), 4, "causal")
    with h5py.File(out) as f:
        assert f.attrs["format_version"] == 2
        assert "attention" not in f and f["map_layer"].shape == (0,)  # a sweep keeps no maps
        names = [x.decode() for x in f["metrics/condition"][...]]
        assert names == ["baseline"] + [c.label for c in conds] and len(names) == 49
        table = {k: [x.decode() for x in f["conditions"][k][...]] for k in f["conditions"]}
        assert table == C.table(conds)
        assert sorted(f["effects"]) == ["ce_change", "hidden_change", "kl_next_token"]
        for name in f["effects"]:
            d = f["effects"][name]
            assert d.shape == (49, len(TEXTS)) and d.dtype == np.float32
            assert [next(iter(dim.keys())) for dim in d.dims] == ["condition", "batch"]
        assert json.loads(f.attrs["config"])["sweep"] == "heads"
    want = T.model_conditions(weights, ids, lengths, over="causal", conditions=conds,
                              effects=True, maps=False)  # fmt: skip
    with qkvmean.open_store(out) as s:
        assert s.sweep == "heads" and s.map_layer_ids == []
        assert s.condition_table[5] == {"label": "mean_q@L1H0", "target": "q", "layers": [1],
                                        "heads": [0], "substitution": "causal"}  # fmt: skip
        for name in s.effects:  # batches of 3 or all at once: the same numbers
            np.testing.assert_allclose(s.effect(name), want.effects[name], atol=1e-6)
        np.testing.assert_allclose(s.metric("entropy"), want.metrics["entropy"], atol=1e-6)
        assert (s.effect("kl_next_token")[1:].max(axis=1) > 0).all()  # each moves the output
        assert (s.effect("kl_next_token")[0] == 0).all()


def test_maps_layers_keep_those_layers_only(tmp_path, texts):
    out = tmp_path / "m.h5"
    assert main(["run", "--model", "synthetic", "--text", str(texts), "--sweep", "layers",
                 "--maps-layers", "3,1", "-o", str(out), "-q"]) == 0  # fmt: skip
    plain = tmp_path / "p.h5"
    assert main(["run", "--model", "synthetic", "--text", str(texts), "--ablate-layers", "2",
                 "-o", str(plain), "-q", "--no-effects"]) == 0  # fmt: skip
    with qkvmean.open_store(out) as s, qkvmean.open_store(plain) as p:
        assert s.map_layer_ids == [1, 3] and s.maps("mean_k@L2").shape[1] == 2
        # the layers sweep's condition at layer 2 is the plain run's at layer 2
        np.testing.assert_allclose(s.map("mean_k@L2", 0, layer=3, head=1),
                                   p.map("mean_k", 0, layer=3, head=1), atol=1e-6)  # fmt: skip
        with pytest.raises(ValueError, match="keeps no maps at layer 0"):
            s.map("baseline", 0, layer=0)
        assert p.effects == [] and p.map_layer_ids == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sweep", "heads", "--maps-layers", "4"], r"--maps-layers: layer 4 is out of range"),
        (["--sweep", "heads", "--maps-layers", "1", "--no-maps"], r"--no-maps keeps none"),
        (["--sweep", "rows"], r"invalid choice: 'rows'"),
        (["--sweep", "heads", "--over", "window:0"], r"window:0 averages no token"),
        (["--sweep", "layers", "--ablate-layers", "7"], r"layer 7 is out of range"),
        (["--sweep", "heads", "--heads", "5"], r"--heads: head 5 is out of range"),
    ],
)
def test_bad_sweep_specs_exit_2_in_one_line(tmp_path, texts, capsys, extra, message):
    out = tmp_path / "bad.h5"
    argv = ["run", "--model", "synthetic", "--text", str(texts), "-o", str(out), *extra]
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's own refusals
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": warning: " not in line]
    assert len(lines) == 1 and __import__("re").search(message, lines[0]), err
    assert not out.exists()


def test_a_sweep_of_raw_qkv_is_refused(tmp_path, capsys):
    from test_store import make_qkv

    make_qkv(tmp_path / "in.h5", n=2, layers=1, heads=2, seq=4)
    assert main(["run", "--qkv", str(tmp_path / "in.h5"), "--sweep", "heads",
                 "-o", str(tmp_path / "o.h5")]) == 2  # fmt: skip
    assert "--sweep applies to --model runs" in capsys.readouterr().err


def test_a_killed_sweep_resumes_to_the_same_store(tmp_path, texts):
    args = ["run", "--model", "synthetic", "--text", str(texts), "--sweep", "heads",
            "--over", "resample:2", "--maps-layers", "3", "--batch-size", "1", "-q"]  # fmt: skip
    ref_out = tmp_path / "ref.h5"
    assert main([*args, "--out", str(ref_out)]) == 0
    out = tmp_path / "out.h5"
    cmd = [sys.executable, "-m", "qkvmean", *args, "--out", str(out)]
    killed_at(cmd, "journaled:2")
    assert len(list(workdir.partial_dir(out).glob("batch-*.npz"))) == 2
    assert main([*args, "--out", str(out), "--resume"]) == 0
    a, b = store_datasets(ref_out), store_datasets(out)
    assert sorted(a) == sorted(b) and "effects/kl_next_token" in a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_a_sweep_journals_in_batches_of_a_few_inputs(monkeypatch):
    """The automatic batch of a model run holds about CONDITION_INPUTS condition passes
    (a 433-condition sweep: 9 inputs, so a kill loses minutes, not the run), a multiple
    of the threads, never fewer than their tasks; a plain run's stays as large as memory
    allows."""
    from types import SimpleNamespace

    from qkvmean.run import batching

    monkeypatch.setattr(batching, "compute_threads", lambda: 1)
    source = SimpleNamespace(n_inputs=100, tasks_per_input=True, bytes_per_input=lambda: 10)
    assert batching.auto_batch_size(source, 433) == 4096 // 433 == 9
    assert batching.auto_batch_size(source, 4) == 100
    monkeypatch.setattr(batching, "compute_threads", lambda: 2)  # a multiple of the threads
    assert batching.auto_batch_size(source, 433) == 10
    monkeypatch.setattr(batching, "compute_threads", lambda: 8)
    assert batching.auto_batch_size(source, 433) == batching.TASKS_PER_THREAD * 8
