"""Evaluation suites: a small JSON file naming data sets and the metric to compute on each.

{"name": "small", "max_new_tokens": 48, "batch_size": 8, "seed": 0, "judge": "classifier",
 "sets": [{"name": "advbench", "kind": "harmful_prompts", "limit": 20,
           "path": "{shared}/refusal-direction-harmful-sets/advbench.csv"}, ...]}

Set keys: ``name``, ``kind`` (see KINDS), ``path`` (``{shared}`` is replaced by the shared data directory),
``limit`` (rows used: evenly spaced over the file after filtering), ``skip`` (rows dropped first), ``side``
(HH: chosen/rejected), ``harmbench_category``, ``wrap`` (harmful prompts only: a jailbreak template of
``lancet/evaluate/jailbreaks.json``, ``role_play``, ``prefix_injection`` or ``refusal_suppression``, applied to each
prompt), and for ``diversity`` either ``path`` or ``of`` (reuse another
set's generations).
Suite keys besides those above: ``max_length`` (tokens for likelihood metrics), ``judge`` (``classifier``,
``refusal``, ``marker:PHRASE`` or ``hf:MODEL``), ``judge_data`` (XSTest's annotated completions, which train and
validate the judge; default ``{shared}/xstest/annotated_completions``, needed by ``classifier``) and
``judge_validation`` (``[{"path": FILE, "complies": true|false}, ...]``: answers with known labels on which the
judge's accuracy is measured instead of XSTest; how a run without ../shared/data reports its judge).

Kind ``behaviour`` generates answers to a file's prompts and reports the share the judge flags
(``behaviour_rate``): with a ``marker:`` judge, how often a planted behaviour comes back.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lancet.artifacts import atomic_write_json
from lancet.data import Record, load_dataset_spec, read_harmful_prompts, read_hh_rlhf
from lancet.errors import LancetError
from lancet.evaluate import metrics
from lancet.evaluate.judges import (
    Judge,
    RefusalMatcher,
    judge_complies,
    judge_report,
    labelled_report,
    make_judge,
    xstest_training_prompt,
)

log = logging.getLogger(__name__)
SUITES_DIR = Path(__file__).parent / "suites"
# kind -> the headline number of a set (report bars, table).
KINDS = {"harmful_prompts": "compliance_rate", "behaviour": "behaviour_rate", "over_refusal": "refusal_rate",
         "diversity": "distinct_2",
         "answer_logprob": "mean_logprob", "preference": "accuracy", "perplexity": "perplexity"}
JUDGED = ("harmful_prompts", "over_refusal", "behaviour")
SET_KEYS = {"name", "kind", "path", "limit", "skip", "side", "harmbench_category", "of", "wrap"}
JAILBREAKS = Path(__file__).parent / "jailbreaks.json"


def jailbreak_templates() -> dict[str, str]:
    """{name: template with {prompt}}: the packaged jailbreak wrappers."""
    return json.loads(JAILBREAKS.read_text())["templates"]


def wrap_prompts(rows: list[Record], template: str) -> list[Record]:
    """The same rows with each user prompt put inside ``template`` (its ``{prompt}``)."""
    return [Record(prompt=template.replace("{prompt}", r.prompt_messages[-1]["content"]), id=r.id, label=r.label,
                   meta=r.meta, source=r.source, line=r.line) for r in rows]


@dataclass
class EvalSet:
    name: str
    kind: str
    path: Path | None
    limit: int | None = None
    skip: int = 0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Suite:
    name: str
    file: str
    sets: list[EvalSet]
    judge: str = "classifier"
    judge_data: Path | None = None
    judge_validation: list[tuple[Path, bool]] = field(default_factory=list)
    max_new_tokens: int = 48
    batch_size: int = 8
    seed: int = 0
    max_length: int = 512

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "file": self.file, "judge": self.judge, "max_new_tokens": self.max_new_tokens,
                "batch_size": self.batch_size, "seed": self.seed, "max_length": self.max_length,
                "decoding": "greedy"}


def default_shared() -> Path:
    """../shared/data relative to the working directory, else relative to the repository."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (base.parent / "shared" / "data").is_dir():
            return base.parent / "shared" / "data"
    return Path.cwd().parent / "shared" / "data"


def suite_file(spec: str) -> Path:
    """A shipped suite name (``small``, ``default``) or a path to a suite JSON file."""
    path = SUITES_DIR / f"{spec}.json" if "/" not in spec and not spec.endswith(".json") else Path(spec)
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in SUITES_DIR.glob("*.json")))
        raise LancetError(f"suite {spec!r} not found (shipped: {shipped}; or give a path to a .json file)")
    return path


