"""Per-group attention modes, shared by every backend.

The wrappers pick a mode per flattened group; a backend must give the same weights for a
mode as its general path would on the substituted inputs (tests check this).
"""

#: Row-by-row softmax of ``scale * q . k`` over the allowed keys.
MODE_GENERAL = 0
#: Every valid key is the same vector (mean-K over tokens): each allowed weight is
#: ``1 / n_allowed``, exactly what the general path computes from identical logits.
MODE_UNIFORM = 1
#: Every valid query is the same vector and there is no causal mask (mean-Q over
#: tokens): all valid rows are identical, so one row is computed and copied.
MODE_SHARED_ROW = 2
