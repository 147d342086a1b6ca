import dataclasses
import glob
import os
import subprocess
import sys

import pytest

from jaxllm import tokenizer as tokenizer_cli
from jaxllm.config import Config, ConfigError, dump_yaml, load_config, validate
from jaxllm.data import prepare as prepare_cli
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.optim import make_schedule
from jaxllm.train import cli as train_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)))
def test_every_shipped_yaml_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.trainer.batch_size % cfg.trainer.grad_accum_steps == 0


@pytest.mark.parametrize("name, params_m", [("smollm2-135m", 134.5), ("smollm2-360m", 361.8),
                                            ("smollm2-1.7b", 1711.4), ("llama3-8b", 8030.3),
                                            ("llama3-70b", 70553.7)])
def test_presets_have_published_sizes(name, params_m):
    cfg = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"))
    assert cfg.model.num_params() / 1e6 == pytest.approx(params_m, abs=0.1)


def test_base_inheritance_and_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("model: {d_model: 64, n_heads: 2}\ntrainer: {total_steps: 5}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrainer: {batch_size: 4}\n")
    cfg = load_config(str(tmp_path / "b.yaml"), ["trainer.total_steps=7", "schedule.warmup_steps=2", "model.rope_scaling.type=llama3",
                                                "data.train=[x.txt, y.jsonl]", "optimizer.lr=1e-3"])
    assert (cfg.model.d_model, cfg.model.n_heads) == (64, 2)
    assert (cfg.trainer.batch_size, cfg.trainer.total_steps) == (4, 7)
    assert cfg.model.rope_scaling.type == "llama3"
    assert cfg.data.train == ("x.txt", "y.jsonl")
    assert cfg.optimizer.lr == 1e-3


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs", "llama3-8b.yaml"), ["trainer.total_steps=3000"])
    dump_yaml(cfg, str(tmp_path / "c.yaml"))
    assert load_config(str(tmp_path / "c.yaml")) == cfg


