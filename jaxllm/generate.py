"""Batched autoregressive sampling with a KV cache, and `python -m jaxllm.generate`.

`generate` left-pads the prompts into one [B, P] array, runs one prefill over it and then a
`lax.while_loop` of single-token decode steps that stops once every row has emitted a stop token.
Both live in one jitted function keyed on (model config, B, P, max_new_tokens, greedy, top_k,
top_p enabled); temperature, top_p, stop tokens and the rng are traced, so changing them does not
recompile, and P is rounded up to a multiple of `_PAD_MULTIPLE` so prompts of similar length
share a compilation.

Returned completions hold the new tokens only and EXCLUDE the stop token that ended them.

    python -m jaxllm.generate --checkpoint runs/default --prompt "def " --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.models.llama import ModelConfig, forward_cached, init_kv_cache

_PAD_MULTIPLE = 16


# ----------------------------------------------------------------------------- sampling filters


def top_k_filter(logits, k: int):
    """Sets all but the k largest logits (per row, last axis) to -inf; k <= 0 disables.

    Ties with the k-th largest value are all kept, so more than k tokens can survive.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, -jnp.inf)


def top_p_filter(logits, p):
    """Nucleus filter: keeps the smallest set of top tokens whose probability mass is >= p.

    The top token is always kept (so p <= 0 means greedy-like); p >= 1 keeps everything. Equal
    logits are ranked by token index (lower first), so the kept set is exactly the smallest one.
    `p` may be a traced scalar.
    """
    V = logits.shape[-1]
    order = jnp.argsort(-logits, axis=-1, stable=True)  # descending, lower index first on ties
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    # Mass strictly before each token: shifting (not cum - probs) keeps exact sums exact.
    before = jnp.concatenate([jnp.zeros_like(cum[..., :1]), cum[..., :-1]], axis=-1)
    keep_sorted = (before < p) | (jnp.arange(V) == 0)
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
    # Rounding can push the running sum past 1 before the last tokens; p >= 1 must keep all.
    return jnp.where((p >= 1.0) | keep, logits, -jnp.inf)


def sample_logits(logits, key, *, temperature, top_k: int = 0, top_p=1.0, use_top_p: bool = True):
    """Samples token ids [...] from logits [..., V]: temperature, then top-k, then top-p.

    `temperature` must be > 0 (greedy decoding is an argmax, see `generate`). `use_top_p=False`
    skips the sort that top-p needs when the caller knows top_p >= 1.
    """
    logits = logits.astype(jnp.float32) / temperature
    logits = top_k_filter(logits, top_k)
    if use_top_p:
        logits = top_p_filter(logits, top_p)
    return jax.random.categorical(key, logits, axis=-1)


# ----------------------------------------------------------------------------- batched generation


@functools.partial(jax.jit,
                   static_argnames=("cfg", "max_new_tokens", "greedy", "top_k", "use_top_p"))
def _generate_jit(cfg: ModelConfig, params, tokens_BP, lengths_B, rng, temperature, top_p,
                  stop_ids, pad_id, *, max_new_tokens: int, greedy: bool, top_k: int,
                  use_top_p: bool):
    B, P = tokens_BP.shape
    N = max_new_tokens
    S = P + N
    # Slot j of row b holds a real token iff j >= P - len_b (prompt) or j >= P (generated).
    kv_valid = jnp.arange(S)[None, :] >= (P - lengths_B)[:, None]
    positions = jnp.maximum(jnp.arange(P)[None, :] - (P - lengths_B)[:, None], 0)

    cache = init_kv_cache(cfg, B, S)
    logits, cache = forward_cached(cfg, params, tokens_BP, positions, cache, 0, kv_valid)
    # The last slot is real in every row (left padding), so its logits predict new token 0.
    logits = logits[:, -1]
    # All keys split up front: one threefry op in the program, which compiles slowly on CPU.
    keys = None if greedy else jax.random.split(rng, N)

    def cond(state):
        i, _, _, done, _ = state
        return (i < N) & ~jnp.all(done)

    def body(state):
        # Picks new token i from the carried logits, then runs it (cache slot P+i, position
        # len+i) for the next logits. Sampling in one place keeps the compiled program small;
        # the price is one unused model step after the last token.
        i, logits, cache, done, out = state
        if greedy:
            tok = jnp.argmax(logits, axis=-1)
        else:
            tok = sample_logits(logits, keys[i], temperature=temperature, top_k=top_k,
                                top_p=top_p, use_top_p=use_top_p)
        tok = jnp.where(done, pad_id, tok.astype(jnp.int32))
        out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], i, axis=1)
        logits, cache = forward_cached(cfg, params, tok[:, None], (lengths_B + i)[:, None], cache,
                                       P + i, kv_valid)
        return i + 1, logits[:, 0], cache, done | jnp.isin(tok, stop_ids), out

    out = jnp.full((B, N), pad_id, jnp.int32)
    state = (jnp.int32(0), logits, cache, jnp.zeros((B,), bool), out)
    return jax.lax.while_loop(cond, body, state)[4]


