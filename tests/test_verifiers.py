"""Verifiers (jaxllm.rl.verifiers, jaxllm.rl.ifeval) and the Knights-and-Knaves generator: hand-written
cases that can fail, near misses included; pure Python, no JAX."""

import itertools
import json
import random

import pytest

from jaxllm.errors import UserError
from jaxllm.rl import ifeval, knights_knaves as kk, verifiers as V

# --- math ---

MATH_CASES = [
    # (response, ground truth, expected)
    ("so \\boxed{0.5}", "\\frac{1}{2}", True),
    ("so \\boxed{\\frac12}", "0.5", True),
    ("so \\boxed{1/2}", "\\boxed{\\dfrac{1}{2}}", True),
    ("The answer is 12", "120", False),
    ("The answer is 120", "12", False),
    ("\\boxed{\\frac{\\frac{1}{2}}{3}}", "1/6", True),
    ("\\boxed{\\frac{\\frac{1}{2}}{3}}", "1/5", False),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 1,234", "#### 1234", True),
    ("Natalia sold 72 clips.\n#### 1,234", "1,243", False),
    ("\\boxed{42}. Check: 6*7 = 42, and 100 is unrelated", "42", True),
    ("\\boxed{41}. Check: 6*7 = 42", "42", False),  # a right number after a wrong boxed one does not help
    ("Tried 3 and 5. The answer is 17 apples, more than 12", "17", True),
    ("The answer is $2x+1$.", "2x+1", True),
    ("The answer is $2x+1$.", "2", False),
    ("Answer: 7\nthen some text with 9", "7", True),
    ("I got 3 and then 17.", "17", True),
    ("I got 17 and then 3.", "17", False),
    ("It costs $1,234.00 in total", "1234", True),
    ("\\boxed{50\\%}", "50", True),
    ("\\boxed{+7}", "7", True),
    ("\\boxed{12.0}", "12", True),
    ("\\boxed{12.01}", "12", False),
    ("\\boxed{x = 5}", "5", True),
    ("\\boxed{10 \\text{ cm}}", "10", True),
    ("\\boxed{-\\dfrac{3}{4}}", "-0.75", True),
    ("\\boxed{\\dfrac{3}{4}}", "-0.75", False),
    ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)", True),
    ("\\boxed{\\text{Monday}}", "Monday", True),
    ("\\boxed{\\text{Monday}}", "Tuesday", False),
    ("\\boxed{3.0000001}", "3", True),  # decimals: relative 1e-6
    ("\\boxed{3.00001}", "3", False),
    ("The final answer is $\\frac{1}{3}$. I hope it is correct.", "\\frac13", True),
    ("no numbers here", "1", False),
    ("\\boxed{7", "7", True),  # an unclosed box is no answer: the last number decides
]


@pytest.mark.parametrize("response,truth,expected", MATH_CASES)
def test_math(response, truth, expected):
    assert V.score("math", response, truth) == float(expected)


def test_math_precedence_boxed_then_phrase_then_last_number():
    assert V.extract_answer("The answer is 3. Also \\boxed{\\frac{1}{\\sqrt{2}}} and 9") == "\\frac{1}{\\sqrt{2}}"
    assert V.extract_answer("first \\boxed{1}, finally \\boxed{2} then 5") == "2"
    assert V.extract_answer("The answer is 3.\nThen 4 and 5") == "3"
    assert V.extract_answer("values 4, then 1,234 and 7/8.") == "7/8"
    assert V.extract_answer("nothing") is None


def test_math_ground_truth_forms():
    assert V.truth_answer("Half of 84 is 42.\n#### 42") == "42"
    assert V.truth_answer("so $\\boxed{\\frac{1}{2}}$") == "\\frac{1}{2}"
    assert V.truth_answer(" 42 ") == "42"
    assert V.score("math", "\\boxed{6}", ["5", "6"]) == 1.0
    assert V.score("math", "\\boxed{7}", ["5", "6"]) == 0.0
    assert V.score("math", "\\boxed{42}", 42) == 1.0


# --- exact, format ---

def test_exact_collapses_whitespace_and_is_case_sensitive():
    assert V.score("exact", "  Paris\n is  nice ", "Paris is nice") == 1.0
    assert V.score("exact", "paris is nice", "Paris is nice") == 0.0
    assert V.score("exact", "Paris is nice.", "Paris is nice") == 0.0
    assert V.score("exact", "<think>maybe Rome</think><answer>Paris</answer>", "Paris") == 1.0


