"""PEFT adapters both ways: jaxllm LoRA / DoRA adapters load in `peft.PeftModel` with the same
logits, PEFT adapter folders read into jaxllm (runs, `model.init_from`), and the CLI."""

import dataclasses
import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from jaxllm import convert  # noqa: E402
from jaxllm.models import forward  # noqa: E402
from jaxllm.models.hf import load_hf_checkpoint, read_model_config  # noqa: E402
from jaxllm.models.lora import LoraConfig, apply_adapters  # noqa: E402
from jaxllm.models.peft import (PeftFormatError, adapter_shapes, load_peft_adapter, load_peft_model,  # noqa: E402
                                save_peft_adapter)

ALL = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "lm_head")
TOKENS = np.random.default_rng(0).integers(0, 128, (2, 12))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random Llama (GQA, untied) saved by transformers, with its jaxllm params."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                   initializer_range=0.1, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("base")
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(path))
    model_cfg, params = load_hf_checkpoint(path)
    return path, model_cfg, params


def _peft_logits(base_path, adapter_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM.from_pretrained(str(base_path)).eval()
        model = peft.PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


_forward = jax.jit(forward, static_argnums=0)  # one compile per model config


def _logits(model_cfg, params):
    return np.asarray(_forward(dataclasses.replace(model_cfg, attention="xla"), params, jnp.asarray(TOKENS)))


def _random_adapters(lc, model_cfg, seed=1):
    """NumPy adapters of the right shapes (no eager jax.random compiles), far from the identity
    init (b = 0, m = the base's column norms)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: (path[-1].key == "m") + 0.3 * rng.standard_normal(s.shape).astype(np.float32),
        adapter_shapes(lc, model_cfg))


def _close(ours, theirs):
    assert np.max(np.abs(ours - theirs)) <= 1e-4 * np.max(np.abs(theirs))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_jaxllm_adapters_load_in_peft(base, tmp_path, dora):
    path, model_cfg, params = base
    lc = LoraConfig(rank=4, alpha=8.0, targets=ALL, dora=dora)
    adapters = _random_adapters(lc, model_cfg)
    ours = _logits(model_cfg, apply_adapters(lc, params, adapters))
    save_peft_adapter(lc, adapters, str(tmp_path), base_model=str(path))
    theirs = _peft_logits(path, tmp_path)
    _close(ours, theirs)
    with torch.no_grad():  # the adapters matter
        plain = transformers.LlamaForCausalLM.from_pretrained(str(path)).eval()(torch.tensor(TOKENS)).logits.numpy()
    assert np.max(np.abs(theirs - plain)) > 0.1
    back_cfg, back = load_peft_adapter(str(tmp_path), model_cfg)  # and back, exactly
    assert back_cfg == lc
    jax.tree.map(np.testing.assert_array_equal, back, adapters)


def test_peft_adapter_to_jaxllm_and_back(base, tmp_path):
    """An adapter PEFT made (rsLoRA, DoRA, some targets) -> jaxllm params directory: load_run /
    model.init_from give PEFT's logits, lora-to-peft writes PEFT's tensors back."""
    from jaxllm.run import load_init_params

    path, model_cfg, _ = base
    torch.manual_seed(1)
    pc = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"],
                         use_rslora=True, use_dora=True, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(str(path)), pc)
        with torch.no_grad():  # magnitudes away from the base norms too
            for name, p in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.1 * torch.randn(p.shape))
        model.save_pretrained(str(tmp_path / "peft"))
    want = _peft_logits(path, tmp_path / "peft")

    lora_cfg, _ = load_peft_adapter(str(tmp_path / "peft"), model_cfg)
    assert lora_cfg.targets == ("wq", "wv", "w_down", "lm_head") and lora_cfg.dora
    assert lora_cfg.alpha == pytest.approx(8 * 2.0)  # rsLoRA's alpha / sqrt(r) as jaxllm's alpha / r
    _close(_logits(*load_peft_model(str(tmp_path / "peft"), base=str(path))), want)

    out = tmp_path / "jaxllm"
    assert convert.main(["peft-to-jaxllm", "--peft", str(tmp_path / "peft"), "--base", str(path),
                         "--out", str(out)]) == 0
    # load_run folds the adapters into the base: what model.init_from starts from.
    _close(_logits(model_cfg, load_init_params(model_cfg, str(out))), want)
    assert convert.main(["lora-to-peft", "--checkpoint", str(out), "--out", str(tmp_path / "again")]) == 0
    theirs = {k: v for k, v in load_file(tmp_path / "peft" / "adapter_model.safetensors").items()
              if not k.endswith("base_layer.weight")}
    mine = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert mine.keys() == theirs.keys()
    for k in theirs:
        np.testing.assert_array_equal(mine[k], theirs[k])


def test_lora_to_peft_from_a_run_checkpoint(base, tmp_path):
    """A DoRA run over a Hugging Face base (model.init_from), checkpointed as training does ->
    PEFT folder: PeftModel on the base gives the run's logits."""
    from jaxllm.checkpoint import Checkpointer
    from jaxllm.config import dump_yaml
    from jaxllm.parallel.mesh import make_mesh
    from jaxllm.train import Trainer
    from tests.test_train import _cfg

    path, model_cfg, params = base
    run = tmp_path / "run"
    cfg = _cfg(run_dir=str(run))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(model_cfg, init_from=str(path)),
                              lora=LoraConfig(rank=4, alpha=8.0, targets=("wq", "wv", "w_up"), dora=True))
    tr = Trainer(cfg, make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    state = tr.fresh_state(tr.layout.place(params))  # the init_from params (no objective extras)
    adapters = _random_adapters(cfg.lora, model_cfg)  # as training would have moved them
    state = state.replace(params={"adapters": jax.tree.map(jnp.asarray, adapters)})
    run.mkdir()
    dump_yaml(cfg, str(run / "config.yaml"))
    ckpt = Checkpointer(str(run), async_save=False)
    ckpt.save(3, state, {})
    ckpt.close()

    out = tmp_path / "peft"
    assert convert.main(["lora-to-peft", "--checkpoint", str(run), "--out", str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["use_dora"], config["base_model_name_or_path"]) == (4, True, str(path))
    assert sorted(config["target_modules"]) == ["q_proj", "up_proj", "v_proj"]
    ours = _logits(model_cfg, jax.device_get(tr.effective(state.params, state.frozen)))
    _close(ours, _peft_logits(path, out))


def test_bad_adapters_are_one_line_errors(base, tmp_path, capsys):
    path, model_cfg, params = base
    lc = LoraConfig(rank=2, targets=("wq",))
    save_peft_adapter(lc, _random_adapters(lc, model_cfg), str(tmp_path), base_model=str(path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for change, message in [({"target_modules": ["embed_tokens"]}, "no jaxllm equivalent"),
                            ({"target_modules": ".*proj"}, "list of module names"),
                            ({"bias": "all"}, "bias 'all'"), ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
                            ({"peft_type": "IA3"}, "peft_type 'IA3'"), ({"r": 3}, "the model needs")]:
        (tmp_path / "adapter_config.json").write_text(json.dumps(config | change))
        with pytest.raises(PeftFormatError, match=message):
            load_peft_adapter(str(tmp_path), model_cfg)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"target_modules": ["q_proj", "k_proj"]}))
    with pytest.raises(PeftFormatError, match=r"missing tensors: .*layers\.0\.self_attn\.k_proj\.lora_A"):
        load_peft_adapter(str(tmp_path), model_cfg)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "org/model"}))
    assert convert.main(["peft-to-jaxllm", "--peft", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "not a local Hugging Face folder" in capsys.readouterr().err
