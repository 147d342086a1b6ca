"""Run directories (`jaxllm.run`): trainer.epochs is counted once per data setting and kept in
RUN_DIR/epoch_size.json."""

import json

import pytest

from jaxllm.config import Config, build
from jaxllm import run as run_lib
from jaxllm.data import posttrain
from jaxllm.data.tokenizer import Tokenizer, train_sentencepiece

WORDS = ["apple", "river", "stone", "cloud", "seven", "green", "tiger", "piano", "eleven", "house", "lemon", "quiet"]
SENTENCES = (["<|im_start|>system\nBe brief.<|im_end|>", "<|im_start|>user\nWhat is 12 + 30?<|im_end|>",
              "<|im_start|>assistant\nThe answer is 42.<|im_end|>", "Reverse the word apple.",
              "Tell me about the river and the stone.", "The sky is blue and the grass is green."]
             + [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]) * 4


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    return Tokenizer(train_sentencepiece(SENTENCES, 512, str(tmp_path_factory.mktemp("sp") / "tiny")))


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def _cfg(task, train, eval_=None, *, seq_len=48, batch=2, **sections):
    raw = {"task": task, "data": {"train": [train], "eval": [eval_ or train], "seq_len": seq_len,
                                  **sections.pop("data", {})},
           "trainer": {"batch_size": batch}, **sections}
    return build(Config, raw)


def _user(t):
    return {"role": "user", "content": t}


def _asst(t):
    return {"role": "assistant", "content": t}


def _pair_records(n=12):
    recs = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        q = f"Reverse the word {w} ({i})."
        kind = i % 3
        if kind == 0:  # UltraFeedback: prompt string, chosen / rejected lists
            recs.append({"prompt": q, "chosen": [_user(q), _asst(w[::-1])], "rejected": [_user(q), _asst(w)],
                         "score": float(i)})
        elif kind == 1:  # prompt taken from the chosen list (multi-turn, with a system turn)
            ctx = [{"role": "system", "content": "Be brief."}, _user("What is 12 + 30?"), _asst("42"), _user(q)]
            recs.append({"chosen": ctx + [_asst(w[::-1])], "rejected": ctx + [_asst(w + "s")], "score": i})
        else:  # plain reply strings
            recs.append({"prompt": q, "chosen": w[::-1], "rejected": "no", "score": -i})
    return recs


def test_resolve_epochs_counts_once_per_data_setting(tmp_path, sp, monkeypatch):
    from jaxllm.config import ConfigError

    path = _write(tmp_path / "pairs.jsonl", _pair_records(14))
    cfg = _cfg("reward", path, seq_len=128, batch=4, trainer={"batch_size": 4, "epochs": 2.5},
               schedule={"warmup_steps": 1})
    run = tmp_path / "run"
    run.mkdir()
    resolved = run_lib.resolve_epochs(cfg, sp, str(run), log=lambda _: None)
    assert (resolved.trainer.total_steps, resolved.trainer.epochs) == (8, 0.0)  # ceil(2.5 * 3)
    counted = []
    real = posttrain.batches_per_epoch
    monkeypatch.setattr(posttrain, "batches_per_epoch", lambda *a, **k: counted.append(1) or real(*a, **k))
    assert run_lib.resolve_epochs(cfg, sp, str(run), log=lambda _: None) == resolved
    assert not counted  # read from RUN_DIR/epoch_size.json
    bigger = _cfg("reward", path, seq_len=128, batch=6, trainer={"batch_size": 6, "epochs": 1},
                  schedule={"warmup_steps": 1})
    assert run_lib.resolve_epochs(bigger, sp, str(run), log=lambda _: None).trainer.total_steps == 2
    assert counted == [1]  # another batch size: counted again
    with pytest.raises(ConfigError, match="warmup_steps"):
        run_lib.resolve_epochs(_cfg("reward", path, seq_len=128, batch=4, trainer={"batch_size": 4, "epochs": 1}),
                               sp, str(run), log=lambda _: None)
    with pytest.raises(ConfigError, match="not one full batch"):
        run_lib.resolve_epochs(_cfg("reward", path, seq_len=128, batch=16, trainer={"batch_size": 16, "epochs": 1},
                                    schedule={"warmup_steps": 1}), sp, str(run), log=lambda _: None)
    before = len(counted)
    _write(tmp_path / "pairs.jsonl", _pair_records(14) + _pair_records(6))  # the data changed
    assert run_lib.resolve_epochs(bigger, sp, str(run), log=lambda _: None).trainer.total_steps == 3
    assert len(counted) == before + 1