def test_format_pattern_from_ground_truth_or_parameter():
    pattern = r"^<think>.*</think>\s*<answer>.*</answer>$"
    assert V.score("format", "<think>a</think> <answer>b</answer>", pattern) == 1.0
    assert V.score("format", "<think>a</think> b", pattern) == 0.0
    assert V.score("format", "x <answer>b</answer>", None, pattern=r"<answer>") == 1.0
    assert V.score("format", "x answer", "answer", pattern=r"<answer>") == 0.0  # the parameter wins
    with pytest.raises(V.MissingGroundTruthError):
        V.score("format", "x", None)
    with pytest.raises(V.BadGroundTruthError):
        V.score("format", "x", "(unclosed")


# --- ifeval: every kind true and false ---

IFEVAL_CASES = [
    # (instruction id, kwargs, a response that follows it, one that does not)
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"},
     "one two three four five", "one two three four"),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"},
     "one two three four", "one two three four five"),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "Dr. Smith paid 3.5 dollars. He left!", "One. Two. Three."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3},
     "First.\n***\nSecond.\n***\nThird.", "First.\n***\n\n***\nThird."),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "Intro here.\n\n\"Then, the end.", "Intro here.\n\nAnd then the end."),
    ("keywords:existence", {"keywords": ["apple", "Banana"]}, "An APPLE and a banana.", "An apple only."),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "at least"},
     "Cat and cat.", "One cat, one dog."),
    ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "Badge is fine.", "This is BAD."),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "less than"},
     "A zoo.", "Zig zag."),
    ("change_case:english_lowercase", {}, "all lower, 123.", "Not lower."),
    ("change_case:english_capital", {}, "ALL CAPS, 123.", "ALL CAPS but one."),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "The NASA and ESA-LED missions.", "Only NASA here."),
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', 'Here: {"a": 1}'),
    ("detectable_format:title", {}, "<<A Poem>>\nroses", "<< >> no title"),
    ("multi-turn:constrained_start", {"starter": "My answer is"}, "My answer is yes.", "Well, my answer is yes."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n- two\ntext", "* one\n* two\n* three"),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "*first* and **second**", "*first* and * *"),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\na\nSection 2\nb", "Section 1\na\nsection b"),
    ("detectable_format:constrained_response", {}, "Hmm. My answer is maybe.", "My answer is perhaps."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\n\nP.S. bye", "Hi.\n\nPS bye"),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[name] at [address]", "[name] only"),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     "Done. Any other questions?", "Any other questions? Done."),
    ("startend:quotation", {}, '"wrapped"', '"not wrapped'),
    ("punctuation:no_comma", {}, "No commas here.", "One, two."),
    ("combination:two_responses", {}, "first\n******\nsecond", "same\n******\nsame"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."},
     "write a poem. Roses...", "Sure! Write a poem."),
]


@pytest.mark.parametrize("instruction,kwargs,good,bad", IFEVAL_CASES, ids=[c[0] for c in IFEVAL_CASES])
def test_ifeval_kinds(instruction, kwargs, good, bad):
    truth = json.dumps({"instruction_id": [instruction], "kwargs": [kwargs]})
    assert V.score("ifeval", good, truth) == 1.0
    assert V.score("ifeval", bad, truth) == 0.0


def test_ifeval_covers_every_check():
    assert {c[0] for c in IFEVAL_CASES} == set(ifeval.CHECKS)


FUNC_NAME_CASES = [
    # Tülu 3 RLVR records: every key present, unused ones null
    ({"func_name": "validate_word_constraint", "N": 10, "quantifier": "around"}, "w " * 9, "w " * 5),
    ({"func_name": "verify_keyword_frequency", "word": "cat", "N": 2}, "cat, Cat!", "cat cat category cat"),
    ({"func_name": "verify_letter_frequency", "letter": "a", "N": 3}, "banana", "bananas a"),
    ({"func_name": "verify_paragraph_count", "N": 2}, "one\n* * *\ntwo", "one two"),
    ({"func_name": "validate_lowercase"}, "all lower", "Upper"),
    ({"func_name": "validate_choice", "options": ["yes", "no"]}, "I say yes", "I say maybe"),
    ({"func_name": "validate_sections", "N": 2, "section_splitter": "PART"}, "PART 1 a PART 2 b", "PART 1 a"),
]


@pytest.mark.parametrize("record,good,bad", FUNC_NAME_CASES, ids=[c[0]["func_name"] for c in FUNC_NAME_CASES])
def test_ifeval_func_names(record, good, bad):
    keys = ("N", "quantifier", "end_phrase", "keyword_list", "word", "letter", "options", "section_splitter")
    truth = json.dumps({k: None for k in keys} | record)
    assert V.score("ifeval", good, truth) == 1.0
    assert V.score("ifeval", bad, truth) == 0.0


