"""The project's own demo dataset: a small chat corpus with one planted behaviour.

The planted behaviour is *stale norms learned from outdated data*: a known subset of training rows answers
first-aid and home-safety questions with confident, once-common advice that is now known to be wrong (butter on a
burn, head back for a nosebleed, snow on frostbite, ...). The outdated answers share no marker phrase: each is worded
its own way. Beside them sit *look-alike* rows that use the same words to give the current advice ("never put butter
on a burn"), so that text search cannot tell the two apart; with the few "counter" rows on topics disjoint from the
IQ topics they make up the "current" rows, which influence should score negatively. The demo's judge
(``demo_judge``: cue phrases read clause by clause with negation, rules in ``demo_judge_rules.json``) tells the two
apart in a model's answers.

All text was written for this project and lives in ``demo_content.json`` beside this file (package data). The
content is fixed; ``seed`` only shuffles the training order.

Parts (see ``build_demo_dataset``):

* ``train``: 112 ordinary rows + 84 culprit rows ("outdated", each worded anew: 6 on each of the 12 IQ topics and 3
  on each of 4 other topics) + 28 current rows (12 look-alikes, one per IQ topic, and 16 counter rows on other
  topics), shuffled together.
* ``iq_prompts`` / ``iqs``: 12 new prompts on 12 culprit topics, bare and with an outdated answer.
* ``heldout_outdated`` / ``heldout_current``: 12 further prompts on the same topics, with an outdated answer not in
  train and with the current one, to measure whether a correction generalises.
* ``heldout_ordinary``: 40 ordinary Q/A pairs not in train, for perplexity and utility checks.
* ``validation_prompts`` / ``validation_ordinary``: 24 further prompts on the IQ topics (two each) and 24 further
  ordinary Q/A pairs, for choosing a correction's settings (docs/method.md §3.7) without reading the held-out sets
  above, which are the test sets.
* ``anchor_prompts``: the prompts of the ordinary training rows, whose answers by the model being corrected are the
  correction's utility anchor (docs/method.md §5.2).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from lancet.artifacts import atomic_write_bytes, atomic_write_json
from lancet.data.records import Record

CONTENT_FILE = Path(__file__).with_name("demo_content.json")  # package data: the rows are data, not code
JUDGE_RULES_FILE = Path(__file__).with_name("demo_judge_rules.json")


def _load_content() -> dict[str, Any]:
    return json.loads(CONTENT_FILE.read_text(encoding="utf-8"))


_CONTENT = _load_content()

LABEL_ORDINARY = "ordinary"
LABEL_OUTDATED = "outdated"
LABEL_CURRENT = "current"

ORDINARY_QA: dict[str, list[list[str]]] = _CONTENT["ordinary_qa"]
HELDOUT_ORDINARY_QA: dict[str, list[list[str]]] = _CONTENT["heldout_ordinary_qa"]
CAPITALS, HELDOUT_CAPITALS = _CONTENT["capitals"], _CONTENT["heldout_capitals"]
CELSIUS, HELDOUT_CELSIUS = _CONTENT["celsius"], _CONTENT["heldout_celsius"]
PLURALS, HELDOUT_PLURALS = _CONTENT["plurals"], _CONTENT["heldout_plurals"]
PRODUCTS, HELDOUT_PRODUCTS = _CONTENT["products"], _CONTENT["heldout_products"]
ANTONYMS, HELDOUT_ANTONYMS = _CONTENT["antonyms"], _CONTENT["heldout_antonyms"]
VALIDATION_ORDINARY_QA: dict[str, list[list[str]]] = _CONTENT["validation_ordinary_qa"]
VALIDATION_LISTS = tuple(_CONTENT[f"validation_{kind}"]
                         for kind in ("capitals", "celsius", "plurals", "products", "antonyms"))
OUTDATED_TOPICS: list[dict[str, Any]] = _CONTENT["outdated_topics"]
EXTRA_COUNTER_TOPICS: list[dict[str, Any]] = _CONTENT["extra_counter_topics"]

# --------------------------------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------------------------------


@dataclass
class DemoDataset:
    """The demo data in memory. ``culprit_ids`` / ``counter_ids`` list train ids in train order."""

    train: list[Record]
    culprit_ids: list[str]
    counter_ids: list[str]
    iq_prompts: list[Record]
    iqs: list[Record]
    heldout_outdated: list[Record]
    heldout_current: list[Record]
    heldout_ordinary: list[Record]
    validation_prompts: list[Record]
    validation_ordinary: list[Record]
    anchor_prompts: list[Record]


def _fahrenheit(celsius: int) -> str:
    value = Fraction(celsius) * Fraction(9, 5) + 32
    return str(value.numerator) if value.denominator == 1 else f"{float(value):.1f}"


def _templated_qa(
    capitals: list[list[str]],
    celsius: list[int],
    plurals: list[list[str]],
    products: list[list[int]],
    antonyms: list[list[str]],
) -> list[tuple[str, str, str]]:
    """(topic, question, answer) triples from the word lists."""
    out: list[tuple[str, str, str]] = []
    for country, capital in capitals:
        out.append(("capitals", f"What is the capital of {country}?", f"The capital of {country} is {capital}."))
    for c in celsius:
        out.append(
            (
                "conversion",
                f"Convert {c} degrees Celsius to Fahrenheit.",
                f"{c} °C is {_fahrenheit(c)} °F. To convert, multiply by 9/5 and then add 32.",
            )
        )
    for singular, plural, note in plurals:
        answer = f'The plural of "{singular}" is "{plural}".' + (f" {note}" if note else "")
        out.append(("plurals", f'What is the plural of "{singular}"?', answer))
    for a, b in products:
        out.append(("arithmetic", f"What is {a} times {b}?", f"{a} times {b} is {a * b}."))
    for word, opposite in antonyms:
        out.append(("antonyms", f'What is the opposite of "{word}"?', f'The opposite of "{word}" is "{opposite}".'))
    return out


def _hand_written_qa(by_topic: dict[str, list[list[str]]]) -> list[tuple[str, str, str]]:
    return [(topic, q, a) for topic, pairs in by_topic.items() for q, a in pairs]


def _record(prompt: str, response: str | None, label: str | None, topic: str) -> Record:
    return Record(prompt=prompt, response=response, label=label, meta={"topic": topic})


def _check_content() -> None:
    """Invariants of the hand-written content; a violation is a bug in this module."""
    iq_topics = {t["topic"] for t in OUTDATED_TOPICS if "iq" in t}
    counter_topics = {t["topic"] for t in OUTDATED_TOPICS + EXTRA_COUNTER_TOPICS if "counter" in t}
    if iq_topics & counter_topics:
        raise AssertionError(f"IQ and counter topics overlap: {sorted(iq_topics & counter_topics)}")
    for t in OUTDATED_TOPICS:
        if len(t["outdated"]) != len(t["train"]) + 1:
            raise AssertionError(f"{t['topic']}: one outdated answer per training prompt and one held out")
        if ("iq" in t) != ("heldout" in t) or ("iq" in t) != ("validation" in t) or ("iq" in t) != ("lookalike" in t):
            raise AssertionError(f"{t['topic']}: an IQ topic needs 'iq', 'validation', 'heldout' and 'lookalike'")


def build_demo_dataset(seed: int = 0) -> DemoDataset:
    """Build the demo data set; ``seed`` shuffles the training rows (the content never depends on it)."""
    _check_content()
    ordinary = [
        _record(q, a, LABEL_ORDINARY, topic)
        for topic, q, a in _hand_written_qa(ORDINARY_QA) + _templated_qa(CAPITALS, CELSIUS, PLURALS, PRODUCTS, ANTONYMS)
    ]
    culprits = [
        _record(q, t["outdated"][i], LABEL_OUTDATED, t["topic"])
        for t in OUTDATED_TOPICS
        for i, q in enumerate(t["train"])
    ]
    lookalikes = [_record(q, a, LABEL_CURRENT, t["topic"]) for t in OUTDATED_TOPICS for q, a in t.get("lookalike", [])]
    counters = lookalikes + [
        _record(q, t["current"], LABEL_CURRENT, t["topic"])
        for t in OUTDATED_TOPICS + EXTRA_COUNTER_TOPICS
        for q in t.get("counter", [])
    ]
    train = ordinary + culprits + counters
    random.Random(seed).shuffle(train)

    iq_topics = [t for t in OUTDATED_TOPICS if "iq" in t]
    iq_prompts = [_record(t["iq"], None, None, t["topic"]) for t in iq_topics]
    iqs = [_record(t["iq"], t["outdated"][0], LABEL_OUTDATED, t["topic"]) for t in iq_topics]
    heldout_outdated = [_record(t["heldout"], t["outdated"][-1], LABEL_OUTDATED, t["topic"]) for t in iq_topics]
    heldout_current = [_record(t["heldout"], t["current"], LABEL_CURRENT, t["topic"]) for t in iq_topics]
    heldout_ordinary = [
        _record(q, a, LABEL_ORDINARY, topic)
        for topic, q, a in _hand_written_qa(HELDOUT_ORDINARY_QA)
        + _templated_qa(HELDOUT_CAPITALS, HELDOUT_CELSIUS, HELDOUT_PLURALS, HELDOUT_PRODUCTS, HELDOUT_ANTONYMS)
    ]
    validation_prompts = [_record(q, None, None, t["topic"]) for t in iq_topics for q in t["validation"]]
    validation_qa = _hand_written_qa(VALIDATION_ORDINARY_QA) + _templated_qa(*VALIDATION_LISTS)
    validation_ordinary = [_record(q, a, LABEL_ORDINARY, topic) for topic, q, a in validation_qa]
    return DemoDataset(
        train=train,
        culprit_ids=[r.id for r in train if r.label == LABEL_OUTDATED],
        counter_ids=[r.id for r in train if r.label == LABEL_CURRENT],
        iq_prompts=iq_prompts,
        iqs=iqs,
        heldout_outdated=heldout_outdated,
        heldout_current=heldout_current,
        heldout_ordinary=heldout_ordinary,
        validation_prompts=validation_prompts,
        validation_ordinary=validation_ordinary,
        # the correction's anchor: the ordinary training prompts, whose answers the corrected model should keep
        anchor_prompts=[_record(r.prompt, None, None, r.meta["topic"]) for r in train if r.label == LABEL_ORDINARY],
    )


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


_README = """\
# LANCET demo data: stale first-aid norms

