"""Knights-and-Knaves logic puzzles (Logic-RL, Xie et al. 2025) and their verifier.

    python -m jaxllm.rl.knights_knaves --out DIR --n-train 1000 --n-eval 100 --people 3 \
        [--people-max 7] [--seed 0]

writes DIR/kk_train.jsonl and DIR/kk_eval.jsonl in the Tülu 3 RLVR record format:
{"messages": [{"role": "user", "content": puzzle + answer-format instruction}],
 "ground_truth": "(1) Alice is a knight\\n(2) Bob is a knave", "dataset": "knights_knaves"}.

Knights always tell the truth and knaves always lie, so person i's statement S_i holds exactly
when i is a knight; a puzzle is kept only when one assignment of roles satisfies all of them
(brute force over the 2^N assignments, as bit masks). Statements follow the K&K dataset behind
Logic-RL (mem-kk-logic `lib_kk.py`: depth 2, width 2): "X is a knight/knave", not, and, or,
if-then, if-and-only-if; plus "exactly one of" and "all of" over 2-3 people. The wording follows
the dataset's ("A very special island is inhabited only by knights and knaves. ...").
Each puzzle has 2-8 people drawn uniformly from [--people, --people-max]; the eval puzzles are
drawn first and no train puzzle repeats an eval (or train) puzzle's statements, whatever the
names; the same arguments give the same files.

The verifier reads the last <answer>...</answer> of a response, else what follows its last
"CONCLUSION:", and is True only if every person's role is stated once and is right. As Logic-RL's
`kk.py`, it also wants exactly one knight/knave word per person there, so hedged answers fail.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import sys
from collections.abc import Sequence

from jaxllm.errors import UserError, run_cli

DATASET = "knights_knaves"
MIN_PEOPLE, MAX_PEOPLE = 2, 8
NAMES = ("Emma", "Liam", "Olivia", "Noah", "Ava", "Ethan", "Sophia", "Mason", "Isabella", "William",
         "Mia", "James", "Charlotte", "Benjamin", "Amelia", "Lucas", "Harper", "Henry", "Evelyn", "Alexander",
         "Abigail", "Michael", "Emily", "Daniel", "Elizabeth", "Jacob", "Sofia", "Logan", "Avery", "Jackson",
         "Ella", "Sebastian", "Scarlett", "Jack", "Grace", "Aiden", "Chloe", "Owen", "Victoria", "Samuel",
         "Riley", "Matthew", "Aria", "Joseph", "Lily", "Luke", "Aurora", "David", "Zoey", "Oliver")
# {Content} is the statement starting with a capital (a quotation), {content} as reported speech.
TEMPLATES = ('{name} said that {content}.', '{name} told you that {content}.', '{name} said, "{Content}."',
             '{name} stated, "{Content}".', 'According to {name}, "{Content}".', '"{Content}," {name} declared.',
             '{name} remarked, "{Content}".', 'In {name}\'s words: "{Content}".', '{name} noted, "{Content}".',
             '"{Content}," {name} claimed.', '{name} was heard saying, "{Content}".', 'As {name} put it, "{Content}".')
INTRO = ("A very special island is inhabited only by knights and knaves. Knights always tell the truth, "
         "and knaves always lie. ")
QUESTION = "So who is a knight and who is a knave?"
INSTRUCTION = ("Think it through step by step, then give your final answer inside <answer> </answer> tags, "
               "one line per inhabitant in the order they were introduced, for example:\n"
               "<answer>\n(1) Zoey is a knight\n(2) Oliver is a knave\n</answer>")
# Statement kinds and their sampling weights: the dataset's six forms most of the time.
KINDS = {"leaf": 2, "not": 2, "and": 2, "or": 2, "->": 2, "<=>": 2, "exactly_one": 1, "all": 1}

# A statement is a tuple: ("knight", i), ("knave", i), ("not", leaf), ("and" | "or", leaf, leaf),
# ("->" | "<=>", leaf, leaf), ("exactly_one" | "all", "knight" | "knave", (i, j, ...)).
Statement = tuple


def evaluate(statement: Statement, knights: Sequence[bool]) -> bool:
    """Truth of `statement` when person i is a knight iff knights[i]."""
    op = statement[0]
    if op in ("knight", "knave"):
        return knights[statement[1]] == (op == "knight")
    if op in ("exactly_one", "all"):
        hits = [knights[i] == (statement[1] == "knight") for i in statement[2]]
        return sum(hits) == 1 if op == "exactly_one" else all(hits)
    values = [evaluate(s, knights) for s in statement[1:]]
    if op == "not":
        return not values[0]
    if op == "and":
        return all(values)
    if op == "or":
        return any(values)
    if op == "->":
        return not values[0] or values[1]
    if op == "<=>":
        return values[0] == values[1]
    raise ValueError(f"unknown statement {statement!r}")


def _truth_mask(statement: Statement, knight_masks: list[int], full: int) -> int:
    """Bit a set iff `statement` holds under assignment a (bit i of a: person i is a knight)."""
    op = statement[0]
    if op in ("knight", "knave"):
        mask = knight_masks[statement[1]]
        return mask if op == "knight" else full ^ mask
    if op in ("exactly_one", "all"):
        leaves = [_truth_mask((statement[1], i), knight_masks, full) for i in statement[2]]
        if op == "all":
            return _fold_and(leaves, full)
        return _fold_or([m & _fold_and([full ^ o for j, o in enumerate(leaves) if j != i], full)
                         for i, m in enumerate(leaves)])
    masks = [_truth_mask(s, knight_masks, full) for s in statement[1:]]
    if op == "not":
        return full ^ masks[0]
    if op == "and":
        return _fold_and(masks, full)
    if op == "or":
        return _fold_or(masks)
    if op == "->":
        return (full ^ masks[0]) | masks[1]
    if op == "<=>":
        return full ^ (masks[0] ^ masks[1])
    raise ValueError(f"unknown statement {statement!r}")


def _fold_and(masks: list[int], full: int) -> int:
    out = full
    for m in masks:
        out &= m
    return out


def _fold_or(masks: list[int]) -> int:
    out = 0
    for m in masks:
        out |= m
    return out


def solutions(statements: Sequence[Statement]) -> list[tuple[bool, ...]]:
    """Every assignment (knights[i] per person) under which each statement is true exactly when its
    speaker is a knight; all 2^N assignments at once, as bits of Python ints."""
    n = len(statements)
    full = (1 << (1 << n)) - 1
    knight_masks = [sum(1 << a for a in range(1 << n) if a >> i & 1) for i in range(n)]
    consistent = full
    for i, statement in enumerate(statements):
        consistent &= full ^ (knight_masks[i] ^ _truth_mask(statement, knight_masks, full))
    return [tuple(bool(a >> i & 1) for i in range(n)) for a in range(1 << n) if consistent >> a & 1]


def _leaf(rng: random.Random, speaker: int, n: int) -> Statement:
    while True:  # "I am a knave" alone is a paradox; the dataset's sampler skips it too
        leaf = (rng.choice(("knight", "knave")), rng.randrange(n))
        if leaf != ("knave", speaker):
            return leaf


def sample_statement(rng: random.Random, speaker: int, n: int) -> Statement:
    """One random statement by person `speaker` about the n people."""
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    if kind == "leaf":
        return _leaf(rng, speaker, n)
    if kind == "not":
        return ("not", _leaf(rng, speaker, n))
    if kind in ("exactly_one", "all"):
        people = tuple(sorted(rng.sample(range(n), min(n, rng.choice((2, 3))))))
        return (kind, rng.choice(("knight", "knave")), people)
    first = _leaf(rng, speaker, n)
    second = _leaf(rng, speaker, n)
    while second == first:
        second = _leaf(rng, speaker, n)
    return (kind, first, second)


def _name_list(names: list[str]) -> str:
    return ", ".join(names[:-1]) + " and " + names[-1]


def render_statement(statement: Statement, names: Sequence[str]) -> str:
    """The statement in the dataset's words, starting lowercase unless it starts with a name."""
    op = statement[0]
    if op in ("knight", "knave"):
        return f"{names[statement[1]]} is a {op}"
    if op == "not":
        leaf = statement[1]
        return f"{names[leaf[1]]} is not a {leaf[0]}"
    if op in ("and", "or"):
        return f" {op} ".join(render_statement(s, names) for s in statement[1:])
    if op == "->":
        return f"if {render_statement(statement[1], names)} then {render_statement(statement[2], names)}"
    if op == "<=>":
        return f"{render_statement(statement[1], names)} if and only if {render_statement(statement[2], names)}"
    people = [names[i] for i in statement[2]]
    if op == "exactly_one":
        return f"exactly one of {_name_list(people)} is a {statement[1]}"
    return f"{_name_list(people)} are {'both' if len(people) == 2 else 'all'} {statement[1]}s"


