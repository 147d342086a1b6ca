"""`python -m jaxllm.evaluate --checkpoint RUN_DIR [--answers FILE] [--pairs FILE]`

Held-out numbers for a chat model, printed as one JSON line:

- `answer_accuracy`: greedy replies to the prompts of `--answers` (records with `messages`
  ending in the reference reply, or `prompt` + `answer`) that equal the exact answer
  (`jaxllm.data.synthetic.answer_accuracy`).
- `preference_accuracy`: the fraction of `--pairs` (UltraFeedback-style prompt / chosen /
  rejected) where the model gives the chosen reply a higher log-probability than the rejected
  one, both summed over the reply's tokens; plus the mean log-prob margin.

Prompts are rendered with the run's chat template (`sft.template`) and tokenized exactly as in
training (`PromptCompletionEncoder`), so the numbers mean the same after SFT and after DPO.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import jax
import numpy as np

from jaxllm.errors import run_cli

def make_generate_fn(cfg, params, tokenizer, *, max_new_tokens: int = 24, batch_size: int = 64):
    """prompt message lists -> greedy reply strings (the `answer_accuracy` contract)."""
    from jaxllm.generate import chat_replies

    def generate_fn(prompts):
        replies = chat_replies(cfg, params, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
        return [r[0] for r in replies]

    return generate_fn


def preference_accuracy(cfg, params, tokenizer, pairs_file: str) -> dict:
    """Chosen-over-rejected log-prob accuracy and mean margin on a pairs file."""
    from jaxllm.data import posttrain
    from jaxllm.data.rows import ROW_FIELDS
    from jaxllm.objectives.lm import sequence_logps

    pair_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval=(pairs_file,)))

    @jax.jit
    def logps(params, batch):
        def side(prefix):
            return sequence_logps(cfg.model, params, *(batch[f"{prefix}_{k}"] for k in ROW_FIELDS))[0]
        return side("chosen"), side("rejected")

    from jaxllm.data import synthetic

    records = synthetic.read_jsonl(pairs_file) if pairs_file.endswith(".jsonl") else []
    task_of = [r.get("task") for r in records]
    if len(task_of) != posttrain.split_size(pair_cfg, "pairs", "eval"):
        task_of = []  # malformed lines were dropped: indices no longer line up with the file
    wins, margins, by_task = [], [], {}
    for batch in posttrain.split_pass(pair_cfg, tokenizer, "pairs", "eval", process_index=0, process_count=1):
        c, r = (np.asarray(x) for x in logps(params, batch))
        for i in np.flatnonzero(batch["index"] >= 0):
            wins.append(bool(c[i] > r[i]))
            margins.append(float(c[i] - r[i]))
            if task_of and task_of[batch["index"][i]] is not None:
                by_task.setdefault(task_of[batch["index"][i]], []).append(wins[-1])
    if not margins:
        raise ValueError(f"{pairs_file}: no preference pairs")
    out = {"preference_accuracy": float(np.mean(wins)), "logp_margin": float(np.mean(margins)),
           "n_pairs": len(margins)}
    if len(by_task) > 1:
        out["preference_accuracy_by_task"] = {t: float(np.mean(v)) for t, v in sorted(by_task.items())}
    return out


def evaluate_run(run_dir: str, answers: str | None = None, pairs: str | None = None, *,
                 step: int | None = None, limit: int = 0, max_new_tokens: int = 24) -> dict:
    from jaxllm.run import load_run
    from jaxllm.data import synthetic
    from jaxllm.data.tokenizer import run_tokenizer

    cfg, params = load_run(run_dir, step)
    tokenizer = run_tokenizer(cfg, run_dir)
    out: dict = {"checkpoint": run_dir}
    if answers:
        records = synthetic.read_jsonl(answers)[: limit or None]
        fn = make_generate_fn(cfg, params, tokenizer, max_new_tokens=max_new_tokens)
        out |= {"answer_accuracy": synthetic.answer_accuracy(fn, records), "n_answers": len(records)}
        tasks = sorted({r["task"] for r in records if "task" in r})
        if len(tasks) > 1:  # per task: which skills the model has
            out["answer_accuracy_by_task"] = {
                t: synthetic.answer_accuracy(fn, [r for r in records if r.get("task") == t]) for t in tasks}
    if pairs:
        out |= preference_accuracy(cfg, params, tokenizer, pairs)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a run, params or PMA-merge directory")
    parser.add_argument("--answers", help="jsonl of prompts with exact answers")
    parser.add_argument("--pairs", help="jsonl of preference pairs (prompt, chosen, rejected)")
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--limit", type=int, default=0, help="score only the first N answer records")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if not (args.answers or args.pairs):
        parser.error("give --answers, --pairs or both")
    return run_cli(lambda: _report(evaluate_run(args.checkpoint, args.answers, args.pairs, step=args.step,
                                                limit=args.limit, max_new_tokens=args.max_new_tokens), args.out))


def _report(result: dict, out: str | None) -> None:
    line = json.dumps(result)
    print(line)
    if out:
        with open(out, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    sys.exit(main())
