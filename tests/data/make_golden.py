"""Regenerate golden.json: attention maps from Hugging Face transformers (PyTorch).

Not part of the test suite (PyTorch and transformers are not dependencies); run it by hand
where both are installed:

    python tests/data/make_golden.py

It records, for the built-in sentences, what an independent implementation (transformers'
eager attention, the substitution done by forward hooks on the Q/K/V projections) gives:
- all-MiniLM-L6-v2, the first two sentences: baseline and mean-Q/K/V at layer 0 (mean over
  the valid tokens);
- the GPT-2 directory that tests/model_support.py writes (seed 0), on GPT2_TEXTS: baseline
  and mean-Q/K/V at layer 1 with the causal prefix mean;
- all-MiniLM-L6-v2 on DATASET_TEXTS: mean-Q/K/V at layer 0 with the dataset mean (each
  position's mean over every text that reaches it, from a clean pass), as the mean-ablation
  literature does it with hooks.
The tests compare qkvmean's loader and forward passes against these values, so that a
mistake in how a checkpoint is read (a transpose, the Q/K/V order) cannot hide behind a
reference that reads the same weights the same way.
"""

import json
import sys
import tempfile
from pathlib import Path

import torch
from transformers import BertModel, GPT2Model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from model_support import write_gpt2_dir  # noqa: E402

from qkvmean.io.models import load_model, minilm_path  # noqa: E402
from qkvmean.io.texts import BUILTIN_SENTENCES  # noqa: E402

#: Short texts for the tiny byte-level tokenizer of the test's GPT-2 directory.
GPT2_TEXTS = ("the quick fox", "mean keys")
#: The data set of the dataset mean (different lengths, so that later positions are
#: averaged over fewer inputs).
DATASET_TEXTS = (
    "The cat sat on the mat.",
    "Mean ablation replaces a head's activation by its mean over a data set.",
    "Short one.",
    "Every position is averaged over the inputs that reach it, and padding never counts.",
    "Keys, queries and values.",
)


def run_dataset_mean(model, projections, tokenizer, texts, target, layer, width):
    """Per-position mean over every text (a first clean pass with hooks capturing the
    projection output), then each text with its positions replaced by those means."""
    encs = tokenizer.encode_batch(list(texts))
    lin, index = projections(layer, target)
    taken = []

    def capture(mod, inp, res):
        taken.append(res[0, :, index * width : (index + 1) * width].double().clone())

    handle = lin.register_forward_hook(capture)
    with torch.no_grad():
        for e in encs:
            model(input_ids=torch.tensor([e.ids]))
    handle.remove()
    longest = max(x.shape[0] for x in taken)
    means = torch.zeros(longest, width, dtype=torch.float64)
    for p in range(longest):
        means[p] = torch.stack([x[p] for x in taken if x.shape[0] > p]).mean(0)
    out = []
    for e in encs:
        n = len(e.ids)

        def hook(mod, inp, res, n=n):
            res = res.clone()
            res[0, :, index * width : (index + 1) * width] = means[:n].float()
            return res

        handle = lin.register_forward_hook(hook)
        with torch.no_grad():
            att = model(input_ids=torch.tensor([e.ids]), output_attentions=True).attentions
        handle.remove()
        out.append([a[0].numpy() for a in att])
    return out


def run(model, projections, tokenizer, texts, target, layer, over, width):
    encs = tokenizer.encode_batch(list(texts))
    out = []
    for e in encs:
        ids = torch.tensor([e.ids])
        n = len(e.ids)
        handle = None
        if target is not None:
            lin, index = projections(layer, target)

            def hook(mod, inp, res, index=index, n=n):
                res = res.clone()
                x = res[0, :, index * width : (index + 1) * width].double()
                if over == "tokens":
                    x = x.mean(0, keepdim=True).expand_as(x)
                else:
                    x = x.cumsum(0) / torch.arange(1, n + 1, dtype=torch.float64)[:, None]
                res[0, :, index * width : (index + 1) * width] = x.float()
                return res

            handle = lin.register_forward_hook(hook)
        with torch.no_grad():
            att = model(input_ids=ids, output_attentions=True).attentions
        if handle:
            handle.remove()
        out.append([a[0].numpy() for a in att])  # per layer (head, n, n)
    return out


def _rounded(x):
    return x.astype("float64").round(6).tolist()


def summarise(maps, layer):
    """A compact, strong fingerprint: each layer's head-mean map, and every head of the
    layer where the substitution happens."""
    return [
        {
            "head_mean": [_rounded(m.mean(0)) for m in per_input],
            "heads_at_substitution": _rounded(per_input[layer]),
        }
        for per_input in maps
    ]


def main():
    golden = {}
    bert = BertModel.from_pretrained(str(minilm_path()), attn_implementation="eager").eval()
    tok = load_model("minilm").tokenizer
    d = bert.config.hidden_size

    def bert_proj(layer, target):
        names = {"q": "query", "k": "key", "v": "value"}
        return getattr(bert.encoder.layer[layer].attention.self, names[target]), 0

    golden["minilm"] = {
        name: summarise(run(bert, bert_proj, tok, BUILTIN_SENTENCES[:2], t, 0, "tokens", d), 0)
        for name, t in [("baseline", None), ("mean_q", "q"), ("mean_k", "k"), ("mean_v", "v")]
    }
    dataset = {"baseline": summarise(run(bert, bert_proj, tok, DATASET_TEXTS, None, 0, "", d), 0)}
    for t in "qkv":
        maps = run_dataset_mean(bert, bert_proj, tok, DATASET_TEXTS, t, 0, d)
        dataset[f"mean_{t}"] = summarise(maps, 0)
    golden["minilm_dataset"] = dataset
    with tempfile.TemporaryDirectory() as tmp:
        path = write_gpt2_dir(Path(tmp) / "gpt2")
        gpt2 = GPT2Model.from_pretrained(str(path), attn_implementation="eager").eval()
        tok = load_model(str(path)).tokenizer
        d = gpt2.config.n_embd

        def gpt2_proj(layer, target):
            return gpt2.h[layer].attn.c_attn, "qkv".index(target)

        golden["gpt2"] = {
            name: summarise(run(gpt2, gpt2_proj, tok, GPT2_TEXTS, t, 1, "causal", d), 1)
            for name, t in [("baseline", None), ("mean_q", "q"), ("mean_k", "k"), ("mean_v", "v")]
        }
    (HERE / "golden.json").write_text(json.dumps(golden))


if __name__ == "__main__":
    main()
