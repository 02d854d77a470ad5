"""A small deterministic causal model, built in code: the demo when no model is installed.

GPT-2 architecture (pre-LayerNorm, causal, tanh GELU): 4 layers, 4 heads of 16
dimensions (d_model 64), MLP width 256, up to 256 positions, a word-level vocabulary of
the :data:`WORDS` below plus ``<s>`` (prepended to every input) and ``[UNK]``. Built from
``SEED`` with numpy, the same on every machine.

The residual stream keeps token content in dimensions 0-31 and position (sinusoids at 16
frequencies) in dimensions 32-63, so heads can be wired to attend by position or by
content; each layer's four heads play, in a rotating order:

- *previous token*: the query is the key's position code rotated back by one step;
- *first token*: every query looks for the content of ``<s>`` (an attention sink);
- *same word*: query and key are both the content code (repeated words find each other);
- *random*: Gaussian projections (mixed, input-dependent patterns).

So its attention is far from uniform, structured by position and by content.
"""

from __future__ import annotations

import numpy as np

from .arch import Arch, Norm
from .transformer import Layer, Weights

SEED = 0
N_LAYERS, N_HEADS, HEAD_DIM, D_FF, MAX_POSITIONS = 4, 4, 16, 256, 256
D_MODEL = N_HEADS * HEAD_DIM
CONTENT = slice(0, D_MODEL // 2)
POSITION = slice(D_MODEL // 2, D_MODEL)
N_FREQ = D_MODEL // 4
STRENGTH_PREVIOUS = 1.5

WORDS = (
    "the a an and or but if then so as of in on at by to from with without for about into "
    "over under after before while when where why how what which who whom this that these "
    "those it its he she they we you i me him her them us my your his their our is are was "
    "were be been being am do does did done have has had can could will would shall should "
    "may might must not no yes all any each every some many much more most few less one two "
    "three first last next other same different new old good bad big small long short high "
    "low warm cold early late quick slow cat dog bird fox horse mouse man woman child people "
    "house home door window room table chair mat bed drawer letter book word words sentence "
    "story name head heads key keys query queries value values mean model models map maps "
    "attention weight weights layer layers token tokens input inputs output look looks "
    "looked read reads sat sit slept sleep ran run put take took make makes made see saw "
    "say said tell told give gave find found know knew think thought come came go went get "
    "got keep kept turn turned show showed leave left back again still just only also even "
    "very too well way time day night year world life hand eye place thing part water "
    "nearby away down up out off around through between across along twice once never "
    "always often . , ; : ! ? ' \""
).split()
SPECIALS = ("[UNK]", "<s>")


def vocabulary() -> dict:
    words = list(SPECIALS) + sorted(set(WORDS) - set(SPECIALS))
    return {w: i for i, w in enumerate(words)}


def tokenizer():
    """Word-level, lower-cased, punctuation split off, ``<s>`` prepended."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = vocabulary()
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    return tok


def _position_codes():
    """Sinusoids (cos, sin) at N_FREQ frequencies, and the rotation back by one step."""
    pos = np.arange(MAX_POSITIONS)[:, None]
    freq = 1.0 / (64.0 ** (np.arange(N_FREQ) / N_FREQ))  # periods from 2π to ~400 tokens
    codes = np.empty((MAX_POSITIONS, 2 * N_FREQ))
    codes[:, 0::2] = np.cos(pos * freq)
    codes[:, 1::2] = np.sin(pos * freq)
    back = np.zeros((2 * N_FREQ, 2 * N_FREQ))  # p(i) @ back = p(i - 1)
    for f, w in enumerate(freq):
        c, s = np.cos(w), np.sin(w)
        back[2 * f : 2 * f + 2, 2 * f : 2 * f + 2] = [[c, -s], [s, c]]
    return codes, back


def build(seed: int = SEED):
    """``(Weights, tokenizers.Tokenizer)`` of the synthetic model."""
    rng = np.random.default_rng(seed)
    vocab = vocabulary()
    half = D_MODEL // 2
    tok_emb = np.zeros((len(vocab), D_MODEL))
    tok_emb[:, CONTENT] = rng.normal(size=(len(vocab), half)) / np.sqrt(half)
    tok_emb[vocab["<s>"], CONTENT] *= 3.0  # a distinctive first token
    codes, back = _position_codes()
    pos_emb = np.zeros((MAX_POSITIONS, D_MODEL))
    pos_emb[:, POSITION] = codes / np.sqrt(N_FREQ)
    bos = tok_emb[vocab["<s>"], CONTENT] / np.linalg.norm(tok_emb[vocab["<s>"], CONTENT])

    layers = []
    for index in range(N_LAYERS):
        wq = np.zeros((D_MODEL, D_MODEL))
        wk = np.zeros((D_MODEL, D_MODEL))
        bq = np.zeros(D_MODEL)
        for head in range(N_HEADS):
            cols = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
            role = (head + index) % N_HEADS
            if role == 0:  # previous token: the 8 fastest sinusoids, rotated back one step
                fast = slice(POSITION.start, POSITION.start + HEAD_DIM)
                wq[fast, cols] = STRENGTH_PREVIOUS * back[:HEAD_DIM, :HEAD_DIM]
                wk[fast, cols] = STRENGTH_PREVIOUS * np.eye(HEAD_DIM)
            elif role == 1:  # first token: a fixed query meets the <s> content
                u = rng.normal(size=HEAD_DIM)
                u /= np.linalg.norm(u)
                bq[cols] = 1.5 * u
                wk[CONTENT, cols] = 1.5 * np.outer(bos, u)
            elif role == 2:  # same word: content against content
                proj = rng.normal(size=(half, HEAD_DIM)) / np.sqrt(HEAD_DIM)
                wq[CONTENT, cols] = 0.6 * proj
                wk[CONTENT, cols] = 0.6 * proj
            else:  # random projections of everything
                wq[:, cols] = rng.normal(size=(D_MODEL, HEAD_DIM)) * 0.15
                wk[:, cols] = rng.normal(size=(D_MODEL, HEAD_DIM)) * 0.15
        wv = rng.normal(size=(D_MODEL, D_MODEL)) / np.sqrt(D_MODEL)
        layers.append(
            Layer(
                wqkv=np.concatenate([wq, wk, wv], axis=1),
                bqkv=np.concatenate([bq, np.zeros(2 * D_MODEL)]),
                wo=rng.normal(size=(D_MODEL, D_MODEL)) * 0.1 / np.sqrt(D_MODEL),
                bo=np.zeros(D_MODEL),
                norm1=(np.ones(D_MODEL), np.zeros(D_MODEL)),
                w1=rng.normal(size=(D_MODEL, D_FF)) / np.sqrt(D_MODEL),
                b1=np.zeros(D_FF),
                w2=rng.normal(size=(D_FF, D_MODEL)) * 0.1 / np.sqrt(D_FF),
                b2=np.zeros(D_MODEL),
                norm2=(np.ones(D_MODEL), np.zeros(D_MODEL)),
            )
        )
    f32 = _as_float32
    arch = Arch(
        family="gpt2", causal=True, placement="pre", norm=Norm("layer", 1e-5),
        activation="gelu_tanh", n_heads=N_HEADS, n_kv_heads=N_HEADS, head_dim=HEAD_DIM,
        final_norm=True,
    )  # fmt: skip
    weights = Weights(
        arch=arch,
        tok_emb=f32(tok_emb),
        pos_emb=f32(pos_emb),
        layers=[Layer(**{k: f32(v) for k, v in vars(layer).items()}) for layer in layers],
        final_norm=(f32(np.ones(D_MODEL)), f32(np.zeros(D_MODEL))),
        name="synthetic",
    )
    weights.unembed = weights.tok_emb  # a language model with a tied head, as GPT-2
    return weights, tokenizer()


def _as_float32(x):
    if x is None:
        return None
    if isinstance(x, tuple):
        return tuple(_as_float32(a) for a in x)
    return np.ascontiguousarray(x, dtype=np.float32)


def describe() -> dict:
    """What identifies this model (for the store's configuration and --resume)."""
    return {
        "seed": SEED,
        "layers": N_LAYERS,
        "heads": N_HEADS,
        "head_dim": HEAD_DIM,
        "d_ff": D_FF,
        "max_positions": MAX_POSITIONS,
        "vocab": len(vocabulary()),
        "version": 1,
    }
