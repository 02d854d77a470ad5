"""Where transformers keeps each family's Q, K and V projections, and which columns of a
projection's output are a head's: shared by the scripts here that make golden data with
forward hooks (make_family_golden.py, make_effects_golden.py). Needs only the model
object: no import of PyTorch or transformers here."""


def projection(model, family, target, layer, heads):
    """``(module, cols, dh)``: the module whose output holds ``target`` (``"q"``, ``"k"``
    or ``"v"``) at ``layer``, and the first column of each of its ``dh``-wide slices that
    the query heads ``heads`` read (for K and V: their KV heads, each once: a hook can only
    replace a whole KV head)."""
    cfg = model.config
    base = model.base_model
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    d = cfg.hidden_size
    dh = getattr(cfg, "head_dim", None) or d // n_heads
    group = n_heads // n_kv
    kv = sorted({h // group for h in heads})
    per_query = [h * dh for h in heads]  # separate projections: the heads in order
    own = per_query if target == "q" else [g * dh for g in kv]
    which = "qkv".index(target)
    if family == "gpt2":
        module = base.h[layer].attn.c_attn  # Conv1D output [q | k | v], d each
        cols = [which * d + c for c in per_query]
    elif family in ("bert", "roberta", "xlm-roberta"):
        attn = base.encoder.layer[layer].attention.self
        module = getattr(attn, {"q": "query", "k": "key", "v": "value"}[target])
        cols = per_query
    elif family == "falcon":
        module = base.h[layer].self_attention.query_key_value
        if cfg.new_decoder_architecture:  # per KV group: [its query heads | k | v]
            g = n_heads // cfg.num_kv_heads
            kv = sorted({h // g for h in heads})
            cols = {
                "q": [((h // g) * (g + 2) + h % g) * dh for h in heads],
                "k": [(x * (g + 2) + g) * dh for x in kv],
                "v": [(x * (g + 2) + g + 1) * dh for x in kv],
            }[target]
        else:  # the query heads, then the one key head, then the value head
            cols = {"q": per_query, "k": [n_heads * dh], "v": [(n_heads + 1) * dh]}[target]
    elif family == "modernbert":
        module = base.layers[layer].attn.Wqkv  # [q | k | v], d each
        cols = [which * d + c for c in per_query]
    elif family == "distilbert":
        module = getattr(base.transformer.layer[layer].attention, f"{target}_lin")
        cols = per_query
    elif family in ("gpt_neox", "bloom"):  # per head [q | k | v]
        fused = (
            base.layers[layer].attention if family == "gpt_neox" else base.h[layer].self_attention
        )
        module = fused.query_key_value
        cols = [h * 3 * dh + which * dh for h in heads]
    elif family == "phi3":
        module = base.layers[layer].self_attn.qkv_proj  # query heads, key heads, value heads
        cols = {
            "q": per_query,
            "k": [(n_heads + g) * dh for g in kv],
            "v": [(n_heads + n_kv + g) * dh for g in kv],
        }[target]
    else:  # separate q_proj, k_proj, v_proj
        if family == "opt":
            attn = base.decoder.layers[layer].self_attn
        elif family == "gptj":
            attn = base.h[layer].attn
        else:
            attn = base.layers[layer].self_attn
        module = getattr(attn, f"{target}_proj")
        cols = own
    return module, cols, dh
