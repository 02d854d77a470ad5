"""The one table of condition, target and metric names.

Every module that names a condition (the engine, the model path, the store, the renderer,
the CLI) takes it from here, so a name is spelled once.
"""

from __future__ import annotations

#: The tensors that can be replaced by their mean, in the figure's column order.
TARGETS = ("q", "k", "v")
#: Their names in figures and messages.
TENSOR_LABELS = {"q": "Query", "k": "Key", "v": "Value"}
#: What the mean is taken over: the valid tokens of the same input, the causal prefix of
#: each position, or (``dataset``) each position over every input of a data set.
OVER = ("tokens", "causal", "dataset")


def substitution_phrase(spec: str) -> str:
    """What a substitution's spelling (:mod:`qkvmean.engine.substitution`) does, for
    captions: ``"mean over tokens"``, ``"mean over the last 8 tokens"``, ``"zeros"``..."""
    kind, _, param = str(spec).partition(":")
    if kind == "window":
        return f"mean over the last {param} tokens"
    if kind == "zero":
        return "zeros"
    if kind == "resample":
        return f"resampled from another input (seed {param or 0})"
    return f"mean over {spec}"


#: The effects of a condition on the model's output, in the store's order (their
#: definitions: :mod:`qkvmean.engine.effects`).
EFFECTS = ("hidden_change", "kl_next_token", "ce_change", "embedding_cosine")

BASELINE = "baseline"
#: Per-(condition, input, layer, head) metrics, in the store's order.
METRICS = ("entropy", "kl_from_baseline", "top_key_mass", "top_key_index")


def condition_name(target: str) -> str:
    """``"mean_q"`` for target ``"q"``."""
    return f"mean_{target}"


#: Every condition, in the store's order: the baseline, then one per target.
CONDITIONS = (BASELINE, *(condition_name(t) for t in TARGETS))


def target_of(condition: str) -> str | None:
    """The target of a condition (``"mean_k"`` → ``"k"``); None for the baseline."""
    return None if condition == BASELINE else condition.removeprefix("mean_")


#: Where the engine computes (``device=``): a backend, or "auto" (CUDA when a GPU is
#: usable, else the CPU).
DEVICES = ("cpu", "cuda", "auto")
