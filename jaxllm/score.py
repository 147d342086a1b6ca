"""Score completions with a reward-model run (`task: reward`).

    python -m jaxllm.score --checkpoint RUN_DIR --input FILE.jsonl [--output OUT.jsonl] [--step N]
    python -m jaxllm.score --checkpoint RUN_DIR --input completions.jsonl --pairs PAIRS.jsonl

The second form reads records with `completions` (several replies to one prompt, as
`python -m jaxllm.generate --prompts ... --n N` writes them), scores every reply and writes the
best and the worst as a preference pair (`prompt`, `chosen`, `rejected` message lists, plus
`chosen_score` / `rejected_score` and the record's other fields) that `task: dpo` reads; a
prompt whose replies all score the same gives no pair (counted on stderr).

Each input line is a JSON object with `prompt` and `completion` (each a string or a list of
messages; a string prompt is one user turn, a string completion the assistant's reply, a list
completion ends with the assistant's reply) or with `messages` (a whole conversation ending
with the assistant's reply). The record becomes exactly the row a training pair's chosen side
would be (`preference_data.PromptCompletionEncoder` + `sequence_row`: the run's `sft.template`,
`data.add_bos`, `preference.max_prompt_len`, cut to `data.seq_len` + 1 tokens), and the reward
head reads it as in training. Output: every input record with "score" added, one JSON line each,
in input order, on stdout or to --output; the number of records cut to fit goes to stderr.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import jax
import numpy as np

from jaxllm.data import rows
from jaxllm.errors import UserError, run_cli
from jaxllm.objectives.reward import RewardObjective, reward_scores


class ScoreError(UserError, ValueError):
    """A user-facing problem (bad run, bad record), reported in one line."""


def record_turns(record, where: str) -> tuple[list[dict], str]:
    """(prompt messages, reply text) of one input record."""
    if not isinstance(record, dict):
        raise ScoreError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        if "prompt" in record or "completion" in record:
            raise ScoreError(f"{where}: give either messages or prompt + completion, not both")
        prompt, completion = [], record["messages"]
    elif "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(completion, str):
            return prompt, completion
    else:
        raise ScoreError(f"{where}: needs prompt and completion, or messages (has {', '.join(sorted(record))})")
    name = "messages" if "messages" in record else "completion"
    if not isinstance(prompt, list):
        raise ScoreError(f"{where}: prompt must be a string or a list of messages")
    if not isinstance(completion, list) or not completion or not isinstance(completion[-1], dict) \
            or completion[-1].get("role") != "assistant" or not isinstance(completion[-1].get("content"), str):
        raise ScoreError(f"{where}: {name} must end with an assistant message (role, content)")
    return prompt + completion[:-1], completion[-1]["content"]


class RowEncoder:
    """Input records -> unpacked rows as the run's training pairs are built."""

    def __init__(self, cfg, tokenizer):
        from jaxllm.data import chat, preference_data

        self.chat = chat
        template = chat.load_template(cfg.sft.template, tokenizer)
        self.encoder = preference_data.PromptCompletionEncoder(
            tokenizer, template, seq_len=cfg.data.seq_len, max_prompt_len=cfg.preference.max_prompt_len,
            add_bos=cfg.data.add_bos)
        self.seq_len, self.pad_id = cfg.data.seq_len, tokenizer.pad_id
        self.truncated = 0

    def __call__(self, record, where: str) -> dict[str, np.ndarray]:
        prompt, reply = record_turns(record, where)
        try:
            full = self.encoder.encode(prompt, reply)
            p, c = self.encoder.fit(self.encoder.truncate_prompt(full[0]), full[1])
        except self.chat.ConversationError as e:
            raise ScoreError(f"{where}: {e}") from None
        self.truncated += (len(p), len(c)) != tuple(map(len, full))
        return rows.sequence_row(p, c, self.seq_len, self.pad_id)


def read_records(path: str) -> list[tuple[str, dict]]:
    """(where, record) of every non-empty line of a jsonl file."""
    if not os.path.isfile(path):
        raise ScoreError(f"--input {path}: no such file")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{lineno}", json.loads(line)))
            except ValueError as e:
                raise ScoreError(f"{path}:{lineno}: not valid JSON ({e})") from None
    return records


@functools.partial(jax.jit, static_argnums=0)
def _scores(model_cfg, params, tokens, positions, segment_ids):
    return reward_scores(model_cfg, params, tokens, positions, segment_ids)


def score_rows(model_cfg, params, rows: list[dict], batch_size: int = 8) -> list[float]:
    """Reward scores of rows (all of one length), in batches of `batch_size` (the last one
    filled up with copies of its first row, so every batch has one shape)."""
    out = []
    for a in range(0, len(rows), batch_size):
        chunk = rows[a:a + batch_size]
        full = chunk + [chunk[0]] * (batch_size - len(chunk))
        batch = {k: np.stack([r[k] for r in full]) for k in ("tokens", "positions", "segment_ids")}
        out += [float(s) for s in np.asarray(_scores(model_cfg, params, **batch))[:len(chunk)]]
    return out


