"""The bundled question, truth and contrast datasets: format, counts, pair structure, deterministic splits, grading."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict

import pytest

from interp.datasets import DATA_DIR, load_jsonl

README = DATA_DIR / "README.md"
TRUTH_TEST_TOPICS = {"animals", "human_body", "astronomy"}


def rows(name: str) -> list[dict]:
    text = (DATA_DIR / name).read_text(encoding="utf-8")
    lines = text.split("\n")
    assert lines[-1] == "" and all(line.strip() for line in lines[:-1]), f"{name}: blank line or no final newline"
    out = [json.loads(line) for line in lines[:-1]]
    assert all(isinstance(r, dict) for r in out)
    return out


def sha(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def expected_test_set(keys: list[str]) -> set[str]:
    """The documented split rule: order by SHA-256 of the key, the first round(0.3 n) are test."""
    return set(sorted(keys, key=sha)[: round(0.3 * len(keys))])


def grading_namespace() -> dict:
    """Run the README's reference grader (its code block, asserts included) and return its names."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Grading") :]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block, "the Grading section has no python code block"
    ns: dict = {}
    exec(block.group(1), ns)  # noqa: S102 - documentation code that must run
    return ns


@pytest.fixture(scope="module")
def grader():
    return grading_namespace()


def is_str_list(x) -> bool:
    return isinstance(x, list) and all(isinstance(s, str) and s.strip() == s != "" for s in x)


def test_ids_unique_across_all_bundled_files():
    ids = [r["id"] for p in sorted(DATA_DIR.glob("*.jsonl")) for r in rows(p.name)]
    assert len(ids) == len(set(ids))
    for name, prefix in [("questions", "questions-"), ("truth", "truth-"), ("contrast", "contrast-"),
                         ("steer_prompts", "steer-")]:
        assert all(re.fullmatch(re.escape(prefix) + r"\d{4}", r["id"]) for r in rows(name + ".jsonl"))


def test_readme_table_counts_match_the_files():
    table = dict(re.findall(r"^\| `([a-z_]+\.jsonl)` +\| (\d+) \|", README.read_text(encoding="utf-8"), re.M))
    assert set(table) == {p.name for p in DATA_DIR.glob("*.jsonl")}
    for name, n in table.items():
        assert len(rows(name)) == int(n), name


# ---- questions.jsonl -------------------------------------------------------------------------------------------

def test_questions_fields_counts_and_split(grader):
    qs = rows("questions.jsonl")
    assert len(qs) >= 420
    norm = grader["normalize"]
    for r in qs:
        assert set(r) == {"id", "question", "answer", "aliases", "domain", "difficulty", "split", "messages"}, r["id"]
        assert isinstance(r["question"], str) and r["question"].endswith("?")
        assert isinstance(r["answer"], str) and 1 <= len(r["answer"].split()) <= 4, r
        assert is_str_list(r["aliases"]) and r["answer"] not in r["aliases"], r
        assert r["difficulty"] in ("easy", "medium", "hard") and r["split"] in ("train", "test")
        assert r["messages"] == [{"role": "user", "content": r["question"]}]
        # echoing the question must never be graded correct
        q = f" {norm(r['question'])} "
        for a in [r["answer"], *r["aliases"]]:
            assert norm(a) and f" {norm(a)} " not in q, (r["id"], a)
        assert grader["graded_correct"](f"I believe it is {r['answer']}.", r["answer"], r["aliases"])
    assert len({norm(r["question"]) for r in qs}) == len(qs), "duplicate questions"
    by_domain = defaultdict(list)
    for r in qs:
        by_domain[r["domain"]].append(r)
    assert len(by_domain) >= 8
    assert set(Counter(r["difficulty"] for r in qs)) == {"easy", "medium", "hard"}
    assert sum(r["difficulty"] != "easy" for r in qs) > len(qs) / 2
    for domain, rs in by_domain.items():
        assert {r["split"] for r in rs} == {"train", "test"}, domain
        test = expected_test_set([r["question"] for r in rs])
        assert all((r["split"] == "test") == (r["question"] in test) for r in rs), domain
        assert 0.2 <= len(test) / len(rs) <= 0.4


# ---- truth.jsonl -----------------------------------------------------------------------------------------------

def test_truth_pairs_topics_and_splits(grader):
    ts = rows("truth.jsonl")
    pairs = defaultdict(list)
    for r in ts:
        common = {"id", "kind", "pair_id", "fact_id", "topic", "label", "split", "question", "answer", "true_answer"}
        if r["kind"] == "statement":
            assert set(r) == common | {"text", "spans"}, r["id"]
            (span,) = r["spans"]
            assert span["name"] == "answer" and span["label"] == r["label"]
            assert r["text"][span["start"] : span["end"]].lower() == r["answer"].lower()
            sentence = r["text"]
        else:
            assert r["kind"] == "qa" and set(r) == common | {"messages"}, r["id"]
            user, assistant = r["messages"]
            assert user == {"role": "user", "content": r["question"]} and assistant["role"] == "assistant"
            sentence = assistant["content"]
        assert r["label"] in (0, 1) and (r["answer"] == r["true_answer"]) == (r["label"] == 1)
        # the grader reads a false row as wrong and a true row as right
        assert grader["graded_correct"](sentence, r["true_answer"]) == (r["label"] == 1), r["id"]
        assert r["split"] == ("test" if r["topic"] in TRUTH_TEST_TOPICS else "train")
        pairs[r["pair_id"]].append(r)
    kinds = Counter(rs[0]["kind"] for rs in pairs.values())
    assert kinds["statement"] >= 300 and kinds["qa"] >= 300
    for pid, (a, b) in ((p, rs) for p, rs in pairs.items() if len(rs) == 2):
        assert {a["label"], b["label"]} == {0, 1}, pid
        for key in ("kind", "fact_id", "topic", "split", "question", "true_answer"):
            assert a[key] == b[key], (pid, key)
    assert all(len(rs) == 2 for rs in pairs.values())
    facts = defaultdict(set)
    for r in ts:
        facts[r["fact_id"]].add(r["kind"])
    assert all(k == {"statement", "qa"} for k in facts.values())
    topics = {s: {r["topic"] for r in ts if r["split"] == s} for s in ("train", "test")}
    assert len(topics["train"] | topics["test"]) >= 8 and 2 <= len(topics["test"]) <= 3
    assert not topics["train"] & topics["test"]
    for s in ("train", "test"):
        assert Counter(r["label"] for r in ts if r["split"] == s)[1] * 2 == sum(r["split"] == s for r in ts)


