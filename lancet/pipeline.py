"""`lancet run CONFIG`: the whole pipeline on a user's model, data and queries, stage by stage, resumable.

Stages (each writes into ``out`` and is skipped on a rerun when its output is complete and was made from the same
inputs; an interrupted stage resumes from its last checkpoint or chunk):

1. ``finetune`` (optional): fine-tune ``model`` on ``train`` -> ``out/model`` (the model to audit and correct).
2. ``iqs``: the influence queries: given (``iqs``: prompt + undesirable answer rows), or the model's own answers to
   ``iq_prompts`` that ``iq_judge`` flags -> ``out/iqs.jsonl``.
3. ``attribute``: influence of every training row on the IQs -> ``out/influence-<method>.json``,
   ``ranking-<method>.safetensors``, per-token scores of the top rows ``tokens-<method>.json``.
4. ``correct``: IBO (or a baseline) from the ranking -> ``out/corrected``.
5. ``evaluate`` (when a suite is given): before and after -> ``out/metrics_before.json``, ``metrics_after.json``.
6. ``report``: ``out/report.html`` + ``report.json``.

A config is a JSON object of ``RunConfig`` fields; relative paths in it are relative to the config file.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from lancet.artifacts import atomic_write_bytes, atomic_write_json
from lancet.constants import DEFAULT_MAX_LENGTH
from lancet.curvature.estimators import GRADIENT_FREE_METHODS
from lancet.data.records import records_to_jsonl
from lancet.errors import LancetError
from lancet.hardware import settings
from lancet.options import OptionError, check_option_types, short_repr

log = logging.getLogger(__name__)

PATH_FIELDS = ("train", "iqs", "iq_prompts", "labels", "safe", "pairs", "anchor_prompts", "evaluate", "shared")
SELECT_PATH_FIELDS = ("prompts", "ordinary")
# what the correction trains with unless the config says otherwise: a short, gentle IBO run (docs/method.md §3);
# its precision comes from the config's "precision" like every stage's
DEFAULT_CORRECTION_TRAIN = {"max_steps": 30, "batch_size": 8, "lr": 1e-5, "save_every": 10}


@dataclass
class RunConfig:
    """One pipeline run. ``finetune``, ``influence``, ``correction`` and ``correction_train`` hold the fields of
    ``TrainArgs``, ``InfluenceArgs``, ``CorrectionArgs`` and ``TrainArgs`` (``output_dir`` is set by the run)."""

    model: str
    train: str
    out: str = "lancet_run"
    finetune: dict[str, Any] | None = None
    iqs: str | None = None
    iq_prompts: str | None = None
    iq_judge: str = "refusal"
    labels: str | None = None
    influence: dict[str, Any] = field(default_factory=dict)
    correction: dict[str, Any] = field(default_factory=lambda: {"method": "ibo"})
    correction_train: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_CORRECTION_TRAIN))
    safe: str | None = None
    pairs: str | None = None
    # prompts whose answers by the model being corrected are the retain rows of the correction's anchor (its own
    # behaviour where it is fine; docs/method.md §3.6; needs a retain term), less those "anchor_judge" flags (a judge
    # that reads the behaviour whatever the prompt, e.g. the IQ judge's rules; none: keep every non-blank answer)
    anchor_prompts: str | None = None
    anchor_judge: str | None = None
    # a judge run over the training rows' answers for correction.judged_rows (dispreferred rows among those it flags,
    # preferred among the others; docs/method.md §3.3): one that reads the behaviour whatever the prompt
    row_judge: str | None = None
    evaluate: str | None = None
    shared: str | None = None
    max_length: int = DEFAULT_MAX_LENGTH
    max_new_tokens: int = 48
    top_k: int = 10
    # with "labels": further methods ranked for comparison only (recall printed beside the main method's), e.g.
    # ["repsim", "bm25", "random"]; "random" is the mean of seeded random rankings
    compare: list[str] = field(default_factory=list)
    token_rows: int = 3
    contrast_response: str | None = None
    # choose the correction's checkpoint on validation prompts (``SelectArgs``; docs/method.md §3.7); the suite in
    # "evaluate" is then the test set, read once, on the chosen model
    select: dict[str, Any] | None = None
    # correct until fixed: up to ``rounds`` rounds of detect -> attribute -> correct -> choose, stopping once the
    # chosen model's validation behaviour is <= ``target_rate`` (needs "select" and "iq_prompts")
    rounds: int = 1
    target_rate: float | None = None
    # rank the IQs from a gradient index (lancet.influence.index; ``IndexArgs`` keys: rank, projection, rank_by,
    # dtype, shard_rows) instead of a scoring pass; with rounds, "reuse": true answers later rounds' IQs from round
    # 0's index (the corrected model's query gradients against the original model's rows), and "check_overlap": true
    # also runs a fresh pass on the corrected model and reports the top-100 overlap of the two rankings
    index: dict[str, Any] | None = None
    trust_remote_code: bool = False
    # where and how every stage computes (lancet.hardware): "auto" = CUDA when available; precision "auto" = bf16
    # on CUDA and on CPUs with native bf16, else fp32. A stage's own "bf16" key (finetune, influence, ...) wins.
    # Evaluation runs at fp32: judged rates before and after must not move with precision.
    device: str = "auto"
    precision: str = "auto"

    def __post_init__(self) -> None:
        from lancet.correct import CorrectionArgs
        from lancet.influence import InfluenceArgs
        from lancet.train import TrainArgs

        if (self.iqs is None) == (self.iq_prompts is None):
            raise LancetError("run config: give exactly one of 'iqs' (prompt + undesirable answer rows) and "
                              "'iq_prompts' (prompts whose flagged answers become the IQs)")
        for name in ("model", "train", "out", "iq_judge"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise LancetError(f"run config: '{name}' must be a non-empty string")
        from lancet.hardware import PRECISIONS

        if self.precision not in PRECISIONS:
            raise LancetError(f"run config: 'precision' must be one of {', '.join(PRECISIONS)}")
        if not isinstance(self.device, str) or not self.device:
            raise LancetError("run config: 'device' must be a string (auto, cpu, cuda or cuda:N)")
        if self.rounds != 1 and (self.select is None or self.iq_prompts is None):
            raise LancetError("run config: 'rounds' > 1 needs 'select' (validation files) and 'iq_prompts' (each "
                              "round takes the corrected model's remaining flagged answers)")
        from lancet.curvature.estimators import METHODS

        if not isinstance(self.compare, list) or any(m not in (*METHODS, "random") for m in self.compare):
            raise LancetError(f"run config: 'compare' must be a list of methods from {', '.join(METHODS)}, random")
        if self.anchor_judge is not None and self.anchor_prompts is None:
            raise LancetError("run config: 'anchor_judge' filters the answers to 'anchor_prompts', which is missing")
        if self.compare and self.labels is None:
            raise LancetError("run config: 'compare' needs 'labels' (the known culprit rows to measure recall on)")
        if self.target_rate is not None and not (isinstance(self.target_rate, int | float)
                                                 and 0 <= self.target_rate <= 1):
            raise LancetError("run config: 'target_rate' must be a number in [0, 1]")
        for name in ("max_length", "max_new_tokens", "top_k", "rounds"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise LancetError(f"run config: '{name}' must be an integer >= 1")
        try:  # every other key against its annotation ("iqs": 3, "finetune": "yes", "token_rows": "3", ...)
            check_option_types(self, "run config")
        except OptionError as exc:
            raise LancetError(f"run config: {exc.option}={short_repr(exc.value)}: {exc.reason}") from exc
        # validate the nested option sets now, so a typo fails before hours of fine-tuning
        if self.finetune is not None:
            _section("finetune", TrainArgs, self.finetune, lambda v: TrainArgs.from_json({**v, "output_dir": "-"}))
        _section("correction_train", TrainArgs, self.correction_train,
                 lambda v: TrainArgs.from_json({**v, "output_dir": "-"}))
        from lancet.influence.arguments import default_method
        from lancet.influence.behaviour import check_config, influence_options

        if "method" not in self.influence:  # resolved once, so every stage and the report read the same method
            self.influence = {**self.influence, "method": default_method(
                str(self.influence.get("measurement", "answer")),
                self.index is not None or self.contrast_response is not None)}
        _section("influence", InfluenceArgs, influence_options(self.influence), InfluenceArgs.from_json)
        check_config(self.influence, self.compare)  # influence.behaviour: given exactly when it is used
        _section("correction", CorrectionArgs, self.correction, CorrectionArgs.from_json)
        if self.correction.get("judged_rows", False) != (self.row_judge is not None):
            raise LancetError("run config: correction 'judged_rows' and 'row_judge' (the judge of the training rows' "
                              "answers) go together")
        if self.select is not None:
            from lancet.correct.select import SelectArgs

            _section("select", SelectArgs, self.select, SelectArgs.from_json)
        if self.index is not None:
            from lancet.influence import IndexArgs

            if self.contrast_response is not None:
                raise LancetError("run config: 'index' scores the IQs themselves; drop 'contrast_response' or 'index'")
            for key in INDEX_RUN_KEYS:
                if key in self.index and not isinstance(self.index[key], bool):
                    raise LancetError(f"run config: 'index.{key}' must be true or false")
            opts = {k: v for k, v in self.index.items() if k not in INDEX_RUN_KEYS}
            unknown = set(opts) - {f.name for f in fields(IndexArgs)}
            if unknown:
                raise LancetError(f"run config: unknown key(s) of 'index': {', '.join(sorted(unknown))}")
            _section("index", IndexArgs, opts, lambda v: IndexArgs(**v))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], base: Path | None = None) -> RunConfig:
        if not isinstance(data, dict):
            raise LancetError("run config: expected a JSON object")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise LancetError(f"run config: unknown key(s) {', '.join(sorted(unknown))}")
        missing = [k for k in ("model", "train") if k not in data]
        if missing:
            raise LancetError(f"run config: missing key(s) {', '.join(missing)}")
        data = dict(data)
        if base is not None:  # paths are relative to the config file; shipped suite names stay names
            for key in (*PATH_FIELDS, "out"):
                value = data.get(key)
                if isinstance(value, str) and not (key == "evaluate" and "/" not in value
                                                   and not value.endswith(".json")):
                    data[key] = _resolve(value, base)
            for key in ("iq_judge", "anchor_judge"):
                judge = data.get(key)
                if isinstance(judge, str) and judge.startswith("rules:") and len(judge) > 6:
                    data[key] = "rules:" + _resolve(judge[len("rules:"):], base)
            behaviour = data["influence"].get("behaviour") if isinstance(data.get("influence"), dict) else None
            if isinstance(behaviour, dict) and isinstance(behaviour.get("counter"), str):  # influence.behaviour.counter
                data["influence"] = {**data["influence"], "behaviour": {**behaviour, "counter": _resolve(
                    behaviour["counter"], base)}}
            if isinstance(data.get("select"), dict):
                data["select"] = {k: _resolve(v, base) if k in SELECT_PATH_FIELDS and isinstance(v, str) else v
                                  for k, v in data["select"].items()}
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise LancetError(f"{path}: cannot read the run config ({exc.strerror})") from exc
        except json.JSONDecodeError as exc:
            raise LancetError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
        try:
            return cls.from_json(data, base=path.resolve().parent)
        except LancetError as exc:  # "run.json: finetune.lr='1e-5': expected a number"
            raise LancetError(f"{path}: {str(exc).removeprefix('run config: ')}") from exc


def _section(name: str, cls: type, values: dict[str, Any], build) -> None:
    """Validate the nested option set ``name`` of a run config (``build(values)`` makes the ``cls`` dataclass), its
    errors worded as the config's keys: ``run config: finetune.lr='1e-5': expected a number``. The values' types are
    checked against ``cls``'s annotations first, so that a string where a number belongs stops here on one line
    whatever ``cls`` checks itself."""
    try:
        check_option_types(cls, name, values)
        build(values)
    except OptionError as exc:
        raise LancetError(f"run config: {name}.{exc.option}={short_repr(exc.value)}: {exc.reason}") from exc
    except LancetError as exc:
        message = str(exc)
        raise LancetError(f"run config: {message if message.startswith(f'{name}:') else f'{name}: {message}'}") \
            from exc


def _resolve(value: str, base: Path) -> str:
    """A data spec's path made absolute against ``base``; a ``kind:`` prefix (hh-rlhf:, jsonl:, ...) is kept."""
    prefix, sep, rest = value.partition(":")
    if sep and prefix and "/" not in prefix and len(prefix) > 1:
        return f"{prefix}:{_resolve(rest, base)}"
    path = Path(value)
    return str(path if path.is_absolute() else base / path)


