"""Run directories (`jaxllm.run`): trainer.epochs is counted once per data setting and kept in
RUN_DIR/epoch_size.json."""

import pytest

from jaxllm import run as run_lib
from jaxllm.data import posttrain
from tests.test_posttrain_data import _cfg as _data_cfg
from tests.test_posttrain_data import _pair_records, _write, sp  # noqa: F401 (sp: the fixture)


def _cfg(task, train, **kw):
    return _data_cfg(train, task=task, **kw)


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
