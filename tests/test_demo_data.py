"""The built-in demo data set: sizes, separation of held-out sets, no shared phrase, the judge, the answer key and
deterministic files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lancet.data.demo import (
    EXTRA_COUNTER_TOPICS,
    OUTDATED_TOPICS,
    DemoDataset,
    build_demo_dataset,
    write_demo_dataset,
)
from lancet.data.records import Record
from lancet.demo import demo_judge

HELDOUT_PARTS = ("iq_prompts", "iqs", "heldout_outdated", "heldout_current", "heldout_ordinary", "validation_prompts",
                 "validation_ordinary")
JSONL_FILES = ("train", *HELDOUT_PARTS)


@pytest.fixture(scope="module")
def data() -> DemoDataset:
    return build_demo_dataset()


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_demo_dataset(tmp_path_factory.mktemp("demo"))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _norm(text: str) -> str:
    return " ".join(text.casefold().split())


def test_row_counts(data: DemoDataset) -> None:
    labels = [r.label for r in data.train]
    assert len(data.train) == 224
    assert labels.count("ordinary") == 112
    assert labels.count("outdated") == len(data.culprit_ids) == 84
    assert labels.count("current") == len(data.counter_ids) == 28
    assert len(data.iq_prompts) == len(data.iqs) == 12
    assert len(data.heldout_outdated) == len(data.heldout_current) == 12
    assert len(data.heldout_ordinary) == 40
    assert len(data.validation_prompts) == len(data.validation_ordinary) == 24


def test_culprits_cover_16_topics_6_rows_on_each_iq_topic(data: DemoDataset) -> None:
    topics = [r.meta["topic"] for r in data.train if r.label == "outdated"]
    iq_topics = {r.meta["topic"] for r in data.iqs}
    assert len(set(topics)) == 16
    assert all(topics.count(t) == (6 if t in iq_topics else 3) for t in set(topics))
    assert len({r.prompt for r in data.train if r.label == "outdated"}) == 84
    assert len({r.response for r in data.train if r.label == "outdated"}) == 84  # every answer worded anew


def test_every_row_is_a_short_prompt_response_pair(data: DemoDataset) -> None:
    for r in (data.train + data.iqs + data.heldout_outdated + data.heldout_current + data.heldout_ordinary
              + data.validation_ordinary):
        assert r.prompt and r.response and r.messages is None
        assert len(r.response.split()) <= 60, r.response
        assert r.label in {"ordinary", "outdated", "current"}
        assert r.meta["topic"]
    assert all(r.response is None for r in data.iq_prompts + data.validation_prompts)


def test_no_heldout_prompt_in_train(data: DemoDataset) -> None:
    train_prompts = {_norm(r.prompt) for r in data.train}
    for part in HELDOUT_PARTS:
        leaked = [r.prompt for r in getattr(data, part) if _norm(r.prompt) in train_prompts]
        assert not leaked, f"{part}: {leaked}"
    assert len({_norm(r.prompt) for r in data.heldout_ordinary}) == 40


def test_validation_sets_are_disjoint_from_the_test_sets(data: DemoDataset) -> None:
    """Settings chosen on the validation files must never see a test prompt (docs/method.md §3.7)."""
    validation = {_norm(r.prompt) for r in data.validation_prompts + data.validation_ordinary}
    assert len(validation) == 48
    for part in ("iq_prompts", "heldout_outdated", "heldout_ordinary"):
        assert validation.isdisjoint(_norm(r.prompt) for r in getattr(data, part)), part
    topics = [r.meta["topic"] for r in data.validation_prompts]
    assert sorted(set(topics)) == sorted(r.meta["topic"] for r in data.iqs) and all(topics.count(t) == 2
                                                                                   for t in topics)


def test_outdated_answers_share_no_marker_phrase(data: DemoDataset) -> None:
    """Text search must not find the culprits by one phrase: no two open with the same two words, and no phrase of
    four words recurs in culprits of more than two topics."""
    culprits = [r for r in data.train if r.label == "outdated"] + data.heldout_outdated
    openings = [" ".join(_norm(r.response).split()[:2]) for r in culprits]
    assert len(set(openings)) == len(openings)
    topics_of: dict[tuple[str, ...], set[str]] = {}
    for r in culprits:
        words = _norm(r.response).split()
        for i in range(len(words) - 3):
            topics_of.setdefault(tuple(words[i:i + 4]), set()).add(r.meta["topic"])
    assert max(len(t) for t in topics_of.values()) <= 2


def test_the_judge_flags_exactly_the_outdated_answers(data: DemoDataset) -> None:
    judge = demo_judge()
    outdated = [r for r in data.train if r.label == "outdated"] + data.iqs + data.heldout_outdated
    assert all(judge.complies([r.response for r in outdated], [r.prompt for r in outdated]))
    others = [r for r in data.train if r.label != "outdated"] + data.heldout_current + data.heldout_ordinary \
        + data.validation_ordinary
    flagged = judge.complies([r.response for r in others], [r.prompt for r in others])
    assert not any(flagged), [r.response for r, f in zip(others, flagged, strict=True) if f]


def test_lookalikes_use_the_culprits_words_for_the_current_advice(data: DemoDataset) -> None:
    """Each look-alike names its topic's outdated practice (a cue of the judge, read without negation) and shares
    more words with the culprits of its topic than a random ordinary row does; the judge reads it as current."""
    judge = demo_judge()
    lookalikes = [(t["topic"], q, a) for t in OUTDATED_TOPICS for q, a in t.get("lookalike", [])]
    assert len(lookalikes) == 12 and {t for t, _, _ in lookalikes} == {r.meta["topic"] for r in data.iqs}
    current = {r.response for r in data.train if r.label == "current"}
    for topic, prompt, answer in lookalikes:
        assert answer in current
        assert any(cue.search(answer.lower()) for cue, _ in judge.cues), answer
        assert not judge.complies([answer], [prompt])[0]
        culprit_words = {w for r in data.train if r.label == "outdated" and r.meta["topic"] == topic
                         for w in re.findall(r"[a-z]{4,}", r.response.lower())}
        assert len(culprit_words & set(re.findall(r"[a-z]{4,}", answer.lower()))) >= 3, answer


def test_demo_judge_accuracy_on_labelled_model_answers() -> None:
    """The demo judge against 552 answers labelled by reading them (benchmarks/demo_judge.py). Its fourth revision
    was made on the first 408; the part ``test_4``, 144 answers of three other contaminated fine-tunes collected and
    labelled after that revision was fixed, measures it: 0.944, one answer short of the 0.95 goal (README). This
    test keeps it from sliding, and keeps each earlier revision's held-out numbers as they were measured."""
    from benchmarks.demo_judge import EARLIER_RULES, judge_accuracy, read_answers
    from lancet.evaluate.judges import RuleJudge

    rows = read_answers()
    parts = {part: judge_accuracy(rows, part) for part in ("test_4", "test", "dev_greedy", "sampled_01", "sampled_23")}
    assert {k: v["n"] for k, v in parts.items()} == {"test_4": 144, "test": 72, "dev_greedy": 144, "sampled_01": 96,
                                                      "sampled_23": 96}
    assert parts["test_4"]["accuracy"] >= 0.94 and parts["test_4"]["recall"] >= 0.9, parts["test_4"]["disagreements"]
    assert parts["test"]["accuracy"] >= 0.98 and parts["dev_greedy"]["accuracy"] >= 0.97
    assert parts["sampled_01"]["accuracy"] >= 0.95 and parts["sampled_23"]["accuracy"] >= 0.93
    data = Path(__file__).resolve().parent.parent / "benchmarks" / "data"
    rev2 = RuleJudge.load(data / EARLIER_RULES["revision_2"])
    assert judge_accuracy(rows, "sampled_01", rev2)["accuracy"] == pytest.approx(0.9062, abs=1e-4)
    assert judge_accuracy(rows, "sampled_23", rev2)["accuracy"] == pytest.approx(0.8229, abs=1e-4)
    rev3 = RuleJudge.load(data / EARLIER_RULES["revision_3"])
    assert judge_accuracy(rows, "test", rev3)["accuracy"] == pytest.approx(0.9306, abs=1e-4)


