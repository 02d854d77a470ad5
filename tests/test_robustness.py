"""What a hostile user tried: nothing lost, nothing stale, no traceback.

Each test here is one finding of a reliability campaign (issue 10): an output written over
its own input, a resume that kept results of a changed input or trusted a tampered
journal, a model run on a config that disagrees with its weights, inputs and stores that
cannot work or are damaged, and the messages that said the wrong thing. In-process runs
(``main``) raise any unexpected exception, so a test that passes had no traceback.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from model_support import edit_config, write_gpt2_dir
from support import skip_or_fail, stopped_at, without_notes
from test_run import _assert_same_store
from test_store import make_qkv

import qkvmean
from qkvmean.cli import main
from qkvmean.run import local
from qkvmean.store import workdir, writer


def expect(capsys, code, argv, rx):
    """``main(argv)`` exits ``code`` with one line on stderr that matches ``rx``."""
    assert main([str(a) for a in argv]) == code
    err = without_notes(capsys.readouterr().err)
    assert err.count("\n") == 1, err
    assert re.search(rx, err), err
    return err


def leftovers(directory, name):
    """What a refused run left next to ``name``: partial directories, staging, temps."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(f"{name}."))


@pytest.fixture()
def qkv_input(tmp_path):
    path = tmp_path / "in.h5"
    make_qkv(path, n=12, layers=2, heads=3, seq=7, dim=4, causal=True, seed=9)
    return path


def fail_at(monkeypatch, start):
    """The run fails (an I/O error) when it comes to write the batch at ``start``."""
    original = writer.Assembly.add

    def add(self, first, *args, **kwargs):
        if first == start:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return original(self, first, *args, **kwargs)

    monkeypatch.setattr(writer.Assembly, "add", add)
    return original


# --------------------------------------------------------------- 1. own input overwritten


def test_render_never_writes_over_the_store_it_reads(tmp_path, qkv_input, capsys):
    store = tmp_path / "run.png"  # a store whose name ends in an image extension
    assert main(["run", "--qkv", str(qkv_input), "--out", str(store), "-q"]) == 0
    before = store.read_bytes()
    (tmp_path / "link.png").symlink_to(store)
    os.link(store, tmp_path / "hard.png")
    for out in (store, tmp_path / "link.png", tmp_path / "hard.png"):
        expect(capsys, 2, ["render", store, "-o", out, "--overwrite"], r"is an input of this")
    assert store.read_bytes() == before
    assert (tmp_path / "link.png").is_symlink()


def test_run_and_figure_never_write_over_their_inputs(tmp_path, qkv_input, capsys):
    before = qkv_input.read_bytes()
    os.link(qkv_input, tmp_path / "hard.h5")
    (tmp_path / "soft.h5").symlink_to(qkv_input)
    for out in (qkv_input, tmp_path / "hard.h5", tmp_path / "soft.h5"):
        argv = ["run", "--qkv", qkv_input, "--out", out, "--overwrite", "-q"]
        expect(capsys, 2, argv, r"is an input of this command")
    assert qkv_input.read_bytes() == before
    model = write_gpt2_dir(tmp_path / "gpt2", n_layer=1)
    texts = tmp_path / "t.txt"
    texts.write_text("the quick brown fox\n")
    weights = (model / "model.safetensors").read_bytes()
    for out in (model / "model.safetensors", texts):
        argv = ["run", "--model", model, "--text", texts, "--out", out, "--overwrite", "-q"]
        expect(capsys, 2, argv, r"is an input of this command")
    # figure: its store FIGURE.h5 a link to the weights
    (tmp_path / "fig.h5").symlink_to(model / "model.safetensors")
    argv = ["figure", "--model", model, "-o", tmp_path / "fig.png", "--overwrite", "-q"]
    expect(capsys, 2, argv, r"fig.h5: is an input of this command")
    assert (model / "model.safetensors").read_bytes() == weights


# ------------------------------------------------------------ 2. an input that changed


def _rewrite(path, name, index, value):
    with h5py.File(path, "r+") as f:
        data = f[name][...]
        data[index] = value
        f[name][...] = data