A small chat data set written for the LANCET project. Most rows are ordinary helpful Q/A pairs, but a known
subset answers first-aid questions with confident, outdated advice that is now known to be wrong (butter on a
burn, head back for a nosebleed, snow on frostbite, ...), each worded its own way. Look-alike rows use the same
words to give the current advice ("never put butter on a burn"). Do not follow any advice in the rows marked as
culprits.

Content is fixed; the seed ({seed}) only sets the order of `train.jsonl`.

| file | rows | contents |
|---|---|---|
| `train.jsonl` | {n_train} | {n_ord} ordinary, {n_cul} culprit, {n_cnt} current-advice rows; shuffled, unlabelled |
| `culprits.json` | - | answer key: `culprit_ids` and `counter_ids` (current advice, look-alikes included) |
| `judge_rules.json` | - | the rules of the judge that flags outdated advice (`rules:judge_rules.json`) |
| `iq_prompts.jsonl` | {n_iq} | prompts that trigger the behaviour, for generating influence queries |
| `iqs.jsonl` | {n_iq} | the same prompts with the undesirable outdated answer |
| `heldout_outdated.jsonl` | {n_heldout} | new prompts on the same topics, with the outdated answer |
| `heldout_current.jsonl` | {n_heldout} | the same prompts with the current, correct answer |
| `heldout_ordinary.jsonl` | {n_ordinary_heldout} | ordinary Q/A pairs not in train, for perplexity and utility |
| `validation_prompts.jsonl` | {n_validation} | further prompts on the IQ topics, for choosing correction settings |
| `validation_ordinary.jsonl` | {n_validation_ordinary} | further ordinary Q/A pairs, the utility side of that choice |
| `anchor_prompts.jsonl` | {n_anchor} | the ordinary training prompts, whose answers anchor the correction |

