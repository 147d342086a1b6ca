"""`python -m jaxllm.generate`, and text helpers over `jaxllm.models.decode`.

    python -m jaxllm.generate --checkpoint runs/default --prompt "def " --max-new-tokens 64
    python -m jaxllm.generate --checkpoint runs/sft --prompts P.jsonl --n 4 --out completions.jsonl

The second form samples `--n` replies to each chat prompt of P.jsonl (records with `messages`
ending with the user's turn, or a `prompt` string), rendered with the run's chat template, and
writes each record with `completions` added: on-policy data that `python -m jaxllm.score --pairs`
turns into best / worst preference pairs for `task: dpo` (as Tülu 3 builds its DPO data).

`completions` turns token lists into new-token lists and `sample_text` a text prompt into its
completion; both run `decode.generate` (batched, KV-cached, one compilation per prompt-length
bucket) on the params where they are, sharded or not. Completions EXCLUDE the stop token that
ended them.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax

from jaxllm.errors import UserError, run_cli
from jaxllm.kernels.attention import check_available
from jaxllm.models import decode


def completions(cfg, params, prompts: list[list[int]], *, max_new_tokens: int,
                temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, stop_tokens=(),
                rng=0, pad_id: int = 0, mesh=None) -> list[list[int]]:
    """New tokens for each prompt, cut before the first stop token (the stop token is excluded).

    `cfg` is a ModelConfig (or a full Config, whose `.model` is used); temperature 0 decodes
    greedily; `rng` is a jax key or an int seed. With params sharded on a multi-process mesh,
    every process calls this and gets the result.
    """
    if not prompts:
        return []
    tokens, lengths = decode.pad_prompts(prompts, pad_id)
    gen = decode.generate(getattr(cfg, "model", cfg), params, tokens, lengths,
                          max_new_tokens=max_new_tokens, rng=rng, temperature=temperature,
                          top_k=top_k, top_p=top_p, stop_ids=tuple(stop_tokens), pad_id=pad_id,
                          mesh=mesh)
    out, lengths = decode.host_values((gen.tokens, gen.lengths))
    stops = set(int(s) for s in stop_tokens)
    rows = [row[:n] for row, n in zip(out.tolist(), lengths.tolist())]
    return [row[:-1] if row and row[-1] in stops else row for row in rows]


# ----------------------------------------------------------------------------- text helpers and CLI

# Turn-end markers of the built-in templates: a reply is cut at the first one, as at the EOS.
END_MARKERS = ("<|im_end|>", "<|eot_id|>", "</s>", "<|endoftext|>")


def reply_text(tokenizer, new_ids: list[int]) -> str:
    """A chat reply's text: the new tokens decoded, cut at the first turn-end marker."""
    text = tokenizer.decode(new_ids)
    for marker in END_MARKERS:
        text = text.split(marker)[0]
    return text


def chat_replies(cfg, params, tokenizer, prompts: list[list[dict]], *, n: int = 1, max_new_tokens: int,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 batch_size: int = 64, mesh=None) -> list[list[str]]:
    """`n` replies to each chat prompt (message lists), rendered with the run's template as in
    training (`sft.template`, BOS per data.add_bos); temperature 0 decodes greedily."""
    from jaxllm.data.hf_export import stop_tokens
    from jaxllm.data.preference_data import PromptCompletionEncoder

    encoder = PromptCompletionEncoder(tokenizer, cfg.sft.template, seq_len=cfg.data.seq_len, add_bos=cfg.data.add_bos)
    stops = stop_tokens(tokenizer, encoder.template)[0]  # EOS, and a one-token turn end (<|im_end|>)
    # The generation prompt is everything before the reply: encode with a placeholder reply.
    ids = [encoder.encode(p, "x")[0].tolist() for p in prompts for _ in range(n)]
    out = []
    for start in range(0, len(ids), batch_size):
        news = completions(cfg.model, params, ids[start:start + batch_size], max_new_tokens=max_new_tokens,
                           temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stops,
                           rng=jax.random.fold_in(jax.random.key(seed), start), pad_id=pad_token_id(cfg, tokenizer),
                           mesh=mesh)
        out += [reply_text(tokenizer, new) for new in news]
    return [out[i * n:(i + 1) * n] for i in range(len(prompts))]


def encode_prompt(cfg, tokenizer, prompt: str) -> list[int]:
    ids = list(tokenizer.encode(prompt))
    if cfg.data.add_bos and tokenizer.bos_id is not None and tokenizer.bos_id >= 0:
        ids = [tokenizer.bos_id] + ids
    return ids


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    eos = tokenizer.eos_id
    return (eos,) if eos is not None and eos >= 0 else ()


def pad_token_id(cfg, tokenizer) -> int:
    pad = getattr(tokenizer, "pad_id", 0)
    return pad if pad is not None and 0 <= pad < cfg.model.vocab_size else 0  # SentencePiece: -1


