"""HF interop: tiny random transformers models give the same logits through jaxllm; exports are
complete chat models (tokenizer, chat template, generation config)."""

import dataclasses
import json
import os

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from jaxllm.models import ModelConfig, RopeScaling, forward, param_shapes  # noqa: E402
from jaxllm.models.hf import config_from_hf, config_to_hf, load_hf_checkpoint, save_hf_checkpoint  # noqa: E402

V = 128
BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
            initializer_range=0.1)  # larger than default so attention is far from uniform


def _randomize(model, seed):
    """HF inits norms to 1 and biases to 0, which would hide a mis-mapped norm or bias."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def hf_model(seed=0, qwen=False, **overrides):
    torch.manual_seed(seed)
    kw = BASE | overrides
    if qwen:
        return _randomize(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw)), seed)
    return _randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)), seed)


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def jax_logits(cfg, params, tokens, **kw):
    cfg = dataclasses.replace(cfg, attention="xla")
    return np.asarray(jax.jit(forward, static_argnums=0)(cfg, params, jnp.asarray(tokens), **kw))


def assert_close(got, want, tol=1e-4):
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err <= tol, f"relative max error {err:.2e} > {tol:.0e}"


def tokens(batch=2, length=16, seed=0):
    return np.random.default_rng(seed).integers(0, V, (batch, length))


def save(model, path, **kw):
    model.save_pretrained(path, safe_serialization=True, **kw)
    return path


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory):
    model = hf_model(num_key_value_heads=2)
    return model, save(model, tmp_path_factory.mktemp("gqa"))


@pytest.mark.parametrize("overrides", [
    dict(),  # MHA, untied
    dict(num_key_value_heads=2, tie_word_embeddings=True),  # GQA, tied
    dict(num_key_value_heads=1, head_dim=32),  # MQA with head_dim != hidden / heads
], ids=["mha", "gqa_tied", "mqa_head_dim"])
def test_llama_logits_match(tmp_path, overrides):
    model = hf_model(**overrides)
    cfg, params = load_hf_checkpoint(save(model, tmp_path))
    assert cfg.n_kv_heads == model.config.num_key_value_heads
    assert cfg.tie_embeddings == bool(overrides.get("tie_word_embeddings")) and ("lm_head" in params) != cfg.tie_embeddings
    x = tokens()
    assert_close(jax_logits(cfg, params, x), hf_logits(model, x))


def test_llama3_rope_scaling(tmp_path):
    rope = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=32)
    model = hf_model(num_key_value_heads=2, rope_theta=10000.0, rope_scaling=rope)
    cfg, params = load_hf_checkpoint(save(model, tmp_path))
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 32)
    x = tokens(batch=1, length=64)
    want = hf_logits(model, x)
    assert_close(jax_logits(cfg, params, x), want)
    # The scaling must matter at this length, or the check above proves nothing about it.
    unscaled = jax_logits(dataclasses.replace(cfg, rope_scaling=RopeScaling()), params, x)
    assert np.max(np.abs(unscaled - want)) / np.max(np.abs(want)) > 1e-2


def test_qwen2_qkv_bias(tmp_path):
    model = hf_model(qwen=True, num_key_value_heads=2, tie_word_embeddings=True)
    assert model.model.layers[0].self_attn.k_proj.bias.abs().sum() > 0
    cfg, params = load_hf_checkpoint(save(model, tmp_path))
    assert cfg.qkv_bias and cfg.tie_embeddings
    x = tokens()
    assert_close(jax_logits(cfg, params, x), hf_logits(model, x))


def test_sharded_checkpoint_loads_identically(gqa_dir, tmp_path):
    model, single = gqa_dir
    save(model, tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    cfg_a, a = load_hf_checkpoint(single)
    cfg_b, b = load_hf_checkpoint(tmp_path)
    assert cfg_a == cfg_b
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_packed_segments_match_separate_documents(gqa_dir):
    model, path = gqa_dir
    cfg, params = load_hf_checkpoint(path)
    doc_a, doc_b = tokens(1, 10, seed=1), tokens(1, 14, seed=2)
    packed = np.concatenate([doc_a, doc_b], axis=1)
    positions = np.concatenate([np.arange(10), np.arange(14)])[None]
    segments = np.array([[0] * 10 + [1] * 14])
    got = jax_logits(cfg, params, packed, positions=jnp.asarray(positions), segment_ids=jnp.asarray(segments))
    assert_close(got[:, :10], hf_logits(model, doc_a))
    assert_close(got[:, 10:], hf_logits(model, doc_b))


@pytest.mark.parametrize("qwen,max_shard_bytes", [(False, 30_000), (True, None)], ids=["llama_sharded", "qwen2"])
def test_hf_jaxllm_hf_round_trip(tmp_path, qwen, max_shard_bytes):
    model = hf_model(qwen=qwen, num_key_value_heads=2)
    cfg, params = load_hf_checkpoint(save(model, tmp_path / "src"))
    save_hf_checkpoint(cfg, params, tmp_path / "out", max_shard_bytes=max_shard_bytes)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists() == bool(max_shard_bytes)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded) is type(model)
    x = tokens()
    np.testing.assert_array_equal(hf_logits(reloaded, x), hf_logits(model, x))  # lossless fp32 copy


def test_jaxllm_init_to_hf(tmp_path):
    cfg = ModelConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=64,
                      tie_embeddings=True, init_std=0.1, dtype="float32",
                      rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 16))
    # Random params in the jaxllm layout (numpy: jax.random's per-shape compiles cost ~10 s on 2 cores),
    # norms away from 1 so a swapped norm would show.
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, shape: path[-1].key.endswith("norm") + 0.1 * rng.standard_normal(shape, np.float32),
        param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    assert config_from_hf(config_to_hf(cfg)) == cfg
    save_hf_checkpoint(cfg, params, tmp_path)
    save_hf_checkpoint(cfg, params, tmp_path, max_shard_bytes=30_000)  # over an existing dir: stale file goes
    assert not (tmp_path / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    x = tokens(length=32)
    assert_close(jax_logits(cfg, params, x), hf_logits(model, x))


def test_bf16_checkpoint(gqa_dir, tmp_path):
    model, path = gqa_dir
    _, p32 = load_hf_checkpoint(path)
    save(model.to(torch.bfloat16), tmp_path)
    model.float()  # the fixture model is shared
    cfg, p = load_hf_checkpoint(tmp_path, dtype="float32")
    assert cfg.dtype == "float32"
    cast = jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float32), p32)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b) or a.dtype == np.float32, p, cast)
    cfg16, p16 = load_hf_checkpoint(tmp_path, dtype="bfloat16")
    assert cfg16.dtype == "bfloat16" and p16["layers"]["wq"].dtype == ml_dtypes.bfloat16


def _rewrite(path, drop=(), add=None, config=None):
    tensors = load_file(path / "model.safetensors")
    for k in drop:
        del tensors[k]
    save_file(tensors | (add or {}), path / "model.safetensors", metadata={"format": "pt"})
    if config:
        hf = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(hf | config))


def test_bad_checkpoints(tmp_path):
    model = hf_model(num_hidden_layers=1)
    d = save(model, tmp_path / "missing")
    _rewrite(d, drop=["model.layers.0.mlp.up_proj.weight"])
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.0\.mlp\.up_proj\.weight"):
        load_hf_checkpoint(d)

    d = save(model, tmp_path / "extra")
    _rewrite(d, add={"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32),  # ignored
                     "model.extra.weight": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected tensors: model\.extra\.weight$"):
        load_hf_checkpoint(d)

    d = save(model, tmp_path / "obias")
    _rewrite(d, add={"model.layers.0.self_attn.o_proj.bias": np.ones(64, np.float32)})
    with pytest.raises(ValueError, match="o_proj.bias"):
        load_hf_checkpoint(d)

    d = save(model, tmp_path / "shape")
    _rewrite(d, config={"intermediate_size": 80})
    with pytest.raises(ValueError, match=r"gate_proj\.weight has shape \(96, 64\), expected \(80, 64\)"):
        load_hf_checkpoint(d)

    hf = config_to_hf(ModelConfig())
    with pytest.raises(ValueError, match="yarn"):
        config_from_hf(hf | {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="mlp_bias"):
        config_from_hf(hf | {"mlp_bias": True})
    assert config_from_hf(hf | {"model_type": "qwen2"}).qkv_bias
    assert config_from_hf(hf | {"attention_bias": True}).qkv_bias
    # transformers>=5 spelling: theta and scaling under rope_parameters
    modern = config_from_hf({k: v for k, v in hf.items() if k not in ("rope_theta", "rope_scaling")}
                            | {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert modern.rope_theta == 5e5 and modern.rope_scaling.type == "none"


@pytest.fixture(scope="module")
def exported_run(trained_run, tmp_path_factory):
    """The shared trained run -> HF directory -> params directory, through the CLI."""
    import subprocess
    import sys

    from conftest import ROOT

    base, env, run_dir = trained_run
    out = tmp_path_factory.mktemp("exported")
    hf_dir, back = out / "hf", out / "back"
    for args in (["jaxllm-to-hf", "--checkpoint", str(run_dir), "--out", str(hf_dir)],
                 ["hf-to-jaxllm", "--hf", str(hf_dir), "--out", str(back)]):
        proc = subprocess.run([sys.executable, "-m", "jaxllm.convert", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-1500:]
    return run_dir, hf_dir, back


def test_convert_cli_round_trips_a_trained_run(exported_run):
    """jaxllm run -> HF directory (transformers logits match) -> orbax params (bit-equal)."""
    from jaxllm.run import load_run

    run_dir, hf_dir, back = exported_run
    cfg, params = load_run(str(run_dir))
    model_cfg = dataclasses.replace(cfg.model, attention="xla")
    tokens = np.array([[1, 17, 250, 33, 4, 98, 7, 500]])
    ours = np.asarray(forward(model_cfg, params, jnp.asarray(tokens)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
    _, params_back = load_run(str(back))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params_back)


CHAT = [{"role": "system", "content": "You write Python."},
        {"role": "user", "content": "def heappush(heap, item):"},
        {"role": "assistant", "content": "    heap.append(item)\n    _siftdown(heap, 0, len(heap)-1)"},
        {"role": "user", "content": "ünïcode — ✓?"},
        {"role": "assistant", "content": ""}]


def test_export_is_a_complete_chat_model(exported_run):
    """The export of a run with the built-in SentencePiece tokenizer: AutoTokenizer encodes as the
    run did, apply_chat_template gives the ids it trained on (BOS from data.add_bos included), and
    transformers' greedy generation for a chat prompt is jaxllm's, token for token."""
    import sysconfig

    from jaxllm.data.chat import encode_conversation, load_template
    from jaxllm.data.preference_data import PromptCompletionEncoder
    from jaxllm.data.tokenizer import Tokenizer
    from jaxllm.generate import completions
    from jaxllm.run import load_run

    run_dir, hf_dir, back = exported_run
    cfg, params = load_run(str(run_dir))
    sp = Tokenizer(str(run_dir / "tokenizer.model"))
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    with open(os.path.join(sysconfig.get_paths()["stdlib"], "heapq.py")) as f:
        text = f.read()
    assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
    assert tok(text)["input_ids"] == [sp.bos_id] + sp.encode(text)  # data.add_bos
    assert tok.decode(sp.encode(text)) == text

    ids, _ = encode_conversation(CHAT, sp, cfg.sft.template, add_bos=cfg.data.add_bos)
    assert tok.apply_chat_template(CHAT, tokenize=False) == "<s>" + load_template("chatml").render(CHAT)
    assert list(tok.apply_chat_template(CHAT, return_dict=True)["input_ids"]) == list(ids)
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    assert generation == {"bos_token_id": sp.bos_id, "eos_token_id": sp.eos_id, "pad_token_id": sp.pad_id}

    prompt = CHAT[:2]
    ours_prompt = PromptCompletionEncoder(sp, cfg.sft.template, seq_len=64, add_bos=True).encode(prompt, "x")[0]
    hf_prompt = list(tok.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"])
    assert hf_prompt == list(ours_prompt)
    ours = completions(cfg, params, [hf_prompt], max_new_tokens=12, temperature=0.0, stop_tokens=(sp.eos_id,),
                       pad_id=sp.pad_id)[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([hf_prompt]), max_new_tokens=12, do_sample=False)[0, len(hf_prompt):]
    theirs = [t for t in out.tolist() if t != sp.eos_id]
    assert len(ours) >= 8 and ours == theirs[:len(ours)] and len(theirs) == len(ours)
    # hf-to-jaxllm keeps the tokenizer beside the params.
    from jaxllm.data.hf_tokenizer import HFTokenizer

    kept = HFTokenizer(str(back))
    assert kept.encode(text) == sp.encode(text) and (kept.bos_id, kept.eos_id) == (sp.bos_id, sp.eos_id)


def test_export_of_a_hf_tokenizer_run(tmp_path, capsys):
    """A run with a Metaspace "always" tokenizer.json (transformers adds "▁" after its special
    tokens): the export's tokenizer chats with the ids jaxllm trained on, the template is the run's
    (not the tokenizer's), and the turn end <|im_end|> stops generation."""
    from jaxllm import convert
    from jaxllm.data.chat import encode_conversation, load_template
    from jaxllm.data.hf_tokenizer import HFTokenizer
    from jaxllm.data.tokenizer import keep_tokenizer
    from jaxllm.run import save_params
    from tests.test_chat_fidelity import CONVS, _folder, _train

    raw = _train("metaspace-always-unigram")
    src = _folder(tmp_path / "tok", raw.to_str(), load_template("tulu").source)
    cfg = ModelConfig(vocab_size=raw.get_vocab_size(), d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=64,
                      dtype="float32")
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: 0.1 * rng.standard_normal(s).astype(np.float32), param_shapes(cfg),
                          is_leaf=lambda x: isinstance(x, tuple))
    run = tmp_path / "run"
    save_params(cfg, params, str(run))
    keep_tokenizer(HFTokenizer(str(src)), str(run))  # with its tokenizer_config.json
    ours = HFTokenizer(str(run))
    assert (ours.bos_token, ours.eos_token, ours.chat_template) == ("<s>", "</s>", load_template("tulu").source)

    assert convert.main(["jaxllm-to-hf", "--checkpoint", str(run), "--out", str(tmp_path / "hf")]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    original = transformers.AutoTokenizer.from_pretrained(str(src))
    for conv in CONVS:
        ids, _ = encode_conversation(conv, ours, "chatml", add_bos=True)  # the run's sft.template
        assert tok.apply_chat_template(conv, tokenize=False) == "<s>" + load_template("chatml").render(conv)
        assert list(tok.apply_chat_template(conv, return_dict=True)["input_ids"]) == list(ids)
        unfixed = original.apply_chat_template(conv, chat_template=tok.chat_template, return_dict=True)
        assert list(unfixed["input_ids"]) != list(ids)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [ours.eos_id, ours.token_to_id("<|im_end|>")]
    # A template that cannot be read is a one-line error.
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("template: chatml",
                                                                                "template: nonesuch"))
    assert convert.main(["jaxllm-to-hf", "--checkpoint", str(run), "--out", str(tmp_path / "hf2")]) == 2
    assert "sft.template: nonesuch: not a built-in" in capsys.readouterr().err