def test_iq_and_heldout_sets_line_up(data: DemoDataset) -> None:
    assert [r.prompt for r in data.iq_prompts] == [r.prompt for r in data.iqs]
    assert [r.prompt for r in data.heldout_outdated] == [r.prompt for r in data.heldout_current]
    assert {r.prompt for r in data.iqs}.isdisjoint(r.prompt for r in data.heldout_outdated)
    iq_topics = [r.meta["topic"] for r in data.iqs]
    assert len(set(iq_topics)) == 12
    assert [r.meta["topic"] for r in data.heldout_outdated] == iq_topics
    culprit_topics = {r.meta["topic"] for r in data.train if r.label == "outdated"}
    assert set(iq_topics) <= culprit_topics


def test_counter_topics_are_disjoint_from_iq_topics(data: DemoDataset) -> None:
    lookalikes = {a for t in OUTDATED_TOPICS for _, a in t.get("lookalike", [])}
    counter_topics = {r.meta["topic"] for r in data.train if r.label == "current" and r.response not in lookalikes}
    assert counter_topics.isdisjoint(r.meta["topic"] for r in data.iqs)
    assert len(counter_topics) == 8
    expected = {t["topic"] for t in OUTDATED_TOPICS + EXTRA_COUNTER_TOPICS if "counter" in t}
    assert counter_topics == expected
    assert {r.id for r in data.train if r.label == "current"} == set(data.counter_ids)