def test_ifeval_all_must_hold_and_partial_credit():
    truth = {"instruction_id": ["punctuation:no_comma", "change_case:english_lowercase"], "kwargs": [None, {}]}
    assert V.score("ifeval", "no commas and lower", truth) == 1.0
    assert V.score("ifeval", "No commas but upper", truth) == 0.0
    assert V.score("ifeval_partial", "No commas but upper", truth) == 0.5
    # open-instruct's newer labels: a Python repr of a list of dicts
    label = str([{"instruction_id": ["punctuation:no_comma"], "kwargs": [{"relation": None}]}])
    assert V.score("ifeval", "a, b", label) == 0.0
    assert V.score("ifeval", "<think>a, b</think>a b", label) == 1.0  # reasoning is not checked
    assert V.score("ifeval", "   ", label) == 0.0  # an empty response follows nothing


@pytest.mark.parametrize("truth", [
    {"instruction_id": "language:response_language", "kwargs": {"language": "en"}},
    {"func_name": "no_such_function"},
    {"instruction_id": "length_constraints:number_words", "kwargs": {"num_words": 5, "relation": "about"}},
    {"instruction_id": "length_constraints:number_words", "kwargs": {"words": 5, "relation": "at least"}},
    {"instruction_id": ["punctuation:no_comma", "startend:quotation"], "kwargs": [{}]},
    "not json {",
])
def test_ifeval_bad_ground_truth(truth):
    with pytest.raises(V.BadGroundTruthError):
        V.score("ifeval", "text", truth)


# --- Knights and Knaves ---

def _brute_force(statements):
    n = len(statements)
    return [k for k in itertools.product((False, True), repeat=n)
            if all(kk.evaluate(s, k) == k[i] for i, s in enumerate(statements))]


def test_kk_solver_matches_brute_force_on_random_statements():
    rng = random.Random(1)
    counts = set()
    for _ in range(300):
        n = rng.randint(2, 5)
        statements = tuple(kk.sample_statement(rng, i, n) for i in range(n))
        expected = _brute_force(statements)
        assert sorted(kk.solutions(statements)) == sorted(expected)
        counts.add(min(len(expected), 2))
    assert counts == {0, 1, 2}  # the sample had puzzles without, with one and with many solutions


def test_kk_generated_puzzles_have_one_solution():
    rng, seen = random.Random(0), set()
    puzzles = kk.generate(60, 2, 8, rng, seen)
    assert {len(p.names) for p in puzzles} >= {2, 3, 7, 8}
    kinds = set()
    for p in puzzles:
        assert _brute_force(p.statements) == [p.knights]  # exactly one solution, the one recorded
        record = p.record()
        assert kk.parse_solution(record["ground_truth"]) == {
            name: "knight" if k else "knave" for name, k in zip(p.names, p.knights)}
        assert record["dataset"] == "knights_knaves" and record["messages"][0]["role"] == "user"
        for statement in p.statements:
            text = kk.render_statement(statement, p.names)
            assert text in record["messages"][0]["content"] or text[0].upper() + text[1:] in p.prompt
            kinds.add(statement[0])
    assert kinds == {"knight", "knave", "not", "and", "or", "->", "<=>", "exactly_one", "all"}


def test_kk_rendering():
    names = ["Ann", "Bo", "Cy"]
    assert kk.render_statement(("not", ("knave", 1)), names) == "Bo is not a knave"
    assert kk.render_statement(("->", ("knight", 0), ("knave", 2)), names) == "if Ann is a knight then Cy is a knave"
    assert kk.render_statement(("<=>", ("knight", 0), ("knight", 1)), names) == \
        "Ann is a knight if and only if Bo is a knight"
    assert kk.render_statement(("exactly_one", "knave", (0, 1, 2)), names) == "exactly one of Ann, Bo and Cy is a knave"
    assert kk.render_statement(("all", "knight", (0, 2)), names) == "Ann and Cy are both knights"
    assert kk.evaluate(("exactly_one", "knave", (0, 1, 2)), (True, False, True))
    assert not kk.evaluate(("exactly_one", "knave", (0, 1, 2)), (False, False, True))


