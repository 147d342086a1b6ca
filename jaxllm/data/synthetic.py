"""Synthetic tasks with exact answers, for the tiny end-to-end post-training recipe.

`python -m jaxllm.data.synthetic --out DIR [--seed S] [--n-train N --n-eval M]` writes

  pretrain.jsonl, pretrain_eval.jsonl   `text`: worked examples in plain prose, one per line
                                        ("Q: What is 23 + 45? A: 68"), 8 per document
  sft_train.jsonl, sft_eval.jsonl       `messages` (user question, assistant answer), plus
                                        `negative` (a wrong answer), `task`, `answer`
  pref_train.jsonl, pref_eval.jsonl     `prompt`, `chosen`, `rejected` (UltraFeedback style:
                                        message lists ending with the reply), `task`, `answer`
  kto_train.jsonl, kto_eval.jsonl       `prompt`, `completion`, `label`: every problem twice,
                                        once with the right answer (true), once a wrong one
  rl_train.jsonl, rl_eval.jsonl         Tülu 3 RLVR records: `messages` (the user question),
                                        `ground_truth` (the answer), `dataset` "exact", `task`

Problems (`TASKS`): 2-3 digit addition and subtraction (non-negative results), multiplication of a
2-3 digit number by a digit 2-9, reversing a short word, counting a letter in a word, uppercasing a
word, sorting 3-4 numbers. The assistant reply is exactly the answer. A wrong answer is a
plausible near miss: a number off by one in one digit, two letters swapped or the word left as it
was, a count off by one, one letter left lowercase, two numbers out of order. Eval prompts are
disjoint from train prompts (and every prompt of a file is distinct); the same seed gives the same
files. `answer_accuracy` scores a model's replies to the eval prompts against the exact answers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
from typing import Callable, Sequence

TASKS = ("add", "sub", "mul", "reverse", "count", "upper", "sort")
EXAMPLES_PER_DOCUMENT = 8

WORDS = (
    "apple bread chair dance eagle flame grape house juice knife lemon mango night ocean piano queen river "
    "stone table uncle voice water yacht zebra actor beach cloud dream earth field ghost heart image judge "
    "laser magic noise order paper radio salad tiger unity video wheat youth angle badge candy delta "
    "fable giant honey ivory jelly koala lunch maple nerve olive pearl quilt robin sugar toast urban vapor "
    "wagon cat dog sun moon star tree bird fish frog lamp book door rock sand snow rain wind fire gold "
    "milk rice salt corn bean seed leaf root bark pond lake hill road ship boat car bus train plane kite "
    "ring bell drum harp song poem word name city town farm barn nest cave reef wave tide dusk dawn"
).split()
_CONSONANTS = "bcdfghjklmnprstvz"
_VOWELS = "aeiou"


def _word(rng: random.Random) -> str:
    """A real short word or a pronounceable made-up one (3-6 letters), never a palindrome."""
    while True:
        if rng.random() < 0.5:
            w = rng.choice(WORDS)
        else:
            w = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3)))
            if rng.random() < 0.5:
                w += rng.choice(_CONSONANTS)
        if 3 <= len(w) <= 6 and w != w[::-1]:
            return w


def make_problem(kind: str, rng: random.Random) -> tuple[str, str]:
    """(prompt, exact answer) of one random problem of `kind`."""
    if kind == "add":
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        return f"What is {a} + {b}?", str(a + b)
    if kind == "sub":
        a, b = sorted((rng.randint(10, 999), rng.randint(10, 999)), reverse=True)
        return f"What is {a} - {b}?", str(a - b)
    if kind == "mul":
        a, d = rng.randint(10, 999), rng.randint(2, 9)
        return f"What is {a} * {d}?", str(a * d)
    if kind == "reverse":
        w = _word(rng)
        return f"Reverse the word '{w}'.", w[::-1]
    if kind == "count":
        w = _word(rng)
        c = rng.choice(w) if rng.random() < 0.8 else rng.choice([x for x in string.ascii_lowercase if x not in w])
        return f"How many times does the letter '{c}' appear in '{w}'?", str(w.count(c))
    if kind == "upper":
        w = _word(rng)
        return f"Write '{w}' in uppercase.", w.upper()
    if kind == "sort":
        nums = rng.sample(range(1, 100), rng.randint(3, 4))
        if nums == sorted(nums):
            nums.reverse()
        return f"Sort from smallest to largest: {', '.join(map(str, nums))}.", ", ".join(map(str, sorted(nums)))
    raise ValueError(f"unknown task {kind!r}; tasks: {', '.join(TASKS)}")


def wrong_answer(kind: str, answer: str, rng: random.Random) -> str:
    """A plausible wrong answer to a problem of `kind` whose right answer is `answer`."""
    for _ in range(100):
        if kind in ("add", "sub", "mul"):
            digits = list(answer)
            k = rng.randrange(len(digits))
            d = int(digits[k]) + rng.choice((-1, 1))
            if not 0 <= d <= 9 or (k == 0 and d == 0 and len(digits) > 1):
                continue
            digits[k] = str(d)
            out = "".join(digits)
        elif kind in ("reverse", "upper"):
            if rng.random() < 0.5:  # the word as it was given
                out = answer[::-1] if kind == "reverse" else answer.lower()
            elif kind == "reverse":
                k = rng.randrange(len(answer) - 1)
                out = answer[:k] + answer[k + 1] + answer[k] + answer[k + 2:]
            else:
                k = rng.randrange(len(answer))
                out = answer[:k] + answer[k].lower() + answer[k + 1:]
        elif kind == "count":
            out = str(int(answer) + (1 if answer == "0" else rng.choice((-1, 1))))
        elif kind == "sort":
            nums = answer.split(", ")
            if rng.random() < 0.3:
                out = ", ".join(reversed(nums))
            else:
                k = rng.randrange(len(nums) - 1)
                nums[k], nums[k + 1] = nums[k + 1], nums[k]
                out = ", ".join(nums)
        else:
            raise ValueError(f"unknown task {kind!r}; tasks: {', '.join(TASKS)}")
        if out != answer:
            return out
    raise RuntimeError(f"no wrong answer found for {kind} answer {answer!r}")


def _problems(rng: random.Random, n: int, exclude: set[str]) -> list[tuple[str, str, str]]:
    """n distinct (kind, prompt, answer), tasks in turn, no prompt in `exclude` (which grows)."""
    out = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct problems; ask for fewer")
        kind = TASKS[len(out) % len(TASKS)]
        prompt, answer = make_problem(kind, rng)
        if prompt in exclude:
            continue
        exclude.add(prompt)
        out.append((kind, prompt, answer))
    rng.shuffle(out)
    return out


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def generate(seed: int = 0, n_train: int = 10_000, n_eval: int = 200) -> dict[str, list[dict]]:
    """The records of every file (see the module doc), by file name."""
    if n_train < 1 or n_eval < 1:
        raise ValueError(f"n_train and n_eval must be >= 1, got {n_train} and {n_eval}")
    rng = random.Random(seed)
    seen: set[str] = set()
    splits = {"eval": _problems(rng, n_eval, seen), "train": _problems(rng, n_train, seen)}
    files: dict[str, list[dict]] = {}
    for split, problems in splits.items():
        wrong = [wrong_answer(kind, answer, rng) for kind, _, answer in problems]
        lines = [f"Q: {prompt} A: {answer}" for _, prompt, answer in problems]
        files["pretrain.jsonl" if split == "train" else "pretrain_eval.jsonl"] = [
            {"text": "\n".join(lines[i:i + EXAMPLES_PER_DOCUMENT]) + "\n"}
            for i in range(0, len(lines), EXAMPLES_PER_DOCUMENT)]
        files[f"sft_{split}.jsonl"] = [
            {"messages": [_user(prompt), _assistant(answer)], "negative": bad, "task": kind, "answer": answer}
            for (kind, prompt, answer), bad in zip(problems, wrong)]
        files[f"pref_{split}.jsonl"] = [
            {"prompt": prompt, "chosen": [_user(prompt), _assistant(answer)],
             "rejected": [_user(prompt), _assistant(bad)], "task": kind, "answer": answer}
            for (kind, prompt, answer), bad in zip(problems, wrong)]
        kto = [r for (kind, prompt, answer), bad in zip(problems, wrong)
               for r in ({"prompt": prompt, "completion": answer, "label": True, "task": kind, "answer": answer},
                         {"prompt": prompt, "completion": bad, "label": False, "task": kind, "answer": answer})]
        rng.shuffle(kto)
        files[f"kto_{split}.jsonl"] = kto
        files[f"rl_{split}.jsonl"] = [
            {"messages": [_user(prompt)], "ground_truth": answer, "dataset": "exact", "task": kind}
            for kind, prompt, answer in problems]
    return files


def write(out_dir: str, seed: int = 0, n_train: int = 10_000, n_eval: int = 200) -> dict[str, str]:
    """Writes every file under out_dir; returns {file name: path}."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, records in generate(seed, n_train, n_eval).items():
        path = paths[name] = os.path.join(out_dir, name)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    return paths