def generate(cfg, params, prompts: list[list[int]], *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, stop_tokens=(),
             rng=None, pad_id: int = 0) -> list[list[int]]:
    """New tokens for each prompt, cut before the first stop token (the stop token is excluded).

    `cfg` is a ModelConfig (or a full Config, whose `.model` is used). temperature == 0 decodes
    greedily. `rng` is a jax key or an int seed (default 0). Prompts must be non-empty.
    """
    cfg = getattr(cfg, "model", cfg)
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token (e.g. BOS)")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    if rng is None or isinstance(rng, int):
        rng = jax.random.key(rng or 0)

    stop_tokens = [int(s) for s in stop_tokens]
    lengths = np.array([len(p) for p in prompts], np.int32)
    P = -(-int(lengths.max()) // _PAD_MULTIPLE) * _PAD_MULTIPLE
    tokens = np.full((len(prompts), P), pad_id, np.int32)
    for row, p in zip(tokens, prompts):
        row[P - len(p):] = p
    # -1 pads the stop list to a multiple of 4 entries so its length rarely forces a recompile.
    n_stop = max(4, -(-len(stop_tokens) // 4) * 4)
    stop_ids = list(stop_tokens) + [-1] * (n_stop - len(stop_tokens))
    greedy = temperature == 0
    use_top_p = not greedy and top_p < 1.0
    out = _generate_jit(
        cfg, params, jnp.asarray(tokens), jnp.asarray(lengths), rng,
        jnp.float32(temperature if not greedy else 1.0), jnp.float32(top_p),
        jnp.asarray(stop_ids, jnp.int32), jnp.int32(pad_id),
        max_new_tokens=int(max_new_tokens), greedy=greedy, top_k=0 if greedy else int(top_k),
        use_top_p=use_top_p)
    out = np.asarray(jax.device_get(out))

    stops = set(stop_tokens)
    results = []
    for row in out.tolist():
        cut = next((j for j, t in enumerate(row) if t in stops), len(row))
        results.append(row[:cut])
    return results


# ----------------------------------------------------------------------------- text helpers and CLI


def _encode_prompt(cfg, tokenizer, prompt: str) -> list[int]:
    ids = list(tokenizer.encode(prompt))
    if cfg.data.add_bos and tokenizer.bos_id is not None and tokenizer.bos_id >= 0:
        ids = [tokenizer.bos_id] + ids
    return ids


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    eos = tokenizer.eos_id
    return (eos,) if eos is not None and eos >= 0 else ()


def _pad_id(cfg, tokenizer) -> int:
    pad = getattr(tokenizer, "pad_id", 0)
    return pad if pad is not None and 0 <= pad < cfg.model.vocab_size else 0  # SentencePiece: -1


def _completion_text(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    # Decoding the continuation alone can lose a leading space (SentencePiece's "▁"), so decode
    # prompt + continuation and drop the decoded prompt when it is a prefix.
    bos = tokenizer.bos_id
    body = [t for t in prompt_ids if t != bos]
    head = tokenizer.decode(body)
    full = tokenizer.decode(body + new_ids)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(new_ids)


def sample_text(cfg, params, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.8,
                seed: int = 0) -> str:
    """The completion (without the prompt) of one text prompt; `cfg` is the full run Config."""
    prompt_ids = _encode_prompt(cfg, tokenizer, prompt)
    if not prompt_ids:
        raise ValueError("sample_text: empty prompt and data.add_bos is false")
    [new] = generate(cfg.model, params, [prompt_ids], max_new_tokens=max_new_tokens,
                     temperature=temperature, stop_tokens=stop_token_ids(tokenizer),
                     rng=jax.random.key(seed), pad_id=_pad_id(cfg, tokenizer))
    return _completion_text(tokenizer, prompt_ids, new)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.generate",
                                     description="Sample text from a trained jaxllm run.")
    parser.add_argument("--checkpoint", required=True, help="a run directory (trainer.run_dir)")
    parser.add_argument("--prompt", action="append", required=True, help="repeatable")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (temperature 0)")
    args = parser.parse_args(argv)

    try:
        if args.max_new_tokens < 0 or args.temperature < 0 or args.top_k < 0:
            raise ValueError("--max-new-tokens, --temperature and --top-k must be >= 0")
        from jaxllm.checkpoint import load_run
        from jaxllm.data.tokenizer import run_tokenizer

        cfg, params = load_run(args.checkpoint)
        tokenizer = run_tokenizer(cfg, args.checkpoint)
        prompt_ids = [_encode_prompt(cfg, tokenizer, p) for p in args.prompt]
        if any(not ids for ids in prompt_ids):
            raise ValueError("empty prompt with data.add_bos false: nothing to condition on")
        outs = generate(cfg.model, params, prompt_ids, max_new_tokens=args.max_new_tokens,
                        temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k,
                        top_p=args.top_p, stop_tokens=stop_token_ids(tokenizer),
                        rng=jax.random.key(args.seed), pad_id=_pad_id(cfg, tokenizer))
    except Exception as e:  # one line, no traceback: these are user-facing errors
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"error: {type(e).__name__}: {msg}", file=sys.stderr)
        return 1
    for prompt, ids, new in zip(args.prompt, prompt_ids, outs):
        print(f"{prompt}{_completion_text(tokenizer, ids, new)}")
        print("-" * 40, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
