"""Synthetic exact-answer tasks (jaxllm.data.synthetic): answers, near misses, splits, files, scoring."""

import collections
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from jaxllm.data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def solve(prompt):
    """(task, answer) recomputed from the prompt text alone."""
    if m := re.fullmatch(r"What is (\d+) ([+*-]) (\d+)\?", prompt):
        a, op, b = int(m[1]), m[2], int(m[3])
        assert 10 <= a <= 999
        if op == "*":
            assert 2 <= b <= 9
            return "mul", str(a * b)
        assert 10 <= b <= 999
        if op == "-":
            assert a >= b
        return ("add", str(a + b)) if op == "+" else ("sub", str(a - b))
    if m := re.fullmatch(r"Reverse the word '([a-z]+)'\.", prompt):
        return "reverse", m[1][::-1]
    if m := re.fullmatch(r"How many times does the letter '([a-z])' appear in '([a-z]+)'\?", prompt):
        return "count", str(sum(ch == m[1] for ch in m[2]))
    if m := re.fullmatch(r"Write '([a-z]+)' in uppercase\.", prompt):
        return "upper", m[1].upper()
    if m := re.fullmatch(r"Sort from smallest to largest: ([\d, ]+)\.", prompt):
        nums = [int(x) for x in m[1].split(", ")]
        assert 3 <= len(nums) <= 4 and len(set(nums)) == len(nums)
        return "sort", ", ".join(str(x) for x in sorted(nums))
    raise AssertionError(f"unknown prompt {prompt!r}")


def near_miss(task, answer, wrong):
    """The wrong answer is wrong but plausible for its task."""
    if wrong == answer:
        return False
    if task in ("add", "sub", "mul"):
        diff = [(a, b) for a, b in zip(answer, wrong) if a != b]
        return len(wrong) == len(answer) and len(diff) == 1 and abs(int(diff[0][0]) - int(diff[0][1])) == 1
    if task == "count":
        return abs(int(wrong) - int(answer)) == 1 and int(wrong) >= 0
    if task == "reverse":
        return sorted(wrong) == sorted(answer)
    if task == "upper":
        return wrong.upper() == answer
    if task == "sort":
        return sorted(wrong.split(", ")) == sorted(answer.split(", "))
    return False


@pytest.fixture(scope="module")
def files():
    return synthetic.generate(seed=3, n_train=700, n_eval=140)


def _prompt_of(record):
    if "ground_truth" in record:  # RLVR prompt records: the messages are the prompt
        return record["messages"][-1]["content"]
    return synthetic.record_prompt(record)[-1]["content"]


def test_answers_exact_and_wrong_answers_plausible(files):
    for split in ("train", "eval"):
        sft, pref = files[f"sft_{split}.jsonl"], files[f"pref_{split}.jsonl"]
        assert len(sft) == len(pref) == (700 if split == "train" else 140)
        tasks_seen = collections.Counter()
        for s, p in zip(sft, pref):
            user, reply = s["messages"]
            task, answer = solve(user["content"])
            tasks_seen[task] += 1
            assert (user["role"], reply["role"]) == ("user", "assistant")
            assert reply["content"] == answer == s["answer"] and s["task"] == task
            assert near_miss(task, answer, s["negative"]), (task, answer, s["negative"])
            assert p["prompt"] == user["content"] and solve(p["prompt"]) == (task, p["answer"])
            assert p["chosen"] == [user, {"role": "assistant", "content": answer}]
            assert p["rejected"][0] == user and p["rejected"][1]["role"] == "assistant"
            assert near_miss(task, answer, p["rejected"][1]["content"])
        assert set(tasks_seen) == set(synthetic.TASKS) and max(tasks_seen.values()) - min(tasks_seen.values()) <= 1
        for k in files[f"kto_{split}.jsonl"]:
            task, answer = solve(k["prompt"])
            assert (k["completion"] == answer) == k["label"]
            if not k["label"]:
                assert near_miss(task, answer, k["completion"])
        by_prompt = collections.Counter((k["prompt"], k["label"]) for k in files[f"kto_{split}.jsonl"])
        assert set(by_prompt.values()) == {1} and len(by_prompt) == 2 * len(sft)
    for split, name in (("train", "pretrain.jsonl"), ("eval", "pretrain_eval.jsonl")):
        lines = [line for doc in files[name] for line in doc["text"].splitlines()]
        assert len(lines) == len(files[f"sft_{split}.jsonl"])
        for line in lines:
            m = re.fullmatch(r"Q: (.*) A: (.*)", line)
            assert m and solve(m[1])[1] == m[2]