def render_puzzle(statements: Sequence[Statement], names: Sequence[str], rng: random.Random) -> str:
    """The puzzle text: the island, the inhabitants, each one's statement, the question."""
    # The dataset's list always has the serial comma, even for two: "Zoey, and Oliver".
    parts = [INTRO + f"You meet {len(names)} inhabitants: {', '.join(names[:-1])}, and {names[-1]}."]
    for name, statement in zip(names, statements):
        content = render_statement(statement, names)
        parts.append(rng.choice(TEMPLATES).format(name=name, content=content,
                                                  Content=content[0].upper() + content[1:]))
    parts.append(QUESTION)
    return " ".join(parts)


def solution_text(names: Sequence[str], knights: Sequence[bool]) -> str:
    """The ground truth: one line per person, "(1) Alice is a knight"."""
    return "\n".join(f"({i}) {name} is a {'knight' if k else 'knave'}"
                     for i, (name, k) in enumerate(zip(names, knights), 1))


@dataclasses.dataclass(frozen=True)
class Puzzle:
    """A puzzle: person i (called names[i]) says statements[i]; knights[i] is the unique solution."""

    statements: tuple[Statement, ...]
    names: tuple[str, ...]
    knights: tuple[bool, ...]
    prompt: str  # the puzzle text and the answer-format instruction

    def record(self) -> dict:
        """The Tülu 3 RLVR record: messages (one user turn), ground_truth, dataset."""
        return {"messages": [{"role": "user", "content": self.prompt}],
                "ground_truth": solution_text(self.names, self.knights), "dataset": DATASET}