def reward_run_config(run_dir: str):
    """The run's Config, or ScoreError when it is not a reward model."""
    from jaxllm.config import load_config
    from jaxllm.tasks import make_task

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise ScoreError(f"--checkpoint {run_dir}: no config.yaml, not a jaxllm run directory")
    cfg = load_config(path)
    if not isinstance(make_task(cfg).objective, RewardObjective):
        raise ScoreError(f"--checkpoint {run_dir}: a task {cfg.task!r} run, not a reward model (task: reward)")
    return cfg


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.score",
                                     description="Score completions with a trained reward model.")
    parser.add_argument("--checkpoint", required=True, help="a reward-model run directory (trainer.run_dir)")
    parser.add_argument("--input", required=True, help="jsonl: prompt + completion, or messages, per line")
    parser.add_argument("--output", help="jsonl to write (default: stdout)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pairs", help="write best / worst pairs of each record's completions here")
    args = parser.parse_args(argv)
    return run_cli(lambda: _pairs(args) if args.pairs else _score(args))


def _prompt_messages(record, where: str) -> list[dict]:
    if isinstance(record.get("messages"), list):
        return list(record["messages"])
    if isinstance(record.get("prompt"), str):
        return [{"role": "user", "content": record["prompt"]}]
    if isinstance(record.get("prompt"), list):
        return list(record["prompt"])
    raise ScoreError(f"{where}: needs messages or prompt beside completions")


def _pairs(args) -> None:
    if args.batch_size <= 0:
        raise ScoreError("--batch-size must be > 0")
    cfg = reward_run_config(args.checkpoint)
    records = read_records(args.input)
    from jaxllm.data.tokenizer import load_tokenizer
    from jaxllm.run import load_run

    encode = RowEncoder(cfg, load_tokenizer(cfg.data, cfg.model.vocab_size))
    items, rows = [], []
    for where, record in records:
        texts = record.get("completions") if isinstance(record, dict) else None
        if not isinstance(texts, list) or len(texts) < 2 or not all(isinstance(t, str) for t in texts):
            raise ScoreError(f"{where}: needs completions, a list of at least two strings")
        prompt = _prompt_messages(record, where)
        items.append((record, prompt, len(rows)))
        rows += [encode({"prompt": prompt, "completion": t}, where) for t in texts]
    cfg, params = load_run(args.checkpoint, args.step)
    scores = score_rows(cfg.model, params, rows, args.batch_size)
    written = ties = 0
    with open(args.pairs, "w", encoding="utf-8") as f:
        for record, prompt, start in items:
            texts = record["completions"]
            s = scores[start:start + len(texts)]
            best, worst = int(np.argmax(s)), int(np.argmin(s))
            if s[best] == s[worst]:
                ties += 1
                continue
            rest = {k: v for k, v in record.items() if k not in ("completions", "messages", "prompt")}
            pair = {**rest, "prompt": prompt, "chosen": prompt + [{"role": "assistant", "content": texts[best]}],
                    "rejected": prompt + [{"role": "assistant", "content": texts[worst]}],
                    "chosen_score": s[best], "rejected_score": s[worst]}
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")
            written += 1
    print(f"wrote {written} pairs -> {args.pairs} ({ties} prompts skipped: all replies scored the same)",
          file=sys.stderr)


def _score(args) -> None:
    if args.batch_size <= 0:
        raise ScoreError("--batch-size must be > 0")
    cfg = reward_run_config(args.checkpoint)
    records = read_records(args.input)
    from jaxllm.data.tokenizer import load_tokenizer
    from jaxllm.run import load_run

    tokenizer = load_tokenizer(cfg.data, cfg.model.vocab_size)
    encode = RowEncoder(cfg, tokenizer)
    rows = [encode(r, where) for where, r in records]
    cfg, params = load_run(args.checkpoint, args.step)
    if "reward_head" not in params:
        raise ScoreError(f"--checkpoint {args.checkpoint}: the checkpoint has no reward_head")
    scores = score_rows(cfg.model, params, rows, args.batch_size)
    if encode.truncated:
        print(f"note: {encode.truncated} of {len(rows)} records were cut to data.seq_len + 1 "
              f"({cfg.data.seq_len + 1}) tokens, as in training", file=sys.stderr)
    lines = [json.dumps({**r, "score": s}, ensure_ascii=False) for (_, r), s in zip(records, scores)]
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
        print(f"scored {len(lines)} records -> {args.output}", file=sys.stderr)
    else:
        for line in lines:
            print(line)
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