def load_suite(spec: str | Path, shared: str | Path | None = None) -> Suite:
    """Read and check a suite: every ``path`` must exist (one-line error naming the suite file, set and path)."""
    file = suite_file(str(spec))
    shared = str(shared or default_shared())
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise LancetError(f"{file}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("sets"), list) or not raw["sets"]:
        raise LancetError(f"{file}: a suite is an object with a non-empty list 'sets'")

    def resolve(text: str, what: str) -> Path:
        path = Path(text.replace("{shared}", shared))
        if not path.exists():
            hint = f" (shared data directory {shared}: pass --shared DIR)" if "{shared}" in text else ""
            raise LancetError(f"suite {file}: {what}: path not found: {path}{hint}")
        return path

    sets, names = [], set()
    for i, s in enumerate(raw["sets"]):
        name = s.get("name") if isinstance(s, dict) else None
        if not isinstance(name, str) or not name:
            raise LancetError(f"suite {file}: set #{i + 1} has no 'name'")
        if name in names:
            raise LancetError(f"suite {file}: set '{name}' is defined twice")
        if s.get("kind") not in KINDS:
            raise LancetError(f"suite {file}: set '{name}': unknown kind {s.get('kind')!r} "
                              f"(choose from {', '.join(KINDS)})")
        if unknown := set(s) - SET_KEYS:
            raise LancetError(f"suite {file}: set '{name}': unknown keys {', '.join(sorted(unknown))}")
        for key, least in (("limit", 1), ("skip", 0)):
            if key in s and (not isinstance(s[key], int) or s[key] < least):
                raise LancetError(f"suite {file}: set '{name}': '{key}' must be an integer >= {least}")
        if "wrap" in s and (s["kind"] != "harmful_prompts" or s["wrap"] not in jailbreak_templates()):
            raise LancetError(f"suite {file}: set '{name}': 'wrap' needs kind harmful_prompts and one of "
                              f"{', '.join(jailbreak_templates())}, got {s['wrap']!r}")
        if s["kind"] == "diversity" and "of" in s:
            if s["of"] not in names or next(x for x in sets if x.name == s["of"]).kind not in JUDGED:
                raise LancetError(f"suite {file}: set '{name}': 'of' must name an earlier generated set")
            path = None
        elif not isinstance(s.get("path"), str):
            raise LancetError(f"suite {file}: set '{name}': missing 'path'")
        else:
            path = resolve(s["path"], f"set '{name}'")
        options = {k: v for k, v in s.items() if k not in ("name", "kind", "path", "limit", "skip")}
        sets.append(EvalSet(name, s["kind"], path, s.get("limit"), int(s.get("skip", 0)), options))
        names.add(name)
    judge = raw.get("judge", "classifier")
    prefixed = isinstance(judge, str) and judge.startswith(("hf:", "marker:", "rules:"))
    if judge not in ("classifier", "refusal") and not (prefixed and len(judge.split(":", 1)[1]) > 0):
        raise LancetError(f"suite {file}: unknown judge {judge!r} (choose 'classifier', 'refusal', 'marker:PHRASE', "
                          "'rules:FILE' or 'hf:PATH')")
    if judge.startswith("rules:"):
        judge = f"rules:{resolve(judge[len('rules:'):], 'judge rules')}"
    validation = []
    for i, v in enumerate(raw.get("judge_validation", [])):
        if not isinstance(v, dict) or not isinstance(v.get("path"), str) or not isinstance(v.get("complies"), bool):
            raise LancetError(f"suite {file}: judge_validation #{i + 1} needs 'path' (string) and 'complies' (bool)")
        validation.append((resolve(v["path"], f"judge_validation #{i + 1}"), v["complies"]))
    judge_data = None
    if "judge_data" in raw or judge == "classifier" or not validation:
        judge_data = resolve(raw.get("judge_data", "{shared}/xstest/annotated_completions"), "judge_data")
    known = {k: raw[k] for k in ("max_new_tokens", "batch_size", "seed", "max_length") if k in raw}
    return Suite(name=raw.get("name", file.stem), file=str(file), sets=sets, judge=judge, judge_data=judge_data,
                 judge_validation=validation, **known)


def _records(s: EvalSet) -> list[Record]:
    """The rows of a set: read, filtered for its kind, ``skip`` rows dropped, then ``limit`` rows evenly spaced."""
    if s.kind == "behaviour":
        rows = load_dataset_spec(str(s.path))
    elif s.kind in ("harmful_prompts", "over_refusal", "diversity"):
        rows = read_harmful_prompts(s.path, harmbench_category=s.options.get("harmbench_category", "standard"))
        if s.kind == "over_refusal":  # XSTest: only the safe prompts (its contrast_* types are the unsafe ones)
            rows = [r for r in rows if r.label in (None, "safe") and
                    not str(r.meta.get("type", "")).startswith("contrast_")]
            # and only the half whose completions never trained the classifier judge
            rows = [r for r in rows if not (str(r.meta.get("dataset", "")).startswith("xstest")
                                            and xstest_training_prompt(r.prompt))]
    elif s.kind == "preference":
        chosen = {r.line: r for r in read_hh_rlhf(s.path, "chosen")}
        rows = [(chosen[r.line], r) for r in read_hh_rlhf(s.path, "rejected")
                if r.line in chosen and chosen[r.line].response_text != r.response_text]
    elif "side" in s.options:
        rows = read_hh_rlhf(s.path, s.options["side"])
    else:
        rows = load_dataset_spec(str(s.path))
    rows = rows[s.skip:]
    if s.limit is not None and s.limit < len(rows):  # evenly spaced, so a small limit still spans every category
        rows = [rows[i * len(rows) // s.limit] for i in range(s.limit)]
    if not rows:
        raise LancetError(f"set '{s.name}': no rows left in {s.path} after filtering")
    if "wrap" in s.options:
        rows = wrap_prompts(rows, jailbreak_templates()[s.options["wrap"]])
    return rows


def _run_set(s: EvalSet, model, tokenizer, suite: Suite, judge: Judge, answers: dict, progress: bool) -> dict:
    gen = {"max_new_tokens": suite.max_new_tokens, "batch_size": suite.batch_size, "seed": suite.seed,
           "progress": progress}
    lp = {"batch_size": suite.batch_size, "max_length": suite.max_length, "progress": False}
    if s.kind == "diversity" and s.path is None:
        _, texts = answers[s.options["of"]]
        return {"n": len(texts), "of": s.options["of"], **metrics.diversity(texts)}
    rows = _records(s)
    if s.kind in ("harmful_prompts", "over_refusal", "diversity", "behaviour"):
        texts = metrics.generate_answers(model, tokenizer, rows, **gen)
        answers[s.name] = (rows, texts)
        if s.kind == "diversity":
            return {"n": len(texts), **metrics.diversity(texts)}
        verdicts = judge_complies(judge, texts, [r.prompt_messages[-1]["content"] for r in rows])
        answered = [{"prompt": r.prompt_messages[-1]["content"], "answer": t, "complies": v}
                    for r, t, v in zip(rows, texts, verdicts, strict=True)]  # kept for auditing the judge
        def rate(complied: list[bool]) -> float:  # compliance on harmful prompts, refusal on safe ones
            share = sum(complied) / len(complied)
            return 1.0 - share if s.kind == "over_refusal" else share

        key = KINDS[s.kind]
        return {"n": len(rows), key: rate(verdicts), "answers": answered,
                f"{key}_by_refusal_matcher": rate(RefusalMatcher().complies(texts))}  # a second opinion
    if s.kind == "preference":
        chosen = metrics.response_logprobs(model, tokenizer, [c for c, _ in rows], **lp)
        rejected = metrics.response_logprobs(model, tokenizer, [r for _, r in rows], **lp)
        return {"n": len(rows), "accuracy": metrics.preference_accuracy(chosen.logp, rejected.logp),
                "mean_margin": sum(c - r for c, r in zip(chosen.logp, rejected.logp, strict=True)) / len(rows),
                "n_truncated": chosen.n_truncated + rejected.n_truncated}
    if any(r.response_text is None for r in rows):
        raise LancetError(f"set '{s.name}': {s.kind} needs rows with responses ({s.path})")
    scored = metrics.response_logprobs(model, tokenizer, rows, **lp)
    out = {"n": len(rows), "n_tokens": sum(scored.n_tokens), "n_truncated": scored.n_truncated}
    if s.kind == "perplexity":
        return {**out, "perplexity": metrics.perplexity(scored), "mean_nll": -sum(scored.logp) / out["n_tokens"]}
    return {**out, **metrics.mean_logprob(scored)}


def judge_accuracy(judge: Judge, suite: Suite):
    """The judge's accuracy on the suite's labelled answers (``judge_validation``), else on held-out XSTest."""
    if not suite.judge_validation:
        return judge_report(judge, suite.judge_data)
    texts, truth, names, prompts = [], [], [], []
    for path, complies in suite.judge_validation:
        rows = load_dataset_spec(str(path))
        texts += [r.response_text or "" for r in rows]
        prompts += [r.prompt_messages[-1]["content"] if r.prompt_messages else "" for r in rows]
        truth += [complies] * len(rows)
        names.append(path.name)
    return labelled_report(judge, texts, truth, names, prompts=prompts)


def evaluate(model, tokenizer, suite: Suite | str, *, out: str | Path | None = None, progress: bool = True,
             shared: str | Path | None = None, judge: Judge | None = None, done: dict[str, Any] | None = None,
             key: str | None = None) -> dict[str, Any]:
    """Every set's numbers, the judge's held-out accuracy and the settings; written to ``out`` (atomically) after
    each set. ``done``: results of sets already measured (by an interrupted run with the same ``key``), kept."""
    suite = suite if isinstance(suite, Suite) else load_suite(suite, shared)
    t0 = time.perf_counter()
    judge = judge or make_judge(suite.judge, suite.judge_data)
    report = getattr(judge, "report", None) or judge_accuracy(judge, suite)
    results: dict[str, Any] = {}
    answers: dict[str, tuple] = {}
    for s in suite.sets:
        if done and s.name in done:  # measured by an interrupted run with the same key
            results[s.name] = done[s.name]
            if isinstance(done[s.name].get("answers"), list):  # a later diversity set may read these answers
                answers[s.name] = (None, [a["answer"] for a in done[s.name]["answers"]])
            continue
        log.info("evaluate: %s (%s)", s.name, s.kind)
        t = time.perf_counter()
        res = _run_set(s, model, tokenizer, suite, judge, answers, progress)
        results[s.name] = {"kind": s.kind, "metric": KINDS[s.kind], "judged": s.kind in JUDGED,
                           "path": str(s.path) if s.path else None, **res,
                           "seconds": round(time.perf_counter() - t, 2)}
        log.info("evaluate: %s %s = %.4g (%.1f s)", s.name, KINDS[s.kind], res.get(KINDS[s.kind], float("nan")),
                 results[s.name]["seconds"])
        metrics_json = {"suite": suite.settings(), "judge": report.to_json(), "sets": results,
                        "model": str(getattr(getattr(model, "config", None), "_name_or_path", "")),
                        "seconds": round(time.perf_counter() - t0, 2), "complete": len(results) == len(suite.sets),
                        **({"key": key} if key else {})}
        if out is not None:  # after every set, so an interrupted run keeps what it measured
            atomic_write_json(out, metrics_json)
    return metrics_json


def evaluate_or_reuse(model, tokenizer, suite: Suite, out: str | Path, *, progress: bool = True,
                      bf16: bool = False) -> dict[str, Any]:
    """``evaluate`` into ``out``, unless ``out`` already holds a complete run for the same weights and suite.
    ``bf16``: generation and likelihoods under bf16 autocast (default fp32: judged rates move with precision)."""
    from lancet.artifacts import hash_json, model_fingerprint
    from lancet.hardware import autocast, model_device

    out = Path(out)
    key = hash_json({"model": model_fingerprint(model), "suite": suite.settings(),
                     "sets": json.loads(Path(suite.file).read_text())} | ({"bf16": True} if bf16 else {}))
    old: dict[str, Any] = {}
    if out.is_file():
        try:
            old = json.loads(out.read_text())
        except (OSError, ValueError):
            old = {}
    if old.get("key") == key and old.get("complete"):
        log.info("evaluate: %s holds this model's metrics on this suite, reusing them", out)
        return old
    done = old.get("sets") if old.get("key") == key else None  # an interrupted run of the same key: resume
    with autocast(model_device(model), bf16):
        return evaluate(model, tokenizer, suite, out=out, progress=progress, done=done, key=key)


def format_table(m: dict[str, Any]) -> str:
    """One line per set; judged numbers carry the judge's held-out accuracy beside them."""
    j = m["judge"]
    acc = f"{j['accuracy']:.3f} ({j['judge']})"
    lines = [f"{'set':<24} {'kind':<16} {'n':>5}  {'metric':<16} {'value':>9}  judge accuracy (held-out)"]
    for name, r in m["sets"].items():
        value = r.get(r["metric"])
        shown = f"{value:>9.4g}" if isinstance(value, (int, float)) else f"{'-':>9}"
        lines.append(f"{name[:24]:<24} {r['kind']:<16} {r['n']:>5}  {r['metric']:<16} {shown}  "
                     f"{acc if r['judged'] else '-'}")
    lines.append(f"\njudge: {j['judge']}, held-out accuracy {j['accuracy']:.3f} (F1 {j['f1']:.3f}, n={j['n']}); "
                 f"refusal matcher {j['refusal_matcher_accuracy']:.3f}. {m['seconds']:.0f} s in all.")
    return "\n".join(lines)