def sample_puzzle(rng: random.Random, n: int, seen: set, max_tries: int = 10_000) -> Puzzle:
    """A puzzle with n people and a unique solution whose statements are not in `seen` (they are
    added to it). UserError if none turns up in `max_tries` draws."""
    for _ in range(max_tries):
        statements = tuple(sample_statement(rng, i, n) for i in range(n))
        if statements in seen:
            continue
        found = solutions(statements)
        if len(found) != 1:
            continue
        seen.add(statements)
        names = tuple(rng.sample(NAMES, n))
        prompt = render_puzzle(statements, names, rng) + "\n\n" + INSTRUCTION
        return Puzzle(statements, names, found[0], prompt)
    raise UserError(f"found no new {n}-person puzzle with a unique solution in {max_tries} draws "
                    f"({len(seen)} puzzles made so far): ask for fewer puzzles or more people")


def generate(n_puzzles: int, people: int, people_max: int, rng: random.Random, seen: set) -> list[Puzzle]:
    """n_puzzles puzzles, each with a number of people drawn uniformly from [people, people_max]."""
    if not MIN_PEOPLE <= people <= people_max <= MAX_PEOPLE:
        raise UserError(f"people must satisfy {MIN_PEOPLE} <= --people <= --people-max <= {MAX_PEOPLE}, "
                        f"got {people} and {people_max}")
    return [sample_puzzle(rng, rng.randint(people, people_max), seen) for _ in range(n_puzzles)]


