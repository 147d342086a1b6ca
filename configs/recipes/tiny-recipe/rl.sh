#!/usr/bin/env bash
# The tiny recipe's RL stage, after run.sh: GRPO, RLOO, REINFORCE++, PPO with a critic, and GRPO
# with advantage reweighting, Lopti and both, each 30 steps from the SFT model on the counting
# problems; prints held-out accuracy (mean of 8 samples per problem) at steps 0, 5, 10 and 30.
#   bash configs/recipes/tiny-recipe/rl.sh        (from the repository root)
set -euo pipefail
HERE=configs/recipes/tiny-recipe
OUT=runs/tiny-recipe
DATA=$OUT/data
python -c "
from jaxllm.data.synthetic import filter_tasks
for split in ('train', 'eval'):
    filter_tasks('$DATA/rl_' + split + '.jsonl', '$DATA/rl_count_' + split + '.jsonl', ['count'])"
run() {  # name, overrides...
  local name=$1; shift
  SECONDS=0
  python -m jaxllm.train --config $HERE/rl.yaml trainer.run_dir=$OUT/rl-$name logging.progress_bar=false "$@" > $OUT/rl-$name.log
  python -c "
import json
rows = [json.loads(l) for l in open('$OUT/rl-$name/metrics.jsonl')]
acc = {r['step']: r['eval_accuracy'] for r in rows if 'eval_accuracy' in r}
print('$name: held-out accuracy ' + ', '.join(f'step {s} {acc[s]:.3f}' for s in (0, 5, 10, max(acc))) + ', $SECONDS s')"
}
run grpo
run rloo rl.estimator=rloo
run reinforce_pp rl.estimator=reinforce_pp
run ppo rl.estimator=gae rl.lam=0.95
run grpo-ar rl.adv_reweight_alpha=0.3
run grpo-lopti rl.lopti_eta=0.5
run grpo-ar-lopti rl.adv_reweight_alpha=0.3 rl.lopti_eta=0.5