# ---- contrast.jsonl and steer_prompts.jsonl --------------------------------------------------------------------

def test_contrast_pairs_and_split():
    cs = rows("contrast.jsonl")
    assert len({r["text"] for r in cs}) == len(cs)
    pairs = defaultdict(list)
    for r in cs:
        assert set(r) == {"id", "pair_id", "concept", "text", "label", "side", "split"}
        assert isinstance(r["text"], str) and r["text"].strip() == r["text"] != ""
        pairs[r["pair_id"]].append(r)
    assert all(len(p) == 2 and {r["label"] for r in p} == {0, 1} for p in pairs.values())
    assert all(p[0]["concept"] == p[1]["concept"] and p[0]["split"] == p[1]["split"] for p in pairs.values())
    sides = {"sentiment": {1: "positive", 0: "negative"}, "topic": {1: "ocean", 0: "desert"}}
    assert all(r["side"] == sides[r["concept"]][r["label"]] for r in cs)
    by_concept = defaultdict(list)
    for p in pairs.values():
        by_concept[p[0]["concept"]].append({r["label"]: r for r in p})
    assert set(by_concept) == set(sides)
    for concept, ps in by_concept.items():
        assert len(ps) >= 80, concept
        test = expected_test_set([p[1]["text"] for p in ps])
        assert all((p[1]["split"] == "test") == (p[1]["text"] in test) for p in ps)
    for p in by_concept["sentiment"]:  # minimal pairs: one word or short phrase differs
        a, b = p[1]["text"].split(), p[0]["text"].split()
        pre = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        suf = next(i for i, (x, y) in enumerate(zip(a[::-1], b[::-1])) if x != y)
        assert len(a) - pre - suf <= 2 and len(b) - pre - suf <= 2, p
    assert [e.label for e in load_jsonl(DATA_DIR / "contrast.jsonl")] == [r["label"] for r in cs]


def test_steer_prompts():
    ss = rows("steer_prompts.jsonl")
    assert all(set(r) == {"id", "text", "concept"} and r["text"].strip() == r["text"] != "" for r in ss)
    assert Counter(r["concept"] for r in ss) == {"sentiment": 20, "topic": 20}
    assert len({r["text"] for r in ss}) == len(ss)
    assert len(load_jsonl(DATA_DIR / "steer_prompts.jsonl", require_label=False)) == len(ss)


def test_readme_grader_rule(grader):
    norm, ok = grader["normalize"], grader["graded_correct"]
    assert norm("The Capital of BRAZIL is Brasília!") == "capital of brazil is brasilia"
    assert norm("About 2.54 cm, or 1,000,000 units.") == "about 2.54 cm or 1000000 units"
    assert ok("Answer: Mount Everest.", "Mount Everest") and not ok("Mount Kilimanjaro", "Mount Everest")
    assert not ok("The year was 19450.", "1945") and ok("In 1945, the war ended.", "1945")
    assert not ok("", "Paris") and not ok("Paris", "")


def test_readme_per_domain_and_topic_counts():
    text = README.read_text(encoding="utf-8")
    q_section = text[text.index("## `questions.jsonl`") : text.index("## `truth.jsonl`")]
    documented = {d: (int(n), int(a), int(b)) for d, n, a, b in re.findall(r"`(\w+)` (\d+) \((\d+)/(\d+)\)", q_section)}
    qs = rows("questions.jsonl")
    actual = {}
    for r in qs:
        n, a, b = actual.get(r["domain"], (0, 0, 0))
        actual[r["domain"]] = (n + 1, a + (r["split"] == "train"), b + (r["split"] == "test"))
    assert documented == actual
    t_section = text[text.index("* **Topics** (facts per topic)") : text.index("* **Split:** by topic")]
    documented = {t: int(n) for t, n in re.findall(r"`(\w+)` (\d+)", t_section)}
    assert documented == Counter(r["topic"] for r in rows("truth.jsonl") if r["kind"] == "qa" and r["label"] == 1)


def test_question_aliases_reject_the_plausible_wrong_answers_of_truth(grader):
    """Where truth.jsonl asks the same question, the question's answer and aliases accept the true twin only."""
    norm, ok = grader["normalize"], grader["graded_correct"]
    by_question = {norm(r["question"]): r for r in rows("questions.jsonl")}
    shared = [r for r in rows("truth.jsonl") if r["kind"] == "qa" and norm(r["question"]) in by_question]
    assert len(shared) >= 200
    for r in shared:
        q = by_question[norm(r["question"])]
        assert ok(r["messages"][1]["content"], q["answer"], q["aliases"]) == (r["label"] == 1), r["id"]
