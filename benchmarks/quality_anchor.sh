#!/usr/bin/env bash
# Quality anchor: nanoGPT's CPU recipe budget on tiny Shakespeare, for the dense `tiny` and the `tiny-moe`
# presets: 4 layers, 4 heads, width 128, context 64, batch 12, 2000 steps, lr 1e-3 (cosine over the 2000 steps),
# 90/10 split (the tail is validation). nanoGPT reaches a validation loss of 1.88 with this budget.
#
# usage: benchmarks/quality_anchor.sh [extra acx-rt train flags...]     (results: docs/benchmarks.md, "Quality anchor")
# env:   DATA (default ../shared/data/tinyshakespeare.txt), OUT (default: a new temporary folder), PRESETS ("tiny tiny-moe")
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/tinyshakespeare.txt}
OUT=${OUT:-$(mktemp -d -t quality-anchor-XXXX)}
PRESETS=${PRESETS:-"tiny tiny-moe"}
[[ -f $DATA ]] || { echo "quality_anchor.sh: $DATA not found (set DATA=...)" >&2; exit 2; }
mkdir -p "$OUT"

for preset in $PRESETS; do
  start=$(date +%s.%N)
  acx-rt train --train_file "$DATA" --validation_split_percentage 10 --config_name "$preset" \
    --config_overrides hidden_size=128,num_hidden_layers=4,num_attention_heads=4,num_key_value_heads=4,intermediate_size=344 \
    --block_size 64 --per_device_train_batch_size 12 --max_train_steps 2000 --learning_rate 1e-3 \
    --seed 1337 --output_dir "$OUT/$preset" --overwrite_output_dir "$@" 2>"$OUT/$preset.log"
  end=$(date +%s.%N)
  python - "$OUT/$preset" "$preset" "$start" "$end" <<'PY'
import json, sys
out, preset, start, end = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
results = json.load(open(f"{out}/all_results.json"))
print(f"{preset}: eval_loss {results['eval_loss']:.4f}  bits/byte {results['bits_per_byte']:.4f}  "
      f"train {results['train_runtime_s']:.0f} s  wall (incl. data + eval) {end - start:.0f} s  -> {out}")
PY
done