# ----------------------------------------------------------------------------- scoring


def record_prompt(record: dict) -> list[dict]:
    """The prompt messages of an eval record (sft `messages`, or pref / kto `prompt`)."""
    if "messages" in record:
        messages = record["messages"]
        last = max((k for k, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise ValueError("record has no assistant turn to take the prompt before")
        return list(messages[:last])
    if "prompt" in record:
        prompt = record["prompt"]
        return [_user(prompt)] if isinstance(prompt, str) else list(prompt)
    raise ValueError(f"record has neither 'messages' nor 'prompt' (keys: {', '.join(record)})")


def record_answer(record: dict) -> str:
    """The exact answer of an eval record: its `answer`, else the last assistant message."""
    if "answer" in record:
        return str(record["answer"])
    if "messages" in record:
        return [m for m in record["messages"] if m["role"] == "assistant"][-1]["content"]
    if isinstance(record.get("chosen"), list):
        return record["chosen"][-1]["content"]
    if isinstance(record.get("chosen"), str):
        return record["chosen"]
    raise ValueError(f"record has no answer (keys: {', '.join(record)})")


def normalize_reply(reply: str) -> str:
    """The first non-empty line of a reply, stripped: the answer the model gave."""
    for line in reply.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def answer_accuracy(generate_fn: Callable[[list[list[dict]]], Sequence[str]], eval_records: Sequence[dict]) -> float:
    """Fraction of eval records whose reply is exactly the answer.

    generate_fn maps a list of prompt message lists to reply strings (one per prompt); a reply
    counts when its first non-empty line, stripped, equals the answer."""
    if not eval_records:
        raise ValueError("no eval records")
    prompts = [record_prompt(r) for r in eval_records]
    replies = list(generate_fn(prompts))
    if len(replies) != len(prompts):
        raise ValueError(f"generate_fn returned {len(replies)} replies for {len(prompts)} prompts")
    right = sum(normalize_reply(reply) == record_answer(r) for reply, r in zip(replies, eval_records))
    return right / len(eval_records)


def filter_tasks(src: str, dst: str, tasks: Sequence[str]) -> int:
    """Writes the records of `src` whose `task` is one of `tasks` to `dst`; returns their number."""
    records = [r for r in read_jsonl(src) if r.get("task") in set(tasks)]
    with open(dst, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return len(records)


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.data.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=10_000, help="training problems")
    parser.add_argument("--n-eval", type=int, default=200, help="held-out problems")
    args = parser.parse_args(argv)
    paths = write(args.out, args.seed, args.n_train, args.n_eval)
    for name, path in paths.items():
        with open(path, encoding="utf-8") as f:
            print(f"{path}: {sum(1 for _ in f)} records")


if __name__ == "__main__":
    main()