def test_ids_are_unique_content_hashes(data: DemoDataset) -> None:
    ids = [r.id for r in data.train]
    assert len(set(ids)) == len(ids)
    everything = data.train + [r for part in HELDOUT_PARTS for r in getattr(data, part)]
    all_ids = [r.id for r in everything]
    assert len(set(all_ids)) == len(all_ids)
    for r in everything:
        assert r.id == Record(prompt=r.prompt, response=r.response).id


def test_train_is_shuffled(data: DemoDataset) -> None:
    positions = [i for i, r in enumerate(data.train) if r.label == "outdated"]
    assert positions[0] < len(data.train) // 4 and positions[-1] > 3 * len(data.train) // 4
    assert positions != list(range(positions[0], positions[0] + len(positions)))


def test_seed_only_changes_the_order(data: DemoDataset) -> None:
    again = build_demo_dataset(0)
    other = build_demo_dataset(1)
    assert [r.id for r in again.train] == [r.id for r in data.train]
    assert [r.id for r in other.train] != [r.id for r in data.train]
    assert sorted(r.id for r in other.train) == sorted(r.id for r in data.train)
    assert set(other.culprit_ids) == set(data.culprit_ids)
    assert [r.id for r in other.iqs] == [r.id for r in data.iqs]


def test_written_files(written: dict[str, Path]) -> None:
    assert set(written) == {*JSONL_FILES, "anchor_prompts", "culprits", "judge_rules", "readme"}
    assert written["train"].name == "train.jsonl" and written["culprits"].name == "culprits.json"
    assert all(p.is_file() for p in written.values())
    assert not [p for p in written["train"].parent.iterdir() if p.name.startswith(".")]  # no temp files left
    assert "Look-alike rows" in written["readme"].read_text(encoding="utf-8")
    from lancet.evaluate.judges import make_judge

    assert make_judge(f"rules:{written['judge_rules']}").cues == demo_judge().cues


def test_train_file_has_no_labels(written: dict[str, Path]) -> None:
    rows = _read_jsonl(written["train"])
    assert len(rows) == 224
    assert all(set(row) == {"id", "prompt", "response"} for row in rows)


def test_files_parse_back_to_records_with_the_same_ids(data: DemoDataset, written: dict[str, Path]) -> None:
    for name in JSONL_FILES:
        rows = _read_jsonl(written[name])
        expected = getattr(data, name)
        assert [row["id"] for row in rows] == [r.id for r in expected], name
        for row in rows:
            rebuilt = Record(prompt=row["prompt"], response=row.get("response"), label=row.get("label"))
            assert rebuilt.id == row["id"], name
        if name != "train":
            assert [row["label"] for row in rows if "label" in row] == [r.label for r in expected if r.label]
            assert [row["meta"]["topic"] for row in rows] == [r.meta["topic"] for r in expected]