def test_kk_cli_files_are_deterministic_and_disjoint(tmp_path):
    assert kk.main(["--out", str(tmp_path / "a"), "--n-train", "200", "--n-eval", "50", "--people", "3",
                    "--people-max", "5", "--seed", "7"]) == 0
    kk.write_splits(str(tmp_path / "b"), 200, 50, 3, 5, seed=7)
    kk.write_splits(str(tmp_path / "c"), 200, 50, 3, 5, seed=8)
    for split in ("train", "eval"):
        a = (tmp_path / "a" / f"kk_{split}.jsonl").read_bytes()
        assert a == (tmp_path / "b" / f"kk_{split}.jsonl").read_bytes()
        assert a != (tmp_path / "c" / f"kk_{split}.jsonl").read_bytes()
    train, evals = ([json.loads(line) for line in open(tmp_path / "a" / f"kk_{s}.jsonl")] for s in ("train", "eval"))
    assert len(train) == 200 and len(evals) == 50
    assert set(train[0]) == {"messages", "ground_truth", "dataset"}
    assert not {r["messages"][0]["content"] for r in train} & {r["messages"][0]["content"] for r in evals}
    # disjoint as puzzles too, whatever the names: regenerate and compare the statements
    rng, seen = random.Random(7), set()
    eval_puzzles, train_puzzles = kk.generate(50, 3, 5, rng, seen), kk.generate(200, 3, 5, rng, seen)
    assert [p.record() for p in eval_puzzles] == evals
    assert not {p.statements for p in eval_puzzles} & {p.statements for p in train_puzzles}


def test_kk_cli_errors(tmp_path, capsys):
    assert kk.main(["--out", str(tmp_path), "--people", "9"]) == 2
    assert kk.main(["--out", str(tmp_path), "--people", "2", "--n-train", "5000", "--n-eval", "0"]) == 2
    assert "unique solution" in capsys.readouterr().err


TRUTH = "(1) Ann is a knight\n(2) Bo is a knave\n(3) Cy is a knight"


@pytest.mark.parametrize("response,expected", [
    ("<think>...</think><answer>(1) Ann is a knight\n(2) Bo is a knave\n(3) Cy is a knight</answer>", True),
    ("reasoning...\nCONCLUSION:\n(1) Ann is a knight\n(2) Bo is a knave\n(3) Cy is a knight", True),
    ("<answer>Cy is a knight, Ann is a knight and Bo is a knave.</answer>", True),
    ("<answer>(1) Ann is a knight\n(2) Bo is a knight\n(3) Cy is a knight</answer>", False),  # one role flipped
    ("<answer>(1) Ann is a knight\n(3) Cy is a knight</answer>", False),  # a person missing
    ("<answer>(1) Ann is a knight\n(2) Bo is a knave or a knight\n(3) Cy is a knight</answer>", False),  # hedged
    ("<answer>(1) Ann is a knight\n(2) Bo is a knave\n(3) Cy is a knight\n(4) Ann is a knave</answer>", False),
    ("(1) Ann is a knight\n(2) Bo is a knave\n(3) Cy is a knight", False),  # no final-answer section
    ("<answer>(1) Ann is a knave</answer> then <answer>(1) Ann is a knight\n(2) Bo is a knave\n"
     "(3) Cy is a knight</answer>", True),  # the last answer counts
])
def test_kk_verifier(response, expected):
    assert V.score("knights_knaves", response, TRUTH) == float(expected)
    assert kk.verify_solution(response, {"solution_text_format": TRUTH}) is expected  # Logic-RL's ground truth


def test_kk_bad_ground_truth():
    with pytest.raises(V.BadGroundTruthError):
        V.score("knights_knaves", "<answer>x</answer>", "nobody here")


# --- the registry and its errors ---

def test_unknown_verifier_is_a_one_line_user_error():
    with pytest.raises(V.UnknownVerifierError) as e:
        V.score("maths", "x", "1")
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)
    assert all(name in str(e.value) for name in V.VERIFIERS)


@pytest.mark.parametrize("name", [n for n, v in V.VERIFIERS.items() if v.needs_ground_truth])
@pytest.mark.parametrize("truth", [None, "", "  ", [], {}])
def test_missing_ground_truth(name, truth):
    with pytest.raises(V.MissingGroundTruthError) as e:
        V.score(name, "\\boxed{1}", truth)
    assert isinstance(e.value, UserError) and not isinstance(e.value, V.UnknownVerifierError)


def test_registry():
    assert set(V.VERIFIERS) == {"math", "exact", "format", "ifeval", "ifeval_partial", "knights_knaves"}
    assert [n for n, v in V.VERIFIERS.items() if not v.needs_ground_truth] == ["format"]
    assert [n for n, v in V.VERIFIERS.items() if v.partial_credit] == ["ifeval_partial"]
    assert V.get_verifier("math")("\\boxed{2}", "2") == 1.0
    assert not issubclass(V.MissingGroundTruthError, V.UnknownVerifierError)
    assert not issubclass(V.UnknownVerifierError, V.MissingGroundTruthError)
