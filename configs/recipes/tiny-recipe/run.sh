#!/usr/bin/env bash
# The tiny end-to-end recipe on CPU: data -> pretrain -> PMA merge -> SFT -> DPO, with held-out
# answer accuracy and preference accuracy after each model stage (results/*.json in the run dir).
#   bash configs/recipes/tiny-recipe/run.sh        (from the repository root)
set -euo pipefail
HERE=configs/recipes/tiny-recipe
OUT=runs/tiny-recipe
DATA=$OUT/data
mkdir -p "$OUT/results"
evaluate() {  # name, checkpoint
  python -m jaxllm.evaluate --checkpoint "$2" --answers "$DATA/sft_eval.jsonl" \
    --pairs "$DATA/pref_eval.jsonl" --out "$OUT/results/$1.json"
}
SECONDS=0
python -m jaxllm.data.synthetic --out "$DATA"
python -m jaxllm.train --config $HERE/pretrain.yaml "$@"
echo "pretrain done at ${SECONDS}s"
# PMA: weighted average of the last 3 checkpoints, 100 steps apart (later ones weigh more).
python -m jaxllm.merge --method wma --checkpoints $OUT/pretrain --last 3 --interval 100 --out $OUT/pma
evaluate pma $OUT/pma
python -m jaxllm.train --config $HERE/sft.yaml
evaluate sft $OUT/sft
echo "sft done at ${SECONDS}s"
python -m jaxllm.train --config $HERE/dpo.yaml
evaluate dpo $OUT/dpo
echo "recipe done in ${SECONDS}s"
for f in pma sft dpo; do echo "$f: $(cat $OUT/results/$f.json)"; done