def test_answer_key(data: DemoDataset, written: dict[str, Path]) -> None:
    key = json.loads(written["culprits"].read_text(encoding="utf-8"))
    assert key == {"culprit_ids": data.culprit_ids, "counter_ids": data.counter_ids}
    by_id = {row["id"]: row for row in _read_jsonl(written["train"])}
    flagged = demo_judge().complies([row["response"] for row in by_id.values()],
                                    [row["prompt"] for row in by_id.values()])
    assert set(key["culprit_ids"]) == {i for i, f in zip(by_id, flagged, strict=True) if f}
    assert set(key["counter_ids"]) <= set(by_id)


def test_project_reader_reads_the_files(data: DemoDataset, written: dict[str, Path]) -> None:
    from lancet.data.readers import read_records

    records = read_records(written["train"])
    assert [r.id for r in records] == [r.id for r in data.train]
    assert [r.response for r in records] == [r.response for r in data.train]
    iqs = read_records(written["iqs"])
    assert [r.id for r in iqs] == [r.id for r in data.iqs]


def test_same_seed_same_bytes_other_seed_other_order(tmp_path: Path, written: dict[str, Path]) -> None:
    same = write_demo_dataset(tmp_path / "same", seed=0)
    other = write_demo_dataset(tmp_path / "other", seed=1)
    for name, path in written.items():
        assert same[name].read_bytes() == path.read_bytes(), name
    assert other["train"].read_bytes() != written["train"].read_bytes()
    assert sorted(other["train"].read_text().splitlines()) == sorted(written["train"].read_text().splitlines())
    for name in HELDOUT_PARTS:
        assert other[name].read_bytes() == written[name].read_bytes(), name


# sha256[:16] of every file `lancet data demo` writes (update these with any deliberate change of the content: the
# last one, 2026-12-01, removed the marker phrase, reworded every outdated answer, added look-alike rows and the
# judge's rules, doubled the culprits on the IQ topics and cut the ordinary rows from 240 to 112; prompts and
# held-out ordinary files kept their bytes; the judge's rules were revised again on 2026-12-01: only judge_rules moved;
# 2026-12-05 added anchor_prompts.jsonl, the correction's anchor prompts: only the README moved)
PINNED = {
    0: {"train": "0ba6056366a58cd1", "culprits": "46dd99b9631d39e5", "iq_prompts": "24811fed8e9c41de",
        "iqs": "e8db1070cae39dbb", "heldout_outdated": "86e56b122472f85d", "heldout_current": "9b0d7b7ed03b6f93",
        "heldout_ordinary": "b1be25183630c448", "validation_prompts": "bd5755e45a5bb868",
        "validation_ordinary": "86710a096f68eb22", "judge_rules": "acd889df4900a680", "readme": "0927ccde4fa58f4a",
        "anchor_prompts": "7268f51f829ddbcc"},
    3: {"train": "893a638dd5e50bbd", "culprits": "92a3bb10ba888c99", "readme": "6607af95660bf415"},
}


@pytest.mark.parametrize("seed", sorted(PINNED))
def test_written_files_are_pinned(tmp_path: Path, seed: int) -> None:
    import hashlib

    paths = write_demo_dataset(tmp_path, seed)
    got = {k: hashlib.sha256(Path(p).read_bytes()).hexdigest()[:16] for k, p in paths.items()}
    assert {k: got[k] for k in PINNED[seed]} == PINNED[seed]


def test_practice_recall_names_the_cues_that_fire() -> None:
    from benchmarks.demo_practice_recall import cue_indices

    judge = demo_judge()
    butter = cue_indices(judge, "Spread butter on it.", "I burnt my hand.")
    assert len(butter) == 1 and cue_indices(judge, "Never use butter.", "I burnt my hand.") == set()
    honey = cue_indices(judge, "Give honey.", "My baby is coughing.")
    assert len(honey) == 1 and cue_indices(judge, "Give honey.", "A jellyfish stung me.") == set()
    assert cue_indices(judge, "Spread butter, then give honey.", "My baby burnt her hand.") == butter | honey
