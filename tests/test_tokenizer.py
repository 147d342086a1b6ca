"""SentencePiece tokenizer: training, round trips, the cached "auto" tokenizer, the CLI."""

import dataclasses
import os

import pytest

from jaxllm import tokenizer as cli
from jaxllm.config import DataConfig
from jaxllm.data import tokenizer as tok_lib
from jaxllm.data.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece

CODE = '''class Stack:
    """A stack — with non-ASCII: héllo, 日本語, 🙂."""

    def __init__(self):
        self.items = []  # 4-space indent

\tdef tabbed(self):
\t\treturn   len(self.items)   


if __name__ == "__main__":
    print(Stack().tabbed(), 12345)
'''


def _corpus(n: int = 40) -> list[str]:
    return [f"def func_{i}(x, y):\n    if x > {i}:\n        return x * y + {i}\n    return 'ok'\n"
            for i in range(n)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return train_sentencepiece(_corpus(), 300, str(tmp_path_factory.mktemp("tok") / "tiny"))


def test_round_trip_code_and_non_ascii(tiny_model):
    tok = Tokenizer(tiny_model)
    assert tok.vocab_size <= 300
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    for text in (CODE, "  leading spaces", "\n\nnewlines first", "x" * 5000):
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    # Indentation is learned as whitespace pieces, not only bytes.
    assert "▁▁▁▁" in {tok.id_to_piece(i) for i in tok.encode("    return x")}


def test_training_is_deterministic(tmp_path, tiny_model):
    again = train_sentencepiece(_corpus(), 300, str(tmp_path / "again"))
    assert open(again, "rb").read() == open(tiny_model, "rb").read()


def _write_corpus(folder, n=30):
    folder.mkdir()
    for i, text in enumerate(_corpus(n)):
        (folder / f"doc{i:02d}.py").write_text(text)
    return folder


def test_auto_tokenizer_is_cached(tmp_path, monkeypatch):
    data = _write_corpus(tmp_path / "corpus")
    cfg = DataConfig(train=(str(data),), tokenizer="auto", tokenizer_cache_dir=str(tmp_path / "cache"))
    calls = []
    real_train = tok_lib.train_sentencepiece
    monkeypatch.setattr(tok_lib, "train_sentencepiece", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    first = load_tokenizer(cfg, 320)
    mtime = os.stat(first.path).st_mtime_ns
    second = load_tokenizer(cfg, 320)
    assert calls == [1]  # the second call loaded the cached model
    assert second.path == first.path and os.stat(second.path).st_mtime_ns == mtime
    assert second.encode(CODE) == first.encode(CODE)
    # Another vocab size, or other data, is another cache entry.
    assert load_tokenizer(cfg, 330).path != first.path
    (data / "extra.py").write_text("print('more data')\n")
    assert load_tokenizer(cfg, 320).path != first.path
    assert len(calls) == 3
    assert not [f for f in os.listdir(tmp_path / "cache") if f.startswith(".tmp")]


def test_model_file_and_vocab_check(tiny_model, tmp_path):
    cfg = DataConfig(tokenizer=tiny_model)
    tok = load_tokenizer(cfg, 512)  # a larger (padded) model vocab is fine
    assert tok.path == tiny_model
    with pytest.raises(ValueError, match="model.vocab_size is 100"):
        load_tokenizer(cfg, 100)
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer(dataclasses.replace(cfg, tokenizer=str(tmp_path / "nope.model")), 512)


def test_cli_train_encode_decode(tmp_path, capsys):
    data = _write_corpus(tmp_path / "corpus", 20)
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text('{"body": "x = 1"}\n{"body": "y = 2"}\n')
    prefix = str(tmp_path / "out" / "sp")
    assert cli.main(["train", "--input", str(data), str(jsonl), "--text-field", "body",
                     "--vocab-size", "300", "--output", prefix]) == 0
    assert "22 documents" in capsys.readouterr().out
    tok = Tokenizer(prefix + ".model")
    assert cli.main(["encode", "--model", prefix + ".model", "--text", "def f(x):"]) == 0
    ids = [int(i) for i in capsys.readouterr().out.split()]
    assert ids == tok.encode("def f(x):")
    assert cli.main(["decode", "--model", prefix + ".model", "--ids", *map(str, ids)]) == 0
    assert capsys.readouterr().out == "def f(x):\n"
    assert cli.main(["train", "--input", str(tmp_path / "missing*.txt"), "--vocab-size", "300",
                     "--output", prefix]) == 2
    assert "missing*.txt" in capsys.readouterr().err