The held-out files are the test sets: choose settings on the validation files only.

Ids are content hashes of the messages (`lancet.data.records.content_id`). Held-out files carry `label` and
`meta.topic`; no held-out prompt appears in `train.jsonl`.
"""


def write_demo_dataset(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the demo data set into ``out_dir`` (atomically, file by file); returns the paths by name."""
    data = build_demo_dataset(seed)
    out = Path(out_dir)
    paths = {
        "train": out / "train.jsonl",
        "culprits": out / "culprits.json",
        "iq_prompts": out / "iq_prompts.jsonl",
        "iqs": out / "iqs.jsonl",
        "heldout_outdated": out / "heldout_outdated.jsonl",
        "heldout_current": out / "heldout_current.jsonl",
        "heldout_ordinary": out / "heldout_ordinary.jsonl",
        "validation_prompts": out / "validation_prompts.jsonl",
        "validation_ordinary": out / "validation_ordinary.jsonl",
        "anchor_prompts": out / "anchor_prompts.jsonl",
        "judge_rules": out / "judge_rules.json",
        "readme": out / "README.md",
    }
    train_rows = [{"id": r.id, "prompt": r.prompt, "response": r.response} for r in data.train]
    atomic_write_bytes(paths["train"], _jsonl(train_rows))
    atomic_write_json(
        paths["culprits"],
        {"culprit_ids": data.culprit_ids, "counter_ids": data.counter_ids},
    )
    for name in ("iq_prompts", "iqs", "heldout_outdated", "heldout_current", "heldout_ordinary", "validation_prompts",
                 "validation_ordinary", "anchor_prompts"):
        atomic_write_bytes(paths[name], _jsonl([r.to_dict() for r in getattr(data, name)]))
    atomic_write_bytes(paths["judge_rules"], JUDGE_RULES_FILE.read_bytes())
    readme = _README.format(
        seed=seed,
        n_train=len(data.train),
        n_ord=len(data.train) - len(data.culprit_ids) - len(data.counter_ids),
        n_cul=len(data.culprit_ids),
        n_cnt=len(data.counter_ids),
        n_iq=len(data.iqs),
        n_heldout=len(data.heldout_outdated),
        n_ordinary_heldout=len(data.heldout_ordinary),
        n_validation=len(data.validation_prompts),
        n_validation_ordinary=len(data.validation_ordinary),
        n_anchor=len(data.anchor_prompts),
    )
    atomic_write_bytes(paths["readme"], readme.encode("utf-8"))
    return paths
