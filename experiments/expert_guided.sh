#!/usr/bin/env bash
# Re-examine the recommendation with expert-guided objectives (issue 16), by the protocol used
# before: development settings (quick, seeds 0-1, the seed-2 subset), then held-out settings
# (s3, s4), each running only the rows compared. A row "holds" where it beats the best
# data-free row and no task falls more than 5 points under task arithmetic λ = 0.3.
#   bash experiments/expert_guided.sh OUT_ROOT [CACHE_DIR]
set -euo pipefail
out="${1:?usage: expert_guided.sh OUT_ROOT [CACHE_DIR]}"
cache="${2:-${ADAMERGE_CACHE:-$HOME/.cache/adamerge}}"
rows="adamerging(layer,infomax,floor=0.9);adamerging(layer,expert_distill);adamerging(partition:4,expert_distill)"
run() { name="$1"; shift; [ -f "$out/$name/results.json" ] || adamerge demo --out "$out/$name" --cache-dir "$cache" --no-progress --rows "$rows" "$@"; }
run quick --quick
run full0 --seed 0
run full1 --seed 1
run sub2 --seed 2 --tasks digits,textile,opencv_digits --image-size 48
run s3 --seed 3 --tasks mnist,textile,fashion_mnist --image-size 32
run s4 --seed 4 --image-size 48
dirs=("$out"/quick "$out"/full0 "$out"/full1 "$out"/sub2 "$out"/s3 "$out"/s4)
python "$(dirname "$0")/demo_summary.py" "${dirs[@]}" \
  --candidate "adamerging(layer,infomax,floor=0.9)" \
  --candidate "adamerging(layer,expert_distill)" \
  --candidate "adamerging(partition:4,expert_distill)"