def write_splits(out: str, n_train: int, n_eval: int, people: int, people_max: int | None = None,
                 seed: int = 0) -> dict[str, str]:
    """Writes kk_eval.jsonl (drawn first) and kk_train.jsonl (disjoint from it) under `out`;
    returns split -> path."""
    if n_train < 0 or n_eval < 0:
        raise UserError(f"--n-train and --n-eval must be >= 0, got {n_train} and {n_eval}")
    rng, seen = random.Random(seed), set()
    splits = {"eval": generate(n_eval, people, people_max or people, rng, seen)}
    splits["train"] = generate(n_train, people, people_max or people, rng, seen)
    os.makedirs(out, exist_ok=True)
    paths = {}
    for split in ("train", "eval"):
        paths[split] = os.path.join(out, f"kk_{split}.jsonl")
        with open(paths[split], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p.record(), ensure_ascii=False) + "\n" for p in splits[split])
    return paths


_ROLE_CLAIM = re.compile(r"\b([A-Z][A-Za-z'-]*)\s+is\s+an?\s+(knight|knave)\b")


def parse_solution(ground_truth) -> dict[str, str]:
    """name -> "knight" | "knave" from a solution text ("(1) Alice is a knight\\n..." or "Alice is a
    knight, and Bob is a knave."), or Logic-RL's {"solution_text_format": ...}. ValueError if it
    names nobody or gives someone two roles."""
    if isinstance(ground_truth, dict):
        ground_truth = ground_truth.get("solution_text_format", ground_truth.get("solution_text", ""))
    roles: dict[str, str] = {}
    for name, role in _ROLE_CLAIM.findall(str(ground_truth)):
        if roles.setdefault(name, role) != role:
            raise ValueError(f"knights_knaves ground truth gives {name} two roles: {ground_truth!r}")
    if not roles:
        raise ValueError(f"knights_knaves ground truth names nobody as a knight or knave: {ground_truth!r}")
    return roles


def answer_section(response: str) -> str | None:
    """The final answer: the last <answer>...</answer>, else the text after the last "CONCLUSION:"."""
    tagged = re.findall(r"<answer>(.*?)</answer>", response, flags=re.DOTALL | re.IGNORECASE)
    if tagged:
        return tagged[-1]
    at = response.upper().rfind("CONCLUSION:")
    return response[at + len("CONCLUSION:"):] if at >= 0 else None


def verify_solution(response: str, ground_truth) -> bool:
    """True iff the response's final answer gives every person of the ground truth their role,
    once, and names exactly as many roles as there are people."""
    return check_roles(response, parse_solution(ground_truth))


def check_roles(response: str, truth: dict[str, str]) -> bool:
    """verify_solution with the ground truth already parsed (name -> "knight" | "knave")."""
    section = answer_section(response)
    if section is None:
        return False
    if len(re.findall(r"\b(?:knight|knave)s?\b", section, flags=re.IGNORECASE)) != len(truth):
        return False
    for name, role in truth.items():
        claims = re.findall(rf"\b{re.escape(name)}\s+is\s+an?\s+(knight|knave)\b", section, flags=re.IGNORECASE)
        if {c.lower() for c in claims} != {role}:
            return False
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.rl.knights_knaves",
                                     description="Write Knights-and-Knaves RLVR prompts (train and eval jsonl).")
    parser.add_argument("--out", required=True, help="directory for kk_train.jsonl and kk_eval.jsonl")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-eval", type=int, default=100)
    parser.add_argument("--people", type=int, default=3, help=f"people per puzzle ({MIN_PEOPLE}-{MAX_PEOPLE})")
    parser.add_argument("--people-max", type=int, default=None,
                        help="with it, each puzzle has uniformly between --people and this many people")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    def body():
        paths = write_splits(args.out, args.n_train, args.n_eval, args.people, args.people_max, args.seed)
        print(f"wrote {args.n_train} puzzles -> {paths['train']}, {args.n_eval} -> {paths['eval']}", file=sys.stderr)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