class Pipeline:
    """Runs the stages of a ``RunConfig``; ``seconds`` records each stage's wall time."""

    def __init__(self, config: RunConfig, *, progress: bool = True):
        from lancet.hardware import decide

        self.config, self.progress = config, progress
        self.out = Path(config.out)
        self.seconds: dict[str, float] = {}
        self.round_data = None  # the current round's rows, read and encoded once (stage_attribute)
        self.device, self.precision = decide(config.device, config.precision)
        self.dir, self.prefix = self.out, ""  # the current round's directory and stage-name prefix

    def _train_json(self, options: dict[str, Any], output_dir: Path) -> dict[str, Any]:
        return {"bf16": self.precision.bf16, **options, "device": str(self.device), "output_dir": str(output_dir),
                "progress": self.progress}

    def _timed(self, name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        value = fn(*args, **kwargs)
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        return value

    def run(self) -> dict[str, Any]:
        from lancet.data import load_dataset_spec
        from lancet.models.loading import load_model

        c = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / "run_config.json", c.to_json())
        train = load_dataset_spec(c.train)
        model_spec = self._timed("finetune", self.stage_finetune, train) if c.finetune else c.model
        model, tokenizer = load_model(model_spec, trust_remote_code=c.trust_remote_code, device=self.device)
        rounds = self._rounds(model, tokenizer, model_spec, train)
        kept = self._kept_round(rounds)
        corrected = rounds[kept]["corrected"]
        metrics = {}
        if c.evaluate:  # the test suite: read once, after every choice was made
            metrics["before"] = self._timed("evaluate_before", self.stage_evaluate, model, tokenizer, "before")
            del model
            fixed, _ = load_model(str(corrected), device=self.device)
            metrics["after"] = self._timed("evaluate_after", self.stage_evaluate, fixed, tokenizer, "after")
        from lancet.report import write_report

        html, _ = self._timed("report", write_report, self.out)
        first = rounds[0]
        summary = {"model": model_spec, "corrected_model": str(corrected), "n_iqs": first["n_iqs"],
                   "attribution": first["attribution"], "metrics": metrics, "report": str(html),
                   "seconds": self.seconds, "hardware": settings(self.device, self.precision)}
        if first["selection"] is not None:
            summary["selection"] = first["selection"]
        if c.rounds > 1:
            summary["rounds"], summary["kept_round"] = [_round_row(r) for r in rounds], kept
        atomic_write_json(self.out / "run_summary.json", summary)
        return summary

    def _rounds(self, model, tokenizer, model_spec: str, train) -> list[dict[str, Any]]:
        """detect -> attribute -> correct (-> choose a checkpoint on validation), repeated on the corrected model's
        remaining flagged answers until ``target_rate`` is met, ``rounds`` are spent, a round finds no checkpoint
        that improves within the utility budget, or no IQ prompt's answer is flagged any more. Round 0 works in
        ``out`` itself, round r in ``out/round-r``."""
        from lancet.models.loading import load_model

        c = self.config
        rounds: list[dict[str, Any]] = []
        spec, current, baseline = model_spec, model, None
        for r in range(c.rounds):
            self.dir, self.prefix = (self.out, "") if r == 0 else (self.out / f"round-{r}", f"round{r}_")
            self.dir.mkdir(parents=True, exist_ok=True)
            if r > 0:
                current, _ = load_model(spec, trust_remote_code=c.trust_remote_code, device=self.device)
            result = self._round(r, current, tokenizer, spec, train, baseline)
            if r > 0:
                del current
            if result is None:
                log.info("round %d: no IQ prompt's answer is flagged any more; stopping", r)
                break
            rounds.append(result)
            if c.rounds > 1:
                atomic_write_json(self.out / "rounds.json", {"rounds": [_round_row(x) for x in rounds]})
            chosen = result["selection"]
            if chosen is None:
                break
            baseline = chosen["reference"]["perplexity"] if baseline is None else baseline
            point = next(p for p in chosen["curve"] if p["steps"] == chosen["chosen_steps"])
            if chosen["chosen_steps"] == 0:
                log.info("round %d: no checkpoint lowers the validation behaviour within the utility budget", r)
                break
            if c.target_rate is not None and point["behaviour"] <= c.target_rate:
                log.info("round %d: validation behaviour %.3f meets the target %.3f", r, point["behaviour"],
                         c.target_rate)
                break
            spec = str(result["corrected"])
        self.dir, self.prefix = self.out, ""
        return rounds

    def _round(self, r: int, model, tokenizer, model_spec: str, train, baseline: float | None
               ) -> dict[str, Any] | None:
        iqs = self._timed(f"{self.prefix}iqs", self.stage_iqs, model, tokenizer, required=r == 0)
        if not iqs:
            return None
        attribution = self._timed(f"{self.prefix}attribute", self.stage_attribute, model, tokenizer, train)
        selection = self._selection(model, tokenizer, model_spec, baseline) if self.config.select else None
        corrected = self._timed(f"{self.prefix}correct", self.stage_correct, model, tokenizer, model_spec, train,
                                selection)
        if selection is not None and not selection.measured:
            # a correction finished before this selection began (its cache gone, or the run directory moved): its
            # checkpoints were never measured, so it is trained again rather than chosen blind
            log.warning("%s finished before this checkpoint selection began; correcting again to measure its "
                        "checkpoints", corrected)
            shutil.rmtree(corrected)
            corrected = self._timed(f"{self.prefix}correct", self.stage_correct, model, tokenizer, model_spec, train,
                                    selection)
        chosen = None
        if selection is not None:
            corrected, chosen = selection.finish(corrected, model_spec)
        return {"round": r, "model": model_spec, "n_iqs": len(iqs), "attribution": attribution,
                "corrected": corrected, "selection": chosen}

    def _kept_round(self, rounds: list[dict[str, Any]]) -> int:
        """The round whose chosen model has the lowest validation behaviour (ties: the earlier round); utility is
        within the budget by construction, measured against the model before round 0."""
        if len(rounds) == 1:
            return 0
        rows = [_round_row(x) for x in rounds]
        return min(range(len(rows)), key=lambda i: (rows[i]["validation_behaviour"], i))

    # -- stages ---------------------------------------------------------------------------------------------------

    def stage_finetune(self, train) -> str:
        from lancet.finetune import finetune
        from lancet.train import TrainArgs

        c = self.config
        args = TrainArgs.from_json(self._train_json(c.finetune, self.out / "model"))
        return str(finetune(c.model, train, args, max_length=c.max_length, trust_remote_code=c.trust_remote_code))

    def stage_iqs(self, model, tokenizer, required: bool = True) -> list:
        """Given IQs are copied; generated ones are cached by (model, prompts, judge, decoding)."""
        from lancet.data import load_dataset_spec
        from lancet.errors import DataError
        from lancet.evaluate.judges import make_judge
        from lancet.influence.queries import take_iqs

        c = self.config
        path = self.dir / "iqs.jsonl"
        if c.iqs:
            records = load_dataset_spec(c.iqs)
            for r in records:
                if r.response_text is None:
                    raise DataError("influence queries need the undesirable response", path=r.source, line=r.line,
                                    field="response")
            data = records_to_jsonl(records)
            if not path.is_file() or path.read_bytes() != data:
                atomic_write_bytes(path, data)
            return records
        prompts = load_dataset_spec(c.iq_prompts)
        iqs = take_iqs(model, tokenizer, prompts, make_judge(c.iq_judge), self.dir, max_new_tokens=c.max_new_tokens,
                       progress=self.progress)
        if not iqs and required:
            raise LancetError(f"{c.iq_prompts}: the judge {c.iq_judge!r} flags none of the model's "
                              f"{len(prompts)} answers; give the undesirable answers with 'iqs' instead")
        return iqs

    def stage_attribute(self, model, tokenizer, train) -> dict[str, Any]:
        """Rank the training rows; the round's rows are read and encoded once here (``AttributionData``) and shared by
        the index, the ranking, the token scores and the compared methods, which are scored in one pass."""
        from lancet.influence import Influence, InfluenceArgs
        from lancet.influence.attribute import AttributionData, attribute
        from lancet.influence.behaviour import fit_config_direction, influence_options

        c = self.config
        args = InfluenceArgs.from_json({"bf16": self.precision.bf16, **influence_options(c.influence),
                                        "progress": self.progress})
        data = AttributionData.load(tokenizer, c.train, str(self.dir / "iqs.jsonl"), c.max_length, args.progress,
                                    c.labels, train_records=train)
        self.round_data = data  # the correction reads the same IQ records
        # influence.behaviour: a direction fitted on this round's model and IQs (docs/method.md 2.10), else None
        behaviour = fit_config_direction(model, tokenizer, data.queries, c.influence, args, c.max_length)
        influence = Influence(model, args, out_dir=self.dir, tokenizer=tokenizer, max_length=c.max_length,
                              behaviour=behaviour)
        tokens = args.method not in GRADIENT_FREE_METHODS and c.token_rows > 0
        # the token scores below use the same preconditioned IQs as the ranking (when it is not a contrast)
        influence.keep_queries = tokens and c.contrast_response is None
        index_dir, index_note = self._index(influence, data) if c.index else (None, None)
        summary = attribute(model, tokenizer, c.train, data.queries_spec, self.dir, args,
                            max_length=c.max_length, labels=c.labels, k=c.top_k,
                            contrast_response=c.contrast_response, influence=influence, index=index_dir,
                            index_any_model=bool(index_note and index_note["reused"]), data=data)
        if index_note and index_note["reused"] and c.index.get("check_overlap", False):
            index_note["top100_overlap_vs_fresh"] = self._fresh_overlap(model, tokenizer, args, summary, data,
                                                                        behaviour)
        if tokens:
            self._token_scores(tokenizer, influence, summary, data)
        out = {k: summary[k] for k in ("method", "n_train", "n_queries", "seconds", "top_positive", "top_negative")
               if k in summary} | ({"recall": summary["recall"]} if "recall" in summary else {})
        if index_note:
            out["index"] = index_note
        if c.compare and "recall" in summary:
            out["compare"] = {args.method: _recall_row(summary["recall"], summary["seconds"])}
            out["compare"] |= self._compare(influence, data)
        return out

    def _index(self, influence, data) -> tuple[Path, dict[str, Any]]:
        """The gradient index this round ranks from: round 0's (built here on round 0) when "reuse" is set, else one
        built on this round's model in its own directory."""
        from lancet.influence import IndexArgs

        c = self.config
        reuse = bool(c.index.get("reuse", False)) and self.dir != self.out
        index_dir = (self.out if reuse else self.dir) / "index"
        if not reuse:
            opts = {"bf16": influence.args.bf16, "batch_size": influence.args.batch_size, "progress": self.progress,
                    **{k: v for k, v in c.index.items() if k not in INDEX_RUN_KEYS}}
            influence.build_index(data.train, index_dir, IndexArgs(**opts))
        return index_dir, {"dir": str(index_dir), "reused": reuse}

    def _fresh_overlap(self, model, tokenizer, args, indexed: dict[str, Any], data, behaviour=None) -> float:
        """Top-100 overlap (of min(100, rows)) between this round's index ranking and a fresh scoring pass on this
        round's model (written to ``fresh/``)."""
        from lancet.correct import load_run_scores
        from lancet.influence.attribute import attribute
        from lancet.influence.recall import top_overlap

        c = self.config
        fresh = self.dir / "fresh"
        attribute(model, tokenizer, c.train, data.queries_spec, fresh, args, max_length=c.max_length, k=c.top_k,
                  data=data, behaviour=behaviour)
        ids = indexed["ids"]
        return round(top_overlap(load_run_scores(self.dir, ids, args.method)[0],
                                 load_run_scores(fresh, ids, args.method)[0], 100), 4)

    def _compare(self, influence, data) -> dict[str, dict[str, float]]:
        """Recall of each ``compare`` method on the same IQs and labels, all of them scored in one pass over the
        training rows (``attribute_methods``; each row's "seconds" is that shared pass's); the main method's ranking
        is untouched."""
        from lancet.influence.attribute import attribute_methods
        from lancet.influence.recall import random_baseline

        c, rows = self.config, {}
        methods = [m for m in c.compare if m != "random"]
        summaries = (attribute_methods(influence.model, influence.tokenizer, c.train, data.queries_spec, self.dir,
                                       influence.args, methods, max_length=c.max_length, k=c.top_k, data=data,
                                       influence=influence) if methods else {})
        for method in c.compare:
            if method == "random":
                rnd = random_baseline(data.culprits, key="recall@50")
                rows["random"] = {"average_precision": round(rnd["average_precision"], 4), "seconds": 0.0}
            else:
                rows[method] = _recall_row(summaries[method]["recall"], summaries[method]["seconds"])
        return rows

    def _token_scores(self, tokenizer, influence, summary: dict[str, Any], data) -> None:
        """Per-token scores of the top positive rows, averaged over the IQs (each IQ's scores divided by the
        mean |score| of that IQ over these rows, as the ranking's normalised mean does)."""
        c = self.config
        args = influence.args
        path = self.dir / f"tokens-{args.method}.json"
        wanted = [r["id"] for r in summary["top_positive"][: c.token_rows]]
        if path.is_file() and [r.get("id") for r in json.loads(path.read_text()).get("rows", [])] == wanted:
            return
        train, queries = data.train, data.queries
        rows = [train[train.ids.index(i)] for i in wanted]
        if not influence.fitted:  # the ranking was reused from disk: read the stored curvature back
            influence.fit(train)
        per_row = influence.token_scores(rows, queries)
        influence.release_queries()
        scale = torch.stack([s.double().sum(-1) for s in per_row], 1).abs().mean(1).clamp_min(1e-30)  # [Q]
        out_rows = []
        for row, s in zip(rows, per_row, strict=True):
            mean = (s.double() / scale[:, None]).mean(0)
            labels = row["labels"]
            start = max(next(i for i, t in enumerate(labels) if t != -100) - 1, 0)
            ids = row["input_ids"][start:]
            out_rows.append({"id": row["id"], "tokens": [tokenizer.decode([t]) for t in ids],
                             "scores": [round(float(v), 6) for v in mean[start:start + len(ids)]]})
        atomic_write_json(path, {"method": args.method, "rows": out_rows,
                                 "note": "score of position t, carried by token t's activations"})

    def _selection(self, model, tokenizer, model_spec: str, baseline: float | None = None):
        """The checkpoint selection of the correction stage, with the model before correction measured (step 0)."""
        from lancet.artifacts import hash_json
        from lancet.correct.select import SELECTION_DIR, CheckpointSelection, SelectArgs
        from lancet.data import load_dataset_spec
        from lancet.evaluate.judges import make_judge
        from lancet.train import TrainArgs

        c = self.config
        args = SelectArgs.from_json(c.select)
        prompts, ordinary = load_dataset_spec(args.prompts), load_dataset_spec(args.ordinary)
        benign = load_dataset_spec(args.benign) if args.benign else []
        judge = args.judge or c.iq_judge
        train_args = TrainArgs.from_json(self._train_json(c.correction_train, self.dir / "corrected"))
        fingerprint = hash_json({"select": {**args.to_json(), "judge": judge}, "model": model_spec,
                                 "prompts": [r.id for r in prompts], "ordinary": [r.id for r in ordinary],
                                 **({"benign": [r.id for r in benign]} if benign else {}),
                                 **({"anchor_prompts": [r.id for r in load_dataset_spec(c.anchor_prompts)],
                                     "anchor_judge": c.anchor_judge} if c.anchor_prompts else {}),
                                 **({"row_judge": c.row_judge} if c.row_judge else {}),
                                 "correction": c.correction, "train": train_args.fingerprint_dict(),
                                 "max_new_tokens": c.max_new_tokens, "max_length": c.max_length,
                                 "baseline": baseline})
        selection = CheckpointSelection(self.dir / SELECTION_DIR, tokenizer, prompts, ordinary, make_judge(judge),
                                        fingerprint=fingerprint, max_utility_loss=args.max_utility_loss,
                                        max_new_tokens=c.max_new_tokens, max_length=c.max_length,
                                        batch_size=args.batch_size, baseline_perplexity=baseline, benign=benign)
        self._timed(f"{self.prefix}select_reference", selection.reference, model)
        return selection

    def stage_correct(self, model, tokenizer, model_spec: str, train, selection=None) -> Path:
        """The correction of a copy of ``model`` (the model itself stays as it was: the later stages read it)."""
        import copy

        from lancet.correct import Correction, CorrectionArgs, CorrectionData, check_inputs, load_run_scores
        from lancet.data import load_dataset_spec
        from lancet.train import TrainArgs

        c = self.config
        cargs = CorrectionArgs.from_json(c.correction)
        method = str(c.influence["method"])
        ids = [r.id for r in train]
        scores, _ = load_run_scores(self.dir, ids, method)
        data = CorrectionData(train=train, scores=scores, iqs=self.round_data.query_records,
                              safe=load_dataset_spec(c.safe) if c.safe else (), train_rows=self.round_data.train,
                              iq_rows=self.round_data.queries)
        if c.labels:
            from lancet.influence.attribute import read_culprit_labels

            data.culprit_mask = read_culprit_labels(c.labels, ids)
        if c.pairs:
            from lancet.correct.pairs import read_preference_pairs

            data.pairs = read_preference_pairs(c.pairs)
        if c.anchor_prompts:
            data.retain = self._anchors(model, tokenizer)
        if c.row_judge:
            from lancet.evaluate.judges import flagged_rows, make_judge

            data.flagged_mask = flagged_rows(make_judge(c.row_judge), train, c.train)
        check_inputs(cargs, data)
        targs = TrainArgs.from_json(self._train_json(c.correction_train, self.dir / "corrected"))
        return Correction(copy.deepcopy(model), tokenizer, cargs, targs, max_length=c.max_length,
                          base_spec=model_spec).run(data, on_checkpoint=selection)

    def _anchors(self, model, tokenizer) -> list:
        """The model's own unflagged answers to ``anchor_prompts`` (cached in the round's directory)."""
        from lancet.data import load_dataset_spec
        from lancet.evaluate.judges import make_judge
        from lancet.influence.queries import take_anchors

        c = self.config
        prompts = load_dataset_spec(c.anchor_prompts)
        judge = make_judge(c.anchor_judge) if c.anchor_judge else None
        anchors = take_anchors(model, tokenizer, prompts, judge, self.dir, max_new_tokens=c.max_new_tokens,
                               progress=self.progress)
        if not anchors:
            raise LancetError(f"{c.anchor_prompts}: every one of the model's {len(prompts)} answers is blank or "
                              f"flagged by {c.anchor_judge!r}: no anchor to keep")
        return anchors

    def stage_evaluate(self, model, tokenizer, side: str) -> dict[str, Any]:
        """Metrics of ``model`` on the suite; reused when the file is complete for the same model and suite."""
        from lancet.evaluate import load_suite
        from lancet.evaluate.suite import evaluate_or_reuse

        suite = load_suite(self.config.evaluate, self.config.shared)
        metrics = evaluate_or_reuse(model, tokenizer, suite, self.out / f"metrics_{side}.json", progress=self.progress)
        return _headline(metrics)