@pytest.mark.parametrize("override, message", [
    ("trainer.totl_steps=3", "unknown key 'trainer.totl_steps'; valid keys here: batch_size"),
    ("model.attention=flash", "model.attention: 'flash' is not one of xla, cudnn, pallas"),
    ("schedule.name=step", "schedule.name: 'step' is not one of wsd, cosine, linear, constant"),
    ("trainer.batch_size=abc", "trainer.batch_size: expected an integer, got 'abc'"),
    ("checkpoint.every_steps=1.5", "checkpoint.every_steps: expected an integer"),
    ("mesh.tensor=0", "mesh.data, mesh.fsdp and mesh.tensor must be positive or -1"),
    ("model.n_kv_heads=3", "model.n_heads (4) must be a multiple of model.n_kv_heads (3)"),
    ("trainer.grad_accum_steps=5", "trainer.grad_accum_steps (5) must divide trainer.batch_size (32)"),
    ("bogus=1", "unknown key 'bogus'"),
    ("trainer.epochs=2", "trainer.epochs is for task sft, dpo, reward, rater or edu; for pretraining set trainer.total_steps"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(os.path.join(ROOT, "configs", "tiny.yaml"), [override])
    assert message in str(e.value)


def test_epochs_and_total_steps_the_later_layer_wins(tmp_path):
    """The base sets total_steps, the recipe epochs: epochs. An override of either replaces the
    other. One file setting both is an error."""
    recipe = os.path.join(ROOT, "configs", "recipes", "tulu3-8b-sft.yaml")
    assert load_config(recipe).trainer.epochs == 2
    cfg = load_config(recipe, ["trainer.total_steps=100"])
    assert (cfg.trainer.epochs, cfg.trainer.total_steps) == (0, 100)
    assert load_config(recipe, ["trainer.total_steps=100", "trainer.epochs=1"]).trainer.epochs == 1
    (tmp_path / "both.yaml").write_text(f"base: {recipe}\ntrainer: {{epochs: 1, total_steps: 10}}\n")
    with pytest.raises(ConfigError, match="both.yaml: set one of trainer.total_steps, trainer.epochs"):
        load_config(str(tmp_path / "both.yaml"))
    (tmp_path / "alone.yaml").write_text("task: sft\ntrainer: {epochs: 1, total_steps: 10}\n")
    with pytest.raises(ConfigError, match="alone.yaml: set one of"):
        load_config(str(tmp_path / "alone.yaml"))


def test_total_tokens_sets_the_steps_through_the_stages(tmp_path):
    # Stage 0: 4 x 32 = 128 tokens per step for 10 steps; stage 1: 8 x 64 = 512 per step.
    (tmp_path / "t.yaml").write_text(f"""base: {os.path.join(ROOT, "configs", "tiny.yaml")}
data:
  seq_len: 32
  stages: [{{}}, {{start_step: 10, seq_len: 64, batch_size: 8}}]
schedule: {{warmup_steps: 2}}
trainer: {{batch_size: 4, total_tokens: {10 * 128 + 5 * 512 + 1}}}
""")
    cfg = load_config(str(tmp_path / "t.yaml"))
    assert (cfg.trainer.total_steps, cfg.trainer.total_tokens) == (16, 0)  # 10 + ceil((5 * 512 + 1) / 512)
    assert load_config(str(tmp_path / "t.yaml"), ["trainer.total_steps=7"]).trainer.total_steps == 7
    with pytest.raises(ConfigError, match="ends before data.stages\\[1\\] starts \\(1280 tokens in\\)"):
        load_config(str(tmp_path / "t.yaml"), ["trainer.total_tokens=1000"])
    with pytest.raises(ConfigError, match="trainer.total_tokens is for pretraining"):
        load_config(os.path.join(ROOT, "configs", "recipes", "tulu3-8b-sft.yaml"), ["trainer.total_tokens=9"])
    # The SmolLM2-1.7B recipe run for the paper's round 11T tokens at 2,097,152 per step in every stage.
    smol = load_config(os.path.join(ROOT, "configs", "recipes", "smollm2-1.7b-pretrain.yaml"),
                       ["trainer.total_tokens=11000000000000"]).trainer
    assert smol.total_steps == -(-11_000_000_000_000 // 2_097_152) == 5245209


def test_cli_bad_key_is_one_line_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "jaxllm.train", "--config", "configs/tiny.yaml",
                           "model.attenton=xla"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "unknown key 'model.attenton'" in lines[0] and "attention" in lines[0]


def test_yaml_is_parsed_safely(tmp_path):
    (tmp_path / "evil.yaml").write_text("trainer: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(tmp_path / "evil.yaml"))


@pytest.mark.parametrize("override, message", [
    ("model.attention=cudnn", "model.attention=cudnn needs an NVIDIA GPU, this machine has cpu devices; valid here: xla"),
    ("model.attention=pallas", "model.attention=pallas needs a GPU or TPU"),
    ("mesh.data=3", "mesh: data*fsdp*tensor = 3 but there are 2 devices"),
])
def test_cli_checks_config_against_the_machine(override, message):
    proc = subprocess.run([sys.executable, "-m", "jaxllm.train", "--config", "configs/tiny.yaml", override],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    assert proc.returncode == 2, proc.stderr[-500:]
    assert message in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- schedule checks

@pytest.mark.parametrize("overrides, message", [
    (["trainer.total_steps=12", "schedule.warmup_steps=12"],
     "the warmup (schedule.warmup_steps 12) and the decay (schedule.decay_fraction 0.2 of the run = 2 steps) "
     "take 14 steps, more than trainer.total_steps (12)"),
    (["schedule.warmup_ratio=0.5", "schedule.decay_fraction=0.6"],
     "the warmup (schedule.warmup_ratio 0.5 of the run = 350 steps) and the decay (schedule.decay_fraction 0.6 "
     "of the run = 420 steps) take 770 steps, more than trainer.total_steps (700)"),
    (["schedule.name=linear", "schedule.warmup_steps=701"],
     "the warmup (schedule.warmup_steps 701) takes 701 steps, more than trainer.total_steps (700)"),
    (["schedule.min_lr=0.01"], "schedule.min_lr (0.01) must be between 0 and optimizer.lr (0.005); above it"),
    (["schedule.min_lr=-1e-4"], "schedule.min_lr (-0.0001) must be between 0 and optimizer.lr (0.005)"),
    (["optimizer.b2=1.0"], "optimizer.b1 and optimizer.b2 must be in [0, 1)"),
])
def test_schedule_checks_name_the_keys(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(os.path.join(ROOT, "configs", "tiny.yaml"), overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_schedule_that_fits_exactly_is_accepted_and_a_counted_run_is_checked_again():
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), ["trainer.total_steps=15", "schedule.warmup_steps=12"])
    sched = make_schedule(cfg.optimizer, cfg.schedule, 15)  # 12 warmup + 3 decay steps: no stable phase
    assert float(sched(12)) == pytest.approx(cfg.optimizer.lr) and float(sched(15)) == 0.0
    # trainer.epochs: total_steps is known only once the data is counted (run.resolve_epochs).
    recipe = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), ["task=sft", "trainer.epochs=1"])
    with pytest.raises(ConfigError, match=r"the warmup \(schedule.warmup_steps 30\) and the decay .* take 31 "
                                          r"steps, more than trainer.total_steps \(5\)"):
        validate(dataclasses.replace(recipe, trainer=dataclasses.replace(recipe.trainer, total_steps=5, epochs=0.0)))
    with pytest.raises(ConfigError, match="more than trainer.total_steps"):
        make_schedule(recipe.optimizer, recipe.schedule, 5)


# ----------------------------------------------------------------------------- command-line errors

def test_train_cli_reports_data_errors_in_one_line(tmp_path, capsys, monkeypatch):
    """Errors found once the run starts (inside train()) are one line and exit 2 as well."""
    (tmp_path / "nodocs.jsonl").write_text('{"body": "no text field"}\n{"body": 2}\n')
    base = ["--config", os.path.join(ROOT, "configs", "tiny.yaml"), "mesh.cpu_devices=0",
            f"trainer.run_dir={tmp_path / 'run'}", f"data.tokenizer_cache_dir={tmp_path / 'tok'}"]
    for spec, message in [(f"{tmp_path}/none/*.jsonl", "glob matches no"),
                          (str(tmp_path / "nodocs.jsonl"), "no usable documents"),
                          (str(tmp_path / "absent.jsonl"), "no such file, folder or glob")]:
        assert train_cli.main(base + [f"data.train=[{spec}]"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"error: {spec}: {message}"), err
    assert train_cli.main(base + ["data.tokenizer=" + str(tmp_path / "absent.model")]) == 2
    assert "data.tokenizer: no SentencePiece .model file" in capsys.readouterr().err
    monkeypatch.setattr(train_cli, "train", lambda cfg: 1 / 0)  # a bug keeps its traceback
    with pytest.raises(ZeroDivisionError):
        train_cli.main(base)


def test_train_cli_process_prints_one_line_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jaxllm.train", "--config", "configs/tiny.yaml",
                           f"data.train=[{tmp_path}/*.jsonl]", f"trainer.run_dir={tmp_path / 'run'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path}/*.jsonl: glob matches no "
                                                ".txt/.py/.md/.jsonl/.jsonl.gz/.jsonl.zst/.parquet/.array_record files"]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp") / "sp"
    assert tokenizer_cli.main(["train", "--input", "stdlib:eval", "--vocab-size", "400", "--output", str(out),
                               "--max-chars", "200000"]) == 0
    return f"{out}.model"


def test_tokenizer_cli_errors_are_one_line(tmp_path, capsys, sp_model):
    (tmp_path / "bad.model").write_bytes(b"not a model")
    (tmp_path / "tokenizer.json").write_text("{}")
    cases = [(["encode", "--model", str(tmp_path / "absent.model"), "--text", "x"], "absent.model: no such"),
             (["encode", "--model", str(tmp_path / "bad.model"), "--text", "x"], "bad.model: not a SentencePiece model"),
             (["encode", "--model", str(tmp_path / "tokenizer.json"), "--text", "x"], "not a Hugging Face tokenizer.json"),
             (["decode", "--model", sp_model, "--ids", "5", "400", "-1"], "--ids 400 -1: not ids of"),
             (["train", "--input", str(tmp_path / "none*.jsonl"), "--vocab-size", "50", "--output", str(tmp_path / "o")],
              "glob matches no"),
             (["train", "--input", "stdlib:eval", "--vocab-size", "50", "--output", str(tmp_path / "o"),
               "--max-chars", "100000"], "SentencePiece could not train on stdlib:eval: ")]
    for argv, message in cases:
        assert tokenizer_cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert tokenizer_cli.main(["encode", "--model", sp_model, "--text", "def f(x):"]) == 0
    assert capsys.readouterr().out.split() == [str(i) for i in Tokenizer(sp_model).encode("def f(x):")]


def test_prepare_cli_errors_are_one_line(tmp_path, capsys, sp_model):
    (tmp_path / "docs.jsonl").write_text('{"text": "def f(x): return x"}\n')
    (tmp_path / "bad.model").write_bytes(b"not a model")
    tiny = os.path.join(ROOT, "configs", "tiny.yaml")
    cases = [(["--input", str(tmp_path / "docs.jsonl"), "--tokenizer", str(tmp_path / "bad.model")],
              "--tokenizer " + str(tmp_path / "bad.model") + ": not a SentencePiece model"),
             (["--input", str(tmp_path / "none.jsonl"), "--tokenizer", sp_model], "none.jsonl: no such file"),
             (["--config", tiny, f"data.tokenizer={sp_model}", "model.vocab_size=300"],
              f"data.tokenizer {sp_model} has 400 pieces but model.vocab_size is 300"),
             (["--config", tiny, "schedule.min_lr=1"], "schedule.min_lr (1) must be between 0")]
    for argv, message in cases:
        assert prepare_cli.main(argv + ["--output", str(tmp_path / "out"), "--workers", "1"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1] and "Traceback" not in "".join(err), err
