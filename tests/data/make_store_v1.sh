#!/usr/bin/env bash
# Write tests/data/store_v1.h5: a small store of format version 1 (the plain run's
# conditions baseline, mean_q, mean_k, mean_v; maps at every layer; no condition table,
# no effects), written by commit 1390417, the last qkvmean that wrote version 1.
# tests/test_sweep_views.py reads it: render, view, export and inspect of a v1 store.
#
#     bash tests/data/make_store_v1.sh     # from the repository root, in the venv
#
# It checks the commit out in a temporary worktree, runs the synthetic model there on
# three short lines (float16 maps, to stay small), and removes the worktree.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="$ROOT/tests/data/store_v1.h5"
COMMIT=1390417
TREE="$(mktemp -d /tmp/qkvmean-v1tree.XXXXXX)"
WORK="$(mktemp -d /tmp/qkvmean-v1run.XXXXXX)"
rmdir "$TREE"
trap 'git -C "$ROOT" worktree remove --force "$TREE" 2>/dev/null || true; rm -rf "$WORK"' EXIT

git -C "$ROOT" worktree add --detach "$TREE" "$COMMIT" >/dev/null
printf '%s\n' "The cat sat on the mat." "Mean keys look alike." "A short one." > "$WORK/v1_texts.txt"
rm -f "$OUT"
cd "$WORK"
PYTHONPATH="$TREE" python -m qkvmean run --model synthetic --text v1_texts.txt \
    --dtype float16 --out "$OUT" --quiet
python - "$OUT" <<'EOF'
import sys, h5py
with h5py.File(sys.argv[1]) as f:
    assert int(f.attrs["format_version"]) == 1, f.attrs["format_version"]
EOF
echo "wrote $OUT ($(stat -c %s "$OUT") bytes)"