def _recall_row(recall: dict[str, Any], seconds: float) -> dict[str, float]:
    return {"average_precision": round(recall["average_precision"], 4), "recall@50": round(recall["recall@50"], 4),
            "seconds": seconds}


INDEX_RUN_KEYS = ("reuse", "check_overlap")  # run-config keys of "index" that are not IndexArgs


def _round_row(result: dict[str, Any]) -> dict[str, Any]:
    """One round's line in run_summary.json, rounds.json and the report."""
    row = {"round": result["round"], "model": result["model"], "n_iqs": result["n_iqs"],
           "corrected": str(result["corrected"])}
    if "index" in result["attribution"]:
        row["index"] = result["attribution"]["index"]
    chosen = result["selection"]
    if chosen is not None:
        point = next(p for p in chosen["curve"] if p["steps"] == chosen["chosen_steps"])
        row.update(chosen_steps=chosen["chosen_steps"], validation_behaviour=point["behaviour"],
                   utility_loss=point["utility_loss"])
    return row


def _headline(metrics: dict[str, Any]) -> dict[str, float | None]:
    return {name: r.get(r["metric"]) for name, r in metrics["sets"].items()}


def run_config(path: str | Path, *, progress: bool = True, out: str | None = None, device: str | None = None,
               precision: str | None = None) -> dict[str, Any]:
    """Run the config at ``path``; ``out``, ``device`` and ``precision`` override its keys when given."""
    config = RunConfig.load(path)
    overrides = {k: v for k, v in (("out", out), ("device", device), ("precision", precision)) if v is not None}
    if overrides:
        config = RunConfig.from_json({**config.to_json(), **overrides})
    return Pipeline(config, progress=progress).run()