def test_resume_recomputes_batches_whose_inputs_changed_and_says_so(
    tmp_path, qkv_input, monkeypatch, capsys
):
    """A middle input changed between the kill and the resume: the batch that holds it is
    computed again from the new values (and named); the others are copied."""
    base = ["run", "--qkv", str(qkv_input), "--batch-size", "2", "--quiet"]
    out = tmp_path / "o.h5"
    original = fail_at(monkeypatch, 10)
    assert main([*base, "--out", str(out)]) == 1
    capsys.readouterr()
    _rewrite(qkv_input, "k", 5, 0.25)  # input 5: batch 4..6, neither first nor last input
    monkeypatch.setattr(writer.Assembly, "add", original)
    assert main([*base, "--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "inputs 4..5 changed since the interrupted run read them (k of input 5" in err
    assert main([*base, "--out", str(tmp_path / "ref.h5")]) == 0  # the changed input, whole
    _assert_same_store(out, tmp_path / "ref.h5")


def test_resume_of_a_complete_store_names_an_input_that_changed(tmp_path, qkv_input, capsys):
    out = tmp_path / "o.h5"
    argv = ["run", "--qkv", qkv_input, "--out", out, "-q"]
    assert main([str(a) for a in argv]) == 0
    assert main([str(a) for a in [*argv, "--resume"]]) == 0  # unchanged: nothing to do
    _rewrite(qkv_input, "v", 7, 1.5)
    expect(capsys, 2, [*argv, "--resume"], r"the input changed since it was made \(v of input 7")


# --------------------------------------------------------- 3. journal entries checksummed


def test_a_journal_entry_whose_metrics_changed_is_not_trusted(
    tmp_path, qkv_input, monkeypatch, capsys
):
    base = ["run", "--qkv", str(qkv_input), "--batch-size", "2", "--quiet"]
    out = tmp_path / "o.h5"
    original = fail_at(monkeypatch, 10)
    assert main([*base, "--out", str(out)]) == 1
    entries = workdir.journal(workdir.partial_dir(out))
    with np.load(entries[(4, 6)]) as z:  # the entropy of one head, changed; all else kept
        fields = {name: z[name] for name in z.files}
    fields["entropy"] = fields["entropy"] + np.float32(0.5)
    with open(entries[(4, 6)], "wb") as fh:
        np.savez(fh, **fields)
    added = []

    def add(self, start, *args, **kwargs):
        added.append(start)
        return original(self, start, *args, **kwargs)

    monkeypatch.setattr(writer.Assembly, "add", add)
    assert main([*base, "--out", str(out), "--resume"]) == 0
    assert sorted(added) == [4, 10]  # the tampered batch and the one never written
    monkeypatch.setattr(writer.Assembly, "add", original)
    assert main([*base, "--out", str(tmp_path / "ref.h5")]) == 0
    _assert_same_store(out, tmp_path / "ref.h5")


# ----------------------------------------------------- 4. config.json against the weights


def test_a_config_that_disagrees_with_the_weights_is_refused(tmp_path, capsys):
    model = write_gpt2_dir(tmp_path / "gpt2", n_layer=3)
    texts = tmp_path / "t.txt"
    texts.write_text("the quick brown fox\n")
    argv = ["run", "--model", model, "--text", texts, "--out", tmp_path / "o.h5", "-q"]
    edit_config(model, n_layer=2)  # the checkpoint has three
    expect(
        capsys,
        2,
        argv,
        r"tensor 'h\.2\.attn\.c_attn\.bias' and \d+ more has no place .*n_layer = 2",
    )
    edit_config(model, n_layer=3)
    assert main([str(a) for a in argv]) == 0
    assert not leftovers(tmp_path, "o.h5")


def test_a_bert_config_with_fewer_layers_is_refused(tmp_path, capsys):
    from qkvmean.io import models as M

    if not M.minilm_available():
        skip_or_fail("MINILM", f"all-MiniLM-L6-v2 not installed ({M.MINILM_INSTALL})")
    model = tmp_path / "minilm"
    shutil.copytree(M.minilm_path(), model)
    edit_config(model, num_hidden_layers=5)
    argv = ["run", "--model", model, "--out", tmp_path / "o.h5", "-q"]
    expect(capsys, 2, argv, r"'encoder\.layer\.5\..*has no place .*num_hidden_layers = 5")


# ------------------------------------------------ 5. shapes that cannot work, found first


def test_declared_shapes_that_cannot_work_are_refused_up_front(tmp_path, capsys):
    long = tmp_path / "long.h5"
    with h5py.File(long, "w") as f:  # one input of a million tokens: 4 TB per map
        for name in "qkv":
            f.create_dataset(
                name, data=np.ones((1, 1, 10**6, 1), np.float32), chunks=(1, 1, 10**5, 1)
            )
    out = tmp_path / "o.h5"
    expect(capsys, 2, ["run", "--qkv", long, "--out", out], r"cannot be stored: one map takes 4 TB")
    expect(
        capsys, 2, ["run", "--qkv", long, "--out", out, "--no-maps"], r"more than this machine's"
    )
    never = tmp_path / "never.h5"
    with h5py.File(never, "w") as f:  # 10^8 inputs declared, ten written
        for name in "qkv":
            d = f.create_dataset(name, shape=(10**8, 1, 4, 2), chunks=(1000, 1, 4, 2), dtype="f4")
            d[:10] = 1.0
    expect(capsys, 2, ["run", "--qkv", never, "--out", out], r"only 1 of its 100000 chunks")
    assert not leftovers(tmp_path, "o.h5") and not out.exists()


def test_a_batch_larger_than_memory_is_refused(tmp_path, qkv_input, monkeypatch, capsys):
    from qkvmean import resources

    monkeypatch.setattr(resources, "memory_limit", lambda: 10e3)
    argv = ["run", "--qkv", qkv_input, "--out", tmp_path / "o.h5", "--batch-size", "12"]
    expect(
        capsys, 2, argv, r"one batch \(12 inputs .* more than this machine's 10 kB .*--batch-size"
    )


# ----------------------------------------------------------------------- 6. texts


def test_texts_with_a_nul_or_a_bom(tmp_path, capsys):
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"fine\nbad\x00text\n")
    argv = ["run", "--model", "synthetic", "--text", nul, "--out", tmp_path / "o.h5"]
    expect(capsys, 2, argv, r"nul.txt:2: contains a NUL character")
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"text": "a\\u0000b"}\n{"text": "lone \\ud800"}\n')
    argv[4] = jsonl
    expect(capsys, 2, argv, r"t.jsonl:1: contains a NUL character")
    jsonl.write_text('{"text": "lone \\ud800"}\n')
    expect(capsys, 2, argv, r"t.jsonl:1: contains an unpaired surrogate")
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffThe cat sat.\nA dog.\n".encode())
    argv[4] = bom
    assert main([str(a) for a in [*argv, "-q"]]) == 0
    with qkvmean.open_store(tmp_path / "o.h5") as s:
        assert s.texts == ["The cat sat.", "A dog."]
        assert not any("\ufeff" in t for t in s.tokens(0))
    assert not leftovers(tmp_path, "o.h5")


# --------------------------------------------------------------- 7. links to nowhere


def test_q_as_a_link_to_nothing(tmp_path, capsys):
    q = np.ones((2, 1, 3, 2), np.float32)
    for name, link, rx in [
        ("soft.h5", h5py.SoftLink("/gone"), r"soft.h5:/q: is a soft link to /gone, which does not"),
        (
            "ext.h5",
            h5py.ExternalLink("missing.h5", "/q"),
            r"ext.h5:/q: is an external link to missing.h5:/q, which cannot be opened",
        ),
    ]:
        with h5py.File(tmp_path / name, "w") as f:
            f["k"], f["v"], f["q"] = q, q, link
        expect(capsys, 2, ["run", "--qkv", tmp_path / name, "--out", tmp_path / "o.h5"], rx)
    with h5py.File(tmp_path / "len.h5", "w") as f:
        f["q"], f["k"], f["v"], f["lengths"] = q, q, q, h5py.SoftLink("/nope")
    argv = ["run", "--qkv", tmp_path / "len.h5", "--out", tmp_path / "o.h5"]
    expect(capsys, 2, argv, r"/lengths: is a soft link to /nope")
    assert not leftovers(tmp_path, "o.h5")


# ------------------------------------------------------------------- 8. damaged stores


@pytest.fixture(scope="module")
def good_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("damage")
    make_qkv(tmp / "in.h5", n=5, layers=2, heads=2, seq=6, dim=3)
    out = tmp / "good.h5"
    assert main(["run", "--qkv", str(tmp / "in.h5"), "--out", str(out), "-q"]) == 0
    return out


def _delete(path):
    def damage(f):
        del f[path]

    return damage


def _attr(name, value):
    def damage(f):
        f.attrs[name] = value

    return damage


def _replace(path, data):
    def damage(f):
        del f[path]
        f[path] = data

    return damage


DAMAGE = {
    "no entropy": (_delete("metrics/entropy"), r"no /metrics/entropy"),
    "no lengths": (_delete("input/lengths"), r"no /input/lengths"),
    "no mean_k maps": (_delete("attention/mean_k"), r"no /attention/mean_k"),
    "no seq scale": (_delete("seq"), r"no /seq"),
    "no layer scale": (_delete("layer"), r"no /layer"),
    "config not JSON": (_attr("config", "{not json"), r"config attribute is not JSON"),
    "config a list": (_attr("config", "[1, 2]"), r"config attribute is not a JSON object"),
    "format_version a word": (
        _attr("format_version", "one"),
        r"format_version 'one' is not an integer",
    ),
    "format_version 1.5": (_attr("format_version", 1.5), r"format_version 1.5 is not an integer"),
    "attention a dataset": (_replace("attention", np.zeros(3)), r"/attention is a dataset"),
    "unknown condition": (
        _replace(
            "metrics/condition",
            np.array(["baseline", "mean_q", "mean_x", "mean_v"], dtype=h5py.string_dtype()),
        ),
        r"condition 'mean_x' does not match its row of the condition table",
    ),
    "maps shorter than metrics": (
        _replace("attention/mean_v", np.zeros((4, 2, 2, 6, 6), np.float32)),
        r"/attention/mean_v has shape \(4, 2, 2, 6, 6\), expected \(5, 2, 2, 6, 6\)",
    ),
    "negative length": (
        _replace("input/lengths", np.array([6, -1, 2, 3, 4], np.int32)),
        r"length -1, outside 0..6",
    ),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_stores_are_refused_by_inspect_and_render(tmp_path, good_store, damage, capsys):
    edit, rx = DAMAGE[damage]
    path = tmp_path / "s.h5"
    shutil.copy(good_store, path)
    with h5py.File(path, "r+") as f:
        edit(f)
    for argv in (
        ["inspect", path],
        ["inspect", "--json", path],
        ["render", path, "-o", tmp_path / "f.png"],
    ):
        expect(capsys, 2, argv, rx)
    assert not (tmp_path / "f.png").exists()
    with pytest.raises(ValueError, match=rx):
        qkvmean.open_store(path)


def test_a_damaged_chunk_and_nan_maps_are_named_not_drawn(tmp_path, good_store, capsys):
    path = tmp_path / "s.h5"
    shutil.copy(good_store, path)
    with h5py.File(path, "r") as f:
        info = f["attention/mean_k"].id.get_chunk_info_by_coord((3, 1, 0, 0, 0))
    with open(path, "r+b") as fh:  # garble the deflate stream of input 3, layer 1
        fh.seek(info.byte_offset + 2)
        fh.write(bytes(64))
    assert main(["inspect", str(path)]) == 0  # inspect reads no maps
    capsys.readouterr()
    argv = ["render", path, "-o", tmp_path / "f.png", "--inputs", "3", "--layer", "1"]
    expect(capsys, 2, argv, r"cannot read the maps of input 3, condition mean_k, layer 1 .*damaged")
    shutil.copy(good_store, path)
    with h5py.File(path, "r+") as f:
        d = f["attention/mean_q"]
        m = d[2, 1]
        m[0, 0, 0] = np.nan
        d[2, 1] = m
    argv = ["render", path, "-o", tmp_path / "f.png", "--inputs", "0,2"]
    expect(capsys, 2, argv, r"the maps of input 2, condition mean_q, layer 1 hold NaN")
    assert not (tmp_path / "f.png").exists()


# ----------------------------------------------------------------------- 9. titles


def test_a_title_that_is_not_mathtext(tmp_path, good_store, capsys):
    argv = ["render", good_store, "-o", tmp_path / "f.png", "--title", r"$\frac{1}$ of it"]
    expect(capsys, 2, argv, r"--title .* is not valid mathtext")
    assert not (tmp_path / "f.png").exists()
    argv[-1] = r"costs $5, or \$6: $\alpha$"
    assert main([str(a) for a in argv]) == 0


# --------------------------------------------------------------- 10. larger than memory


def test_api_results_larger_than_memory_are_one_value_error():
    q = np.broadcast_to(np.float32(0.5), (4096, 64, 4096, 8))  # 16 GB of input, 17 TB out
    for call in (
        lambda: qkvmean.attention_weights(q, q),
        lambda: qkvmean.attention(q, q, q),
        lambda: qkvmean.ablate(q, q, q, target="k"),
        lambda: qkvmean.conditions(q, q),
    ):
        with pytest.raises(ValueError, match=r"would take [\d.]+ TB, more than this machine's"):
            call()


def test_api_memory_error_while_allocating_becomes_a_value_error(monkeypatch):
    from qkvmean.engine.backends import cpu

    def attention(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(cpu, "attention", attention)
    q = np.ones((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match=r"out of memory: the results need"):
        qkvmean.attention_weights(q, q)


# ----------------------------------------------------------------- 11. what messages say


def test_a_truncated_input_is_called_truncated_not_locked(tmp_path, qkv_input, capsys):
    data = qkv_input.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: len(data) // 2])
    err = expect(
        capsys,
        2,
        ["run", "--qkv", cut, "--out", tmp_path / "o.h5"],
        r"cut.h5: cannot open: the file is truncated",
    )
    assert "lock" not in err.replace("block", "")
    store = tmp_path / "s.h5"
    assert main(["run", "--qkv", str(qkv_input), "--out", str(store), "-q"]) == 0
    cut.write_bytes(store.read_bytes()[:3000])
    expect(capsys, 2, ["inspect", cut], r"cut.h5: cannot open: the file is truncated")


# ------------------------------------------------------------ 12. --out a dangling link


def test_out_as_a_dangling_link_is_refused_before_any_work(
    tmp_path, qkv_input, monkeypatch, capsys
):
    out = tmp_path / "o.h5"
    out.symlink_to(tmp_path / "nowhere" / "x.h5")
    computed = []
    monkeypatch.setattr(local, "_compute_batches", lambda *a: computed.append(1))
    argv = ["run", "--qkv", qkv_input, "--out", out, "-q"]
    expect(capsys, 2, argv, r"o.h5: is a symbolic link that leads nowhere .*--overwrite")
    assert not computed and not leftovers(tmp_path, "o.h5")
    monkeypatch.undo()
    assert main([str(a) for a in [*argv, "--overwrite"]]) == 0
    assert not out.is_symlink() and h5py.is_hdf5(out)


# ----------------------------------------------------- 13. resuming a killed --overwrite


def test_a_killed_overwrite_run_resumes_with_the_same_command(
    tmp_path, qkv_input, monkeypatch, capsys
):
    out = tmp_path / "o.h5"
    base = ["run", "--qkv", str(qkv_input), "--out", str(out), "--batch-size", "2", "-q"]
    assert main(base) == 0  # the store the user means to replace
    original = fail_at(monkeypatch, 6)
    assert main([*base, "--over", "causal", "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "--resume" in err
    monkeypatch.setattr(writer.Assembly, "add", original)
    expect(
        capsys, 2, [*base, "--over", "causal", "--resume"], r"continue it with --resume --overwrite"
    )
    assert main([*base, "--over", "causal", "--overwrite", "--resume"]) == 0
    with qkvmean.open_store(out) as s:
        assert s.attrs["over"] == "causal"
    assert not workdir.partial_dir(out).exists()
    assert main([*base, "--over", "causal", "--out", str(tmp_path / "ref.h5")]) == 0
    _assert_same_store(out, tmp_path / "ref.h5")


def test_a_kill_after_the_final_rename_is_complete_on_resume(
    tmp_path, qkv_input, monkeypatch, capsys
):
    """Killed after the store was put in place, before its partial directory was removed
    (or while it was being removed): the resume, with or without --overwrite, recognises
    the finished store, and what the kill left is cleared away."""
    out = tmp_path / "o.h5"
    argv = ["run", "--qkv", str(qkv_input), "--out", str(out), "--batch-size", "4"]

    def killed(work):  # the store is in place; the partial directory stays
        raise KeyboardInterrupt

    real_unlink = Path.unlink

    def killed_midway(self, *args, **kwargs):  # killed after its first file went
        real_unlink(self, *args, **kwargs)
        if self.parent.name.endswith(".done"):
            raise KeyboardInterrupt

    for extra in ([], ["--overwrite"]):
        monkeypatch.setattr(workdir, "discard", killed)
        assert main([*argv, "-q", *extra]) == 130
        monkeypatch.undo()
        assert out.exists() and workdir.partial_dir(out).exists()
        capsys.readouterr()
        assert main([*argv, "--resume", *extra]) == 0
        assert "already complete" in capsys.readouterr().out
        assert not workdir.partial_dir(out).exists()
    monkeypatch.setattr(Path, "unlink", killed_midway)
    assert main([*argv, "-q", "--overwrite"]) == 130
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert not workdir.partial_dir(out).exists() and leftovers(tmp_path, "o.h5")
    assert main([*argv, "--resume"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert not leftovers(tmp_path, "o.h5")


def test_files_beside_the_output_that_are_not_ours_are_left_alone(tmp_path, qkv_input, capsys):
    """Names like the run's own (temporary files, a partial directory, one being created
    or deleted) that hold a user's files: never deleted, never used."""
    out = tmp_path / "s.h5"
    mine = tmp_path / "s.h5.in.tmp"
    shutil.copy(qkv_input, mine)
    assert main(["run", "--qkv", str(mine), "--out", str(out), "-q"]) == 0
    assert mine.exists()
    (tmp_path / "s.h5.partial.1.new").write_text("a note")  # a file, not a directory
    (tmp_path / "s.h5.partial.2.done").mkdir()
    (tmp_path / "s.h5.partial.2.done" / "thesis.tex").write_text("precious")
    assert main(["run", "--qkv", str(qkv_input), "--out", str(tmp_path / "t.h5"), "-q"]) == 0
    work = tmp_path / "s.h5.partial"
    work.mkdir()
    shutil.copy(qkv_input, work / "in.h5")
    for extra in ([], ["--overwrite"], ["--resume"]):
        argv = ["run", "--qkv", qkv_input, "--out", out, *extra]
        expect(
            capsys,
            2,
            argv,
            r"s.h5.partial: is where this run would keep its work, but it holds in.h5",
        )
    argv = ["run", "--qkv", work / "in.h5", "--out", out, "--overwrite"]
    expect(capsys, 2, argv, r"lies in .*s.h5.partial/, where the run writing")
    assert (work / "in.h5").exists() and (tmp_path / "s.h5.partial.1.new").read_text() == "a note"
    assert (tmp_path / "s.h5.partial.2.done" / "thesis.tex").exists()
    lookalike = tmp_path / "s.h5.partial.8.new"  # named like ours, no lock: the user's
    lookalike.mkdir()
    shutil.copy(qkv_input, lookalike / "store-2-2.h5")
    aside = tmp_path / "s.h5.partial.3.done"  # named like ours, holding this run's input
    aside.mkdir()
    shutil.copy(qkv_input, aside / "store-1-1.h5")
    argv = ["run", "--qkv", str(aside / "store-1-1.h5"), "--out", str(tmp_path / "u.h5")]
    assert main([*argv, "-q"]) == 0  # (u.h5's own names do not match s.h5's)
    out_argv = ["run", "--qkv", str(aside / "store-1-1.h5"), "--out", str(out), "--resume", "-q"]
    main(out_argv)  # refused (s.h5.partial holds in.h5); nothing beside it is swept
    capsys.readouterr()
    assert (aside / "store-1-1.h5").exists() and (lookalike / "store-2-2.h5").exists()
    shutil.rmtree(work)
    work.write_text("a file")
    argv = ["run", "--qkv", qkv_input, "--out", out, "--overwrite"]
    expect(capsys, 2, argv, r"s.h5.partial: is where .* but it is not a directory")


# ------------------------------------------------------------ 14. a full file system


def test_a_full_file_system_at_start_names_the_path_and_leaves_nothing(
    tmp_path, qkv_input, monkeypatch, capsys
):
    def full(path, data):
        path.write_bytes(b"")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(workdir, "atomic_json", full)
    out = tmp_path / "o.h5"
    argv = ["run", "--qkv", qkv_input, "--out", out]
    expect(capsys, 1, argv, rf"{re.escape(str(out))}.partial: cannot start the run: no space left")
    assert not leftovers(tmp_path, "o.h5")
    monkeypatch.undo()
    monkeypatch.setattr(local, "disk_free", lambda directory: 100.0)
    expect(capsys, 2, argv, r"needs at least .* for its metrics alone, and .* has 100 bytes free")
    assert not leftovers(tmp_path, "o.h5")


# --------------------------------------------------- 15. an interrupted run, a link loop


def test_render_and_open_store_on_an_interrupted_run_say_how_to_finish(
    tmp_path, qkv_input, monkeypatch, capsys
):
    out = tmp_path / "o.h5"
    fail_at(monkeypatch, 8)
    assert main(["run", "--qkv", str(qkv_input), "--out", str(out), "--batch-size", "4", "-q"]) == 1
    capsys.readouterr()
    rx = r"o.h5: not written yet: the run that writes it was interrupted with 8 of 12 inputs done"
    expect(capsys, 2, ["render", out, "-o", tmp_path / "f.png"], rx)
    with pytest.raises(ValueError, match=rx):
        qkvmean.open_store(out)
    (tmp_path / "a.h5").symlink_to(tmp_path / "b.h5")
    (tmp_path / "b.h5").symlink_to(tmp_path / "a.h5")
    for argv in (
        ["render", tmp_path / "a.h5", "-o", tmp_path / "f.png"],
        ["inspect", tmp_path / "a.h5"],
    ):
        expect(capsys, 2, argv, r"a.h5: is a symbolic link in a loop")
    expect(capsys, 2, ["run", "--qkv", tmp_path / "a.h5", "--out", tmp_path / "x.h5"], r"in a loop")


# ------------------------------------------------------------- 16. reproducibility


def test_the_batch_size_is_recorded_and_a_different_one_is_named_on_resume(
    tmp_path, qkv_input, monkeypatch, capsys
):
    out = tmp_path / "o.h5"
    argv = ["run", "--qkv", str(qkv_input), "--out", str(out), "-q"]
    original = fail_at(monkeypatch, 4)
    assert main([*argv, "--batch-size", "4"]) == 1
    monkeypatch.setattr(writer.Assembly, "add", original)
    capsys.readouterr()
    expect(capsys, 2, [*argv, "--batch-size", "3", "--resume"], r"batch_size = 4 \(now 3\)")
    assert main([*argv, "--resume"]) == 0  # without --batch-size: the run's own
    with qkvmean.open_store(out) as s:
        assert s.config["batch_size"] == 4
    assert main(["run", "--qkv", str(qkv_input), "--out", str(tmp_path / "auto.h5"), "-q"]) == 0
    with qkvmean.open_store(tmp_path / "auto.h5") as s:
        assert s.config["batch_size"] == 12  # the automatic size, as it was chosen


def _chunks(path):
    out = {}
    with h5py.File(path, "r") as f:
        for name, d in f["attention"].items():
            for i in range(d.id.get_num_chunks()):
                offset = d.id.get_chunk_info(i).chunk_offset
                out[name, offset] = d.id.read_direct_chunk(offset)[1]
    return out


def test_zlib_levels_write_the_same_chunk_bytes_and_the_machine_is_recorded(tmp_path, capsys):
    texts = tmp_path / "t.txt"
    texts.write_text("\n".join(f"text {i} " + "word " * (i % 7) for i in range(12)))
    argv = ["run", "--model", "synthetic", "--text", str(texts), "--compression", "deflate:4"]
    for name in ("a.h5", "b.h5"):
        assert main([*argv, "--out", str(tmp_path / name), "-q"]) == 0
    a, b = _chunks(tmp_path / "a.h5"), _chunks(tmp_path / "b.h5")
    assert a.keys() == b.keys() and all(a[key] == b[key] for key in a)
    with qkvmean.open_store(tmp_path / "a.h5") as s:
        env = s.config["environment"]
    assert env["numba_threads"] >= 1 and env["threading_layer"] and env["numpy"]
    assert all("architecture" in pool for pool in env["blas"])
    with h5py.File(tmp_path / "a.h5", "r+") as f:  # made on another machine: still the run
        config = json.loads(f.attrs["config"])
        config["environment"]["cpu"] = "another processor"
        f.attrs["config"] = json.dumps(config)
    assert main([*argv, "--out", str(tmp_path / "a.h5"), "--resume"]) == 0
    assert "already complete" in capsys.readouterr().out


def test_the_recorded_blas_is_numpys_whatever_else_is_loaded():
    """SciPy's OpenBLAS, loaded by whatever imported SciPy, is not the one that computed: the
    environment must not depend on it (two runs of one job recorded different configs)."""
    from threadpoolctl import threadpool_info

    from qkvmean.config import _numpy_blas

    loaded = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    assert loaded, "numpy's BLAS is loaded in this process"
    site = os.path.dirname(os.path.dirname(np.__file__))
    other = {
        **loaded[0],
        "filepath": os.path.join(site, "scipy.libs", "libscipy_openblas.so"),
        "version": "0.0.1",
        "architecture": "Elsewhere",
    }
    for pools in ([*loaded, other], [other, *loaded]):
        got = _numpy_blas(pools)  # (SciPy's own may be loaded here too: CI has SciPy)
        assert got and all("scipy.libs" not in p["filepath"] for p in got), got
    assert _numpy_blas([other]) == [other]  # nothing to tell them apart: all of them


# ------------------------------------------------------ more of the same kinds (campaign 2)


def test_outputs_never_replace_files_an_input_links_to(tmp_path, capsys):
    """The files behind external links and virtual datasets are inputs too; a virtual
    dataset whose source is missing is refused, not read as zeros."""
    q = np.ones((2, 1, 3, 2), np.float32)
    src = tmp_path / "src.h5"
    with h5py.File(src, "w") as f:
        f["q"], f["k"], f["v"] = q, q, q
    with h5py.File(tmp_path / "ext.h5", "w") as f:
        for name in "qkv":
            f[name] = h5py.ExternalLink("src.h5", f"/{name}")
    with h5py.File(tmp_path / "vds.h5", "w") as f:
        for name in "qkv":
            layout = h5py.VirtualLayout(shape=q.shape, dtype="f4")
            layout[:] = h5py.VirtualSource("src.h5", name, shape=q.shape)
            f.create_virtual_dataset(name, layout)
    before = src.read_bytes()
    for spec in ("ext.h5", "vds.h5"):
        argv = ["run", "--qkv", tmp_path / spec, "--out", src, "--overwrite", "-q"]
        expect(capsys, 2, argv, r"src.h5: is an input of this command")
    assert src.read_bytes() == before
    src.rename(tmp_path / "away.h5")
    argv = ["run", "--qkv", tmp_path / "vds.h5", "--out", tmp_path / "o.h5"]
    expect(capsys, 2, argv, r"vds.h5:/q: is a virtual dataset whose source file src.h5 does not")
    with h5py.File(tmp_path / "typed.h5", "w") as f:
        f["k"], f["v"] = q, q
        f["q"] = np.dtype("f4")  # a named datatype, not a dataset
    argv = ["run", "--qkv", tmp_path / "typed.h5", "--out", tmp_path / "o.h5"]
    expect(capsys, 2, argv, r"typed.h5:/q: is a named datatype, not a dataset")


def test_stores_with_attributes_and_text_of_the_wrong_kind(tmp_path, good_store, capsys):
    cases = {
        "format as an array": (
            _attr("format", np.array(["qkvmean-store", "x"], dtype=object)),
            r"not a qkvmean store",
        ),
        "causal a word": (
            _attr("causal", "perhaps"),
            r"its causal attribute 'perhaps' is not a boolean",
        ),
        "config deeply nested": (
            _attr("config", "[" * 100000 + "]" * 100000),
            r"config attribute is not JSON",
        ),
        "condition names not UTF-8": (
            _replace(
                "metrics/condition",
                np.array(
                    [b"baseline", b"mean_\xff", b"mean_k", b"mean_v"], dtype=h5py.string_dtype()
                ),
            ),
            r"/metrics/condition holds text that is not UTF-8",
        ),
    }
    for edit, rx in cases.values():
        path = tmp_path / "s.h5"
        shutil.copy(good_store, path)
        with h5py.File(path, "r+") as f:
            edit(f)
        for argv in (["inspect", "--json", path], ["render", path, "-o", tmp_path / "f.png"]):
            expect(capsys, 2, argv, rx)
    shutil.copy(good_store, path)
    with h5py.File(path, "r+") as f:  # odd values that are still a store: valid JSON out
        f.attrs["created_utc"] = np.nan
        f.attrs["causal"] = "false"
    assert main(["inspect", "--json", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["created_utc"] == "nan" and info["causal"] is False


def test_store_api_indices_must_be_ints(good_store):
    from qkvmean import render

    with qkvmean.open_store(good_store) as s:
        for bad in (1.5, True):
            with pytest.raises(TypeError, match="layer index must be an int"):
                s.map("baseline", 0, layer=bad)
            with pytest.raises(TypeError, match="must be an int"):
                render.draw(s, head=bad)
        with pytest.raises(
            ValueError, match=r"inputs slice\(None, None, None\).*out of range|Index"
        ):
            s.maps("baseline", 100)
        with pytest.raises(TypeError, match="inputs must be a sequence of ints"):
            render.draw(s, inputs=3)


def test_odd_options_and_names(tmp_path, qkv_input, capsys):
    texts = tmp_path / "t.txt"
    texts.write_text("the quick brown fox\n")
    base = ["run", "--model", "synthetic", "--text", texts, "--out", tmp_path / "o.h5"]
    expect(capsys, 2, [*base, "--ablate-layers", ","], r"--ablate-layers is empty")
    expect(
        capsys,
        2,
        ["run", "--model", "", "--text", texts, "--out", tmp_path / "o.h5"],
        r"--model is empty",
    )
    expect(capsys, 2, ["figure", "--model", " ", "-o", tmp_path / "f.png"], r"--model is empty")
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"text": ' + "[" * 100000 + "]" * 100000 + "}\n")
    expect(
        capsys,
        2,
        ["run", "--model", "synthetic", "--text", deep, "--out", tmp_path / "o.h5"],
        r"deep.jsonl:1: not valid JSON \(nested too deeply\)",
    )
    big = tmp_path / "big.jsonl"
    big.write_text('{"text": "a", "n": ' + "9" * 5000 + "}\n")
    expect(
        capsys,
        2,
        ["run", "--model", "synthetic", "--text", big, "--out", tmp_path / "o.h5"],
        r"big.jsonl:1: not valid JSON",
    )
    odd = tmp_path / "two\nlines.h5"
    expect(
        capsys,
        2,
        ["run", "--qkv", odd, "--out", tmp_path / "o.h5"],
        r"two\\nlines.h5: no such file",
    )
    expect(
        capsys,
        2,
        ["run", "--qkv", qkv_input, "--out", tmp_path / ("a" * 250 + ".h5")],
        r"the file name is too long",
    )
    assert (
        main(
            [
                "run",
                "--qkv",
                str(qkv_input),
                "--out",
                str(tmp_path / "b.h5"),
                "--batch-size",
                str(10**12),
                "-q",
            ]
        )
        == 0
    )
    argv = [
        "render",
        tmp_path / "b.h5",
        "-o",
        tmp_path / "f.png",
        "--title",
        "$" + "{" * 5000 + "x" + "}" * 5000 + "$",
    ]
    expect(capsys, 2, argv, r"--title .* is not valid mathtext")
    assert not leftovers(tmp_path, "o.h5")


def test_a_killed_render_leaves_no_temporary_file_behind(tmp_path, good_store, capsys):
    dead = tmp_path / ".f.png.999999999.tmp.png"  # a writer that no longer runs
    dead.write_bytes(b"half a png")
    alive = tmp_path / f".f.png.{os.getpid()}1.tmp.png"
    alive.write_bytes(b"")
    mine = tmp_path / ".f.png.notes.tmp.png"
    mine.write_bytes(b"the user's")
    assert main(["render", str(good_store), "-o", str(tmp_path / "f.png"), "-q"]) == 0
    assert not dead.exists() and mine.exists() and (tmp_path / "f.png").exists()


def test_an_interrupted_figure_says_what_to_do(tmp_path, monkeypatch, capsys):
    fail_at(monkeypatch, 0)
    out = tmp_path / "f.png"
    assert main(["figure", "--model", "synthetic", "-o", str(out), "-q"]) == 1
    monkeypatch.undo()
    capsys.readouterr()
    expect(
        capsys,
        2,
        ["figure", "--model", "synthetic", "-o", out],
        r"interrupted qkvmean figure left this; run the same command with --overwrite",
    )
    assert main(["figure", "--model", "synthetic", "-o", str(out), "-q", "--overwrite"]) == 0
    assert out.exists() and not leftovers(tmp_path, "f.h5")


def test_a_manifest_less_partial_directory_beside_a_complete_store(tmp_path, qkv_input, capsys):
    out = tmp_path / "o.h5"
    argv = ["run", "--qkv", str(qkv_input), "--out", str(out), "-q"]
    assert main(argv) == 0
    work = workdir.partial_dir(out)
    work.mkdir()
    (work / "lock").write_bytes(b"")  # what a kill while deleting it leaves: the lock last
    (work / "batch-0000000000-0000000004.npz").write_bytes(b"left by a kill")
    assert main([*argv, "--resume"]) == 0  # the store is complete: what is left goes
    assert not work.exists() and not leftovers(tmp_path, "o.h5")
    work.mkdir()
    (work / "lock").write_bytes(b"")
    expect(capsys, 2, argv, r"o.h5: exists; pass --overwrite|an interrupted run left this")


# ------------------------------------------- campaign 3: new instances of the same kinds

DAMAGED = Path(__file__).parent / "data" / "damaged"


def test_stores_whose_structure_hdf5_cannot_read_are_named_damaged(tmp_path, good_store, capsys):
    """A metadata checksum that fails, in a group's header or a chunk index: one line,
    exit 2, for inspect, inspect --json and render (they were tracebacks)."""
    header = tmp_path / "header.h5"
    shutil.copy(good_store, header)
    with h5py.File(header) as f:
        addr = h5py.h5o.get_info(f["attention"].id).addr
    with open(header, "r+b") as fh:  # the /attention group's object header
        fh.seek(addr + 8)
        fh.write(b"\xff\xff\xff\xff")
    index = tmp_path / "index.h5"
    shutil.copy(DAMAGED / "store-bad-chunk-index.h5", index)
    for store in (header, index):
        for argv in (["inspect", store], ["inspect", "--json", store]):
            expect(capsys, 2, argv, r"(checksum|damaged).*the store is damaged")
    expect(capsys, 2, ["render", header, "-o", tmp_path / "f.png"], r"the store is damaged")
    assert not (tmp_path / "f.png").exists()


def test_damaged_input_chunks_are_named_wherever_they_are_read(tmp_path, capsys):
    """The identity of a Q/K/V input (read before any batch) reads through the same
    checks as the batches: a chunk that fails its filter, or lies past the end of the
    file, is damage named by file and dataset (exit 2), not an unnamed exit 1."""
    for name, where in (("qkv-bad-filter.h5", "/q"), ("qkv-address-past-end.h5", "/v")):
        path = tmp_path / name
        shutil.copy(DAMAGED / name, path)
        out = tmp_path / f"{name}.out.h5"
        expect(capsys, 2, ["run", "--qkv", path, "--out", out, "-q"], rf"{name}:{where}: .*damaged")
        assert not leftovers(tmp_path, out.name) and not out.exists()


def test_a_title_that_is_not_utf8_is_refused(tmp_path, good_store, capsys):
    argv = ["render", good_store, "-o", tmp_path / "t.png", "--title", "bad\udcff\udcfe"]
    expect(capsys, 2, argv, r"--title .* is not valid UTF-8")
    assert not (tmp_path / "t.png").exists()


def test_devices_and_pipes_are_never_replaced_even_with_overwrite(
    tmp_path, qkv_input, good_store, capsys
):
    fifo = tmp_path / "fifo.h5"
    os.mkfifo(fifo)
    specials = [fifo]
    try:  # a copy of /dev/null (needs root, as CI has)
        os.mknod(tmp_path / "null", 0o666 | __import__("stat").S_IFCHR, os.makedev(1, 3))
        specials.append(tmp_path / "null")
    except PermissionError:
        pass
    for out in specials:
        for extra in ([], ["--overwrite"]):
            argv = ["run", "--qkv", qkv_input, "--out", out, "-q", *extra]
            expect(capsys, 2, argv, r"is a (named pipe|character device).*never replaces")
    image = tmp_path / "f.png"
    os.mkfifo(image)
    expect(capsys, 2, ["render", good_store, "-o", image, "--overwrite"], r"named pipe")
    link = tmp_path / "l.h5"
    link.symlink_to(fifo)  # through a link too
    expect(capsys, 2, ["run", "--qkv", qkv_input, "--out", link, "--overwrite"], r"named pipe")
    assert fifo.is_fifo() and image.is_fifo() and link.is_symlink()
    if len(specials) > 1:
        assert specials[1].is_char_device()


def test_a_live_run_is_not_called_interrupted(tmp_path, capsys):
    """inspect and render on a store a run is writing now say so (not '--resume')."""
    src = tmp_path / "in.h5"
    make_qkv(src, n=400, layers=1, heads=4, seq=24, dim=8, seed=5)
    out = tmp_path / "o.h5"
    argv = ["run", "--qkv", src, "--out", out, "--batch-size", "10", "--threads", "1", "-q"]
    live = stopped_at([sys.executable, "-m", "qkvmean", *map(str, argv)], "journaled:1")
    try:
        assert main(["inspect", str(out)]) == 0
        text = capsys.readouterr().out
        assert "a run is writing it right now" in text and "--resume" not in text
        expect(capsys, 2, ["render", out, "-o", tmp_path / "f.png"], r"writing it right now")
    finally:
        live.send_signal(signal.SIGCONT)
        live.wait(timeout=600)
    assert live.returncode == 0 and out.exists()


def test_an_input_open_in_a_live_swmr_writer_is_not_called_damaged(tmp_path, capsys):
    path = tmp_path / "sw.h5"
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, h5py, numpy as np\n"
            f"f = h5py.File({str(path)!r}, 'w', libver='latest')\n"
            "for n in 'qkv': f[n] = np.ones((2, 1, 4, 2), 'f4')\n"
            "f.swmr_mode = True\n"
            "f.flush(); print('ready', flush=True); sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "ready"
        argv = ["run", "--qkv", path, "--out", tmp_path / "o.h5", "-q"]
        err = expect(capsys, 2, argv, r"marked open for writing .*h5clear")
        assert "damaged" not in err
    finally:
        writer.communicate("", timeout=60)


def test_campaign_3_messages_say_what_is_wrong(tmp_path, good_store, capsys):
    rng = np.random.default_rng(0)
    big = tmp_path / "big.h5"
    with h5py.File(big, "w") as f:  # float64 already: "pass float64" would be no help
        for n in "qkv":
            f[n] = rng.normal(size=(3, 2, 6, 4)) * 1e300
    err = expect(capsys, 2, ["run", "--qkv", big, "--out", tmp_path / "a.h5"], r"rescale them")
    assert "pass float64" not in err
    wrapped = tmp_path / "wrapped.h5"
    with h5py.File(wrapped, "w") as f:
        for n in "qkv":
            f[n] = rng.normal(size=(3, 2, 6, 4)).astype("f4")
        f["lengths"] = np.array([2**63, 2, 6], np.uint64)
    argv = ["run", "--qkv", wrapped, "--out", tmp_path / "b.h5"]
    expect(capsys, 2, argv, r"input 0 has length 9223372036854775808, outside 0\.\.6")
    expect(capsys, 2, ["run", "--qkv", big, "--out", "."], r"--out '\.' names no file")
    dangling = tmp_path / "d.png"
    dangling.symlink_to("nowhere/a.png")
    expect(capsys, 2, ["render", good_store, "-o", dangling], r"link that leads nowhere")


def test_a_model_store_without_its_tokens_is_damaged_not_a_qkv_store(tmp_path, capsys):
    model = write_gpt2_dir(tmp_path / "gpt2")
    out = tmp_path / "m.h5"
    assert main(["run", "--model", str(model), "--out", str(out), "--over", "causal", "-q"]) == 0
    with h5py.File(out, "r+") as f:
        del f["input/tokens"]
    argv = ["render", out, "-o", tmp_path / "m.png", "--tokens"]
    expect(capsys, 2, argv, r"--model run's store but has no /input/tokens; the store is damaged")


def test_resume_after_the_input_dtype_changed_names_it(tmp_path, qkv_input, capsys):
    out = tmp_path / "o.h5"
    assert main(["run", "--qkv", str(qkv_input), "--out", str(out), "-q"]) == 0
    with h5py.File(qkv_input, "r+") as f:
        for n in "qkv":
            data = f[n][...]
            del f[n]
            f[n] = data.astype(np.float64)
    argv = ["run", "--qkv", qkv_input, "--out", out, "--resume", "-q"]
    expect(capsys, 2, argv, r"input dtypes \{.*'q': 'float32'.*\(now \{.*'q': 'float64'")


# ------------------------------------------------------------------ required skips

# Skips that no QKVMEAN_REQUIRE_* variable covers: (file, function) -> why.
NOT_REQUIRED = {
    ("test_cuda_cli.py", "test_without_cuda_one_line_and_auto_runs_on_the_cpu"):
        "a GPU is present: the test is of a machine without one",
    ("test_comparisons.py", "device"): "numba-cuda is in the test extra; the CPU rows run",
    ("test_export.py", "test_export_parquet_keeps_the_dtypes_and_values"):
        "fastparquet is in the test extra",
    ("conftest.py", "pytest_collection_modifyitems"): "the coverage run without the JIT only",
    ("test_blas.py", "_lp64_library"):
        "scipy-openblas32 is in the test extra on Linux (missing there fails); no wheel elsewhere",
}  # fmt: skip


def _skips():
    """(file, enclosing function, its source) of every skip in the tests."""
    import ast

    for path in sorted(Path(__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            calls = {
                n.func.attr
                for n in ast.walk(node)
                if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            }
            marks = {ast.unparse(d).split("(")[0] for d in node.decorator_list}
            if calls & {"skip", "importorskip"} or "pytest.mark.skipif" in marks:
                yield path.name, node.name, ast.unparse(node)


def test_every_skip_fails_where_its_require_variable_says_so():
    """A skip for want of h5dump, MiniLM or the browser fails instead where ``.ci/run``'s
    ``QKVMEAN_REQUIRE_*`` says the thing must be there (``support.skip_or_fail``, or the
    variable read beside the skip), so that CI cannot pass by skipping; every other skip
    says here why no variable covers it."""
    found = list(_skips())
    assert len(found) >= 6  # the scan finds them (MiniLM, the browser, a GPU, ...)
    for name, function, source in found:
        if (name, function) in NOT_REQUIRED:
            continue
        assert "QKVMEAN_REQUIRE_" in source or "skip_or_fail(" in source, (
            f"{name}::{function} skips without honouring a QKVMEAN_REQUIRE_* variable: use "
            "support.skip_or_fail, or say in NOT_REQUIRED why none applies"
        )


def test_skip_or_fail(monkeypatch):
    for name in ("H5DUMP", "MINILM", "BROWSER"):
        monkeypatch.delenv(f"QKVMEAN_REQUIRE_{name}", raising=False)
        with pytest.raises(pytest.skip.Exception, match="not here"):
            skip_or_fail(name, "not here")
        monkeypatch.setenv(f"QKVMEAN_REQUIRE_{name}", "1")
        with pytest.raises(pytest.fail.Exception, match=f"not here .*QKVMEAN_REQUIRE_{name}"):
            skip_or_fail(name, "not here")
    with pytest.raises(ValueError, match="'GPU' is not one of"):
        skip_or_fail("GPU", "no GPU")
