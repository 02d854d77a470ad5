"""Regenerate family_layouts.json: for each family that tests/model_support.py writes from a
layout (``LAYOUT_FAMILIES``), the config.json and the tensor names and shapes that Hugging
Face transformers' ``save_pretrained`` writes for a small model of that family.

The test directories are then real checkpoints in every name, shape and config key, with
small random weights filled in by the tests (no PyTorch there). Not part of the suite; run
it by hand where PyTorch and transformers are installed (see make_family_golden.py):

    DIR/bin/python tests/data/make_family_layouts.py
"""

import json
import tempfile
from pathlib import Path

import torch
import transformers as tr
from safetensors import safe_open

HERE = Path(__file__).resolve().parent

SMALL = dict(vocab_size=320, hidden_size=32, num_attention_heads=4, num_hidden_layers=3)

#: name → (the checkpoint's class, its config class, the config's arguments). The class is
#: the one the family's checkpoints are published as (causal LM, masked LM).
FAMILIES = {
    "roberta": (tr.RobertaForMaskedLM, tr.RobertaConfig, dict(
        SMALL, intermediate_size=64, max_position_embeddings=258, type_vocab_size=1,
        pad_token_id=1, bos_token_id=0, eos_token_id=2)),
    "xlm_roberta": (tr.XLMRobertaForMaskedLM, tr.XLMRobertaConfig, dict(
        SMALL, intermediate_size=64, max_position_embeddings=258, type_vocab_size=1,
        pad_token_id=1, bos_token_id=0, eos_token_id=2)),
    "distilbert": (tr.DistilBertForMaskedLM, tr.DistilBertConfig, dict(
        vocab_size=320, dim=32, n_heads=4, n_layers=3, hidden_dim=64,
        max_position_embeddings=256, pad_token_id=0)),
    "opt": (tr.OPTForCausalLM, tr.OPTConfig, dict(
        SMALL, ffn_dim=64, max_position_embeddings=256, word_embed_proj_dim=32,
        do_layer_norm_before=True, pad_token_id=1, bos_token_id=2, eos_token_id=2)),
    "gptj": (tr.GPTJForCausalLM, tr.GPTJConfig, dict(
        vocab_size=320, n_embd=32, n_head=4, n_layer=3, n_positions=128, rotary_dim=4,
        tie_word_embeddings=False)),
    "stablelm": (tr.StableLmForCausalLM, tr.StableLmConfig, dict(
        SMALL, num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128,
        partial_rotary_factor=0.5, use_qkv_bias=True, tie_word_embeddings=False)),
    "gemma": (tr.GemmaForCausalLM, tr.GemmaConfig, dict(
        SMALL, num_key_value_heads=1, head_dim=16, intermediate_size=48,
        max_position_embeddings=128, hidden_activation="gelu_pytorch_tanh")),
    "gemma2": (tr.Gemma2ForCausalLM, tr.Gemma2Config, dict(
        SMALL, num_hidden_layers=4, num_key_value_heads=2, head_dim=16, intermediate_size=48,
        max_position_embeddings=128, sliding_window=4, query_pre_attn_scalar=24,
        attn_logit_softcapping=2.0, final_logit_softcapping=5.0)),
    "gemma3": (tr.Gemma3ForCausalLM, tr.Gemma3TextConfig, dict(
        SMALL, num_hidden_layers=4, num_key_value_heads=2, head_dim=16, intermediate_size=48,
        max_position_embeddings=128, sliding_window=4, query_pre_attn_scalar=24,
        sliding_window_pattern=3, rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "bloom": (tr.BloomForCausalLM, tr.BloomConfig, dict(
        vocab_size=320, hidden_size=32, n_head=4, n_layer=3)),
    "falcon": (tr.FalconForCausalLM, tr.FalconConfig, dict(
        SMALL, max_position_embeddings=128, multi_query=True, parallel_attn=True,
        new_decoder_architecture=False, bias=False)),
    "falcon_new": (tr.FalconForCausalLM, tr.FalconConfig, dict(
        SMALL, num_hidden_layers=3, max_position_embeddings=128, new_decoder_architecture=True,
        num_kv_heads=2, bias=True)),
    "olmo2": (tr.Olmo2ForCausalLM, tr.Olmo2Config, dict(
        SMALL, num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128,
        tie_word_embeddings=False, pad_token_id=1, bos_token_id=None, eos_token_id=0)),
    "modernbert": (tr.ModernBertForMaskedLM, tr.ModernBertConfig, dict(
        SMALL, num_hidden_layers=4, intermediate_size=48, max_position_embeddings=256,
        local_attention=4, global_attn_every_n_layers=3, pad_token_id=0, cls_token_id=2,
        sep_token_id=3, bos_token_id=2, eos_token_id=3)),
}  # fmt: skip


def layout(cls, config_cls, kwargs):
    torch.manual_seed(0)
    model = cls(config_cls(**kwargs))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        config = json.loads((Path(tmp) / "config.json").read_text())
        tensors = {}
        with safe_open(str(Path(tmp) / "model.safetensors"), framework="np") as f:
            for key in f.keys():
                tensors[key] = list(f.get_slice(key).get_shape())
    return {"config": config, "tensors": tensors}


def main():
    out = {name: layout(*spec) for name, spec in FAMILIES.items()}
    (HERE / "family_layouts.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    for name, entry in out.items():
        print(name, entry["config"]["model_type"], len(entry["tensors"]), "tensors")


if __name__ == "__main__":
    main()