def completion_text(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    # Decoding the continuation alone can lose a leading space (SentencePiece's "▁"), so decode
    # prompt + continuation and drop the decoded prompt when it is a prefix.
    bos = tokenizer.bos_id
    body = [t for t in prompt_ids if t != bos]
    head = tokenizer.decode(body)
    full = tokenizer.decode(body + new_ids)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(new_ids)


def sample_text(cfg, params, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.8,
                seed: int = 0, mesh=None) -> str:
    """The completion (without the prompt) of one text prompt; `cfg` is the full run Config.

    Params may be sharded device arrays on a (multi-process) mesh: every process calls this, the
    params stay where they are, and every process gets the text.
    """
    prompt_ids = encode_prompt(cfg, tokenizer, prompt)
    if not prompt_ids:
        raise ValueError("sample_text: empty prompt and data.add_bos is false")
    [new] = completions(cfg.model, params, [prompt_ids], max_new_tokens=max_new_tokens,
                        temperature=temperature, stop_tokens=stop_token_ids(tokenizer), rng=seed,
                        pad_id=pad_token_id(cfg, tokenizer), mesh=mesh)
    return completion_text(tokenizer, prompt_ids, new)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.generate",
                                     description="Sample text from a trained jaxllm run.")
    parser.add_argument("--checkpoint", required=True, help="a run directory (trainer.run_dir)")
    parser.add_argument("--prompt", action="append", help="a text prompt (repeatable)")
    parser.add_argument("--prompts", help="jsonl of chat prompts (messages or prompt) to sample --n replies to")
    parser.add_argument("--n", type=int, default=1, help="replies per --prompts record")
    parser.add_argument("--out", help="with --prompts: the jsonl to write (records with completions)")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per decode batch")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (temperature 0)")
    parser.add_argument("--attention", help="decode with this model.attention instead of the run's "
                        "(e.g. xla on a machine without the GPU the run used cudnn on)")
    args = parser.parse_args(argv)
    if bool(args.prompt) == bool(args.prompts) or bool(args.prompts) != bool(args.out):
        parser.error("give --prompt (repeatable), or --prompts with --out")
    if args.prompts:
        return run_cli(lambda: _write_completions(args))
    try:
        tokenizer, prompt_ids, outs = _run(args)
    except (UserError, FileNotFoundError) as e:  # expected: one line; anything else is a bug
        print(f"error: {e}", file=sys.stderr)
        return 2
    for prompt, ids, new in zip(args.prompt, prompt_ids, outs):
        print(f"{prompt}{completion_text(tokenizer, ids, new)}")
        print("-" * 40, flush=True)
    return 0


def _load(args):
    """(cfg, params, tokenizer) of --checkpoint, checked against the flags and this machine."""
    if args.max_new_tokens < 0 or args.temperature < 0 or args.top_k < 0 or args.n < 1 or args.batch_size < 1:
        raise UserError("--max-new-tokens, --temperature and --top-k must be >= 0, --n and --batch-size >= 1")
    from jaxllm.data.tokenizer import run_tokenizer
    from jaxllm.run import load_run

    cfg, params = load_run(args.checkpoint)
    if args.attention:
        try:
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention=args.attention))
        except ValueError as e:
            raise UserError(f"--attention: {e}") from None
    try:
        check_available(cfg.model.attention, jax.devices()[0].platform)
    except ValueError as e:
        raise UserError(f"{e} (--attention overrides the run's choice)") from None
    return cfg, params, run_tokenizer(cfg, args.checkpoint)


def _write_completions(args) -> None:
    """--prompts mode: every record with `completions` (n replies) added, to --out."""
    import json

    from jaxllm.data.synthetic import read_jsonl, record_prompt

    cfg, params, tokenizer = _load(args)
    try:
        records = read_jsonl(args.prompts)
        prompts = [record_prompt(r) if "messages" not in r or r["messages"][-1]["role"] == "assistant"
                   else list(r["messages"]) for r in records]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--prompts {args.prompts}: {e}") from None
    replies = chat_replies(cfg, params, tokenizer, prompts, n=args.n, max_new_tokens=args.max_new_tokens,
                           temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k, top_p=args.top_p,
                           seed=args.seed, batch_size=args.batch_size)
    with open(args.out, "w", encoding="utf-8") as f:
        for record, texts in zip(records, replies):
            f.write(json.dumps({**record, "completions": texts}, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}: {len(records)} prompts x {args.n} completions", file=sys.stderr)


def _run(args):
    """(tokenizer, prompt ids, completion ids) of the --prompt flags."""
    cfg, params, tokenizer = _load(args)
    prompt_ids = [encode_prompt(cfg, tokenizer, p) for p in args.prompt]
    if any(not ids for ids in prompt_ids):
        raise UserError("empty prompt with data.add_bos false: nothing to condition on")
    outs = completions(cfg.model, params, prompt_ids, max_new_tokens=args.max_new_tokens,
                       temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k,
                       top_p=args.top_p, stop_tokens=stop_token_ids(tokenizer), rng=args.seed,
                       pad_id=pad_token_id(cfg, tokenizer))
    return tokenizer, prompt_ids, outs


if __name__ == "__main__":
    sys.exit(main())