def test_eval_prompts_disjoint_from_train_and_distinct(files):
    def prompts(name):
        if name.startswith("pretrain"):
            return [re.fullmatch(r"Q: (.*) A: .*", line)[1] for d in files[name] for line in d["text"].splitlines()]
        return [_prompt_of(r) for r in files[name]]

    train = set().union(*(prompts(n) for n in files if "eval" not in n))
    evals = set().union(*(prompts(n) for n in files if "eval" in n))
    assert evals and train and not train & evals
    for name in ("sft_train.jsonl", "sft_eval.jsonl", "pref_train.jsonl", "pretrain.jsonl"):
        assert len(set(prompts(name))) == len(prompts(name))


def test_deterministic_by_seed(files):
    assert synthetic.generate(seed=3, n_train=700, n_eval=140) == files
    other = synthetic.generate(seed=4, n_train=700, n_eval=140)
    assert other["sft_train.jsonl"] != files["sft_train.jsonl"]


def test_cli_writes_the_files(tmp_path):
    out = tmp_path / "syn"
    proc = subprocess.run([sys.executable, "-m", "jaxllm.data.synthetic", "--out", str(out), "--seed", "1",
                           "--n-train", "50", "--n-eval", "10"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    want = synthetic.generate(seed=1, n_train=50, n_eval=10)
    assert sorted(os.listdir(out)) == sorted(want)
    for name, records in want.items():
        assert synthetic.read_jsonl(str(out / name)) == records
    assert f"{out / 'kto_train.jsonl'}: 100 records" in proc.stdout


def test_answer_accuracy(files):
    records = files["sft_eval.jsonl"][:40]
    oracle = lambda prompts: [solve(p[-1]["content"])[1] for p in prompts]
    assert synthetic.answer_accuracy(oracle, records) == 1.0
    # Replies may carry surrounding whitespace and later lines; the first line is the answer.
    chatty = lambda prompts: [f"  {a}\nQ: more" for a in oracle(prompts)]
    assert synthetic.answer_accuracy(chatty, records) == 1.0
    half = lambda prompts: [a if k % 2 else a + "0" for k, a in enumerate(oracle(prompts))]
    assert synthetic.answer_accuracy(half, records) == 0.5
    # The prompts given to generate_fn are the user turns only; pref records work too.
    got = []
    synthetic.answer_accuracy(lambda prompts: got.extend(prompts) or oracle(prompts), records[:3])
    assert got == [r["messages"][:1] for r in records[:3]]
    assert synthetic.answer_accuracy(oracle, files["pref_eval.jsonl"][:20]) == 1.0
    with pytest.raises(ValueError, match="returned 1 replies for 3 prompts"):
        synthetic.answer_accuracy(lambda prompts: ["1"], records[:3])


def test_files_load_as_post_training_data(tmp_path):
    """The written files are what jaxllm.data.posttrain reads for the sft, pairs and kto formats."""
    from jaxllm.config import Config, build
    from jaxllm.data import posttrain
    from jaxllm.data.tokenizer import Tokenizer, train_sentencepiece

    paths = synthetic.write(str(tmp_path), seed=0, n_train=60, n_eval=20)
    text = [d["text"] for d in synthetic.read_jsonl(paths["pretrain.jsonl"])] + ["<|im_start|>user\n<|im_end|>"]
    tok = Tokenizer(train_sentencepiece(text, 400, str(tmp_path / "sp")))
    for fmt, name, extra in (("sft", "sft", {"sft": {"unlikelihood_weight": 1.0}}), ("pairs", "pref", {}),
                             ("kto", "kto", {})):
        cfg = build(Config, {"data": {"train": [paths[f"{name}_train.jsonl"]],
                                      "eval": [paths[f"{name}_eval.jsonl"]], "seq_len": 128},
                             "trainer": {"batch_size": 4}, **extra})
        it = posttrain.train_iterator(cfg, tok, fmt, process_index=0, process_count=1)
        batch = next(it)
        assert not it.skipped and not it.source_skipped
        ev = posttrain.eval_batches(cfg, tok, fmt, 1, process_index=0, process_count=1)
        assert len(ev) == 1
        mask = batch["chosen_loss_mask" if fmt == "pairs" else "loss_mask"]
        assert mask.sum() > 0
        if fmt == "sft":
            assert batch["ul_mask"].sum() > 0
            assert not (batch["ul_mask"] * batch["loss_mask"]).any()
        else:
            assert np.all(batch["pair_mask"] == 1)
