"""kill -9 harness: every resumable CLI stage, killed mid-work several times and rerun, ends as an uninterrupted run.

For each stage the command runs once uninterrupted into A (timed, its progress on disk watched), then the same
command runs into B and is SIGKILLed ``KILLS`` times, each rerun resuming the last one, before a final rerun
finishes it; B must then equal A (bit-identical tensors, identical JSON up to wall-clock ``seconds``).

Where each kill lands is reproducible (seeded ``random.Random``) and always mid-work: the harness waits until B's
resume artifacts on disk show a target progress point (drawn among the stage's resume points between 20% and 95% of
its progress), then sleeps a drawn fraction in [0.2, 0.8] of the time A spent on the next chunk (so the kill lands
inside that chunk, now and then one later), and kills. The progress read back from disk after each kill is the
point the rerun resumes from; it is printed (``pytest -s``) and must never go back, neither between kills nor while
a rerun works (a rerun that started over would write smaller progress). After each kill no final artifact may
exist unless it is complete (equal to A's); garbage temp files like those a kill during an atomic write leaves
(``.NAME.*.tmp``) are planted beside the artifacts, and the reruns must ignore them.

``lancet finetune`` has its own kill test (tests/test_train.py::test_cli_finetune_killed_and_resumed).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_llama
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from lancet.artifacts import load_tensors
from lancet.curvature.estimators import get_estimator
from lancet.train import CKPT_POINTER, DONE_FILE, LOG_FILE

pytestmark = pytest.mark.slow

KILLS = 3  # kills per stage
TARGETS = (0.2, 0.95)  # kill targets: the resume points in this share of a stage's progress
DELAYS = (0.2, 0.8)  # after B shows its target: sleep this share of the time A spent on the next chunk
POLL_S = 0.002
RUN_TIMEOUT_S = 180
MAX_LENGTH = "128"  # the tiny model's max positions: the longest rows, the most work per chunk
PLANTED = "kill9"  # marks the garbage temp files planted after a kill


@dataclass
class Workspace:
    root: Path
    model: Path
    eval_model: Path  # wider: each evaluation set takes long enough on it for a kill to land inside
    data: Path
    suite: Path
    scores_run: Path  # an identity-method attribute run: the scores `lancet correct` reads
    env: dict[str, str]
    n_train: int


@dataclass
class Stage:
    """One resumable command. ``progress(out)`` reads the resume point from disk (``total`` once finished);
    ``describe`` names a point; ``check_killed(b, a)`` asserts that nothing half-written in B is believed."""

    name: str
    argv: Callable[[Path], list[str]]
    progress: Callable[[Path], int]
    total: int
    points: list[int]  # every resume point (progress after a resume artifact is written), in order
    describe: Callable[[int], str]
    check_killed: Callable[[Path, Path], None]
    planted: list[str] = field(default_factory=list)  # where garbage temp files are planted (relative to out)


@dataclass
class KillRecord:
    target: int
    delay_s: float
    resumed_from: int
    label: str


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_tokenizer) -> Workspace:
    from lancet.data.demo import write_demo_dataset
    from lancet.demo import demo_suite
    from lancet.influence import InfluenceArgs
    from lancet.influence.attribute import attribute
    from lancet.models.loading import load_model

    root = tmp_path_factory.mktemp("kill_resume")
    model_dir = root / "model"
    tiny_llama(len(tiny_tokenizer)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    paths = write_demo_dataset(root / "demo")
    suite = demo_suite(root / "demo")
    # 16 new tokens, one row per batch: on the wider model below each set takes 0.2-0.5 s, room for a kill inside
    suite.update(max_new_tokens=16, batch_size=1)
    (root / "suite.json").write_text(json.dumps(suite))
    eval_model = root / "eval_model"
    _wide_llama(len(tiny_tokenizer)).save_pretrained(eval_model)
    tiny_tokenizer.save_pretrained(eval_model)
    model, tokenizer = load_model(str(model_dir))
    scores_run = root / "identity_run"
    attribute(model, tokenizer, str(paths["train"]), str(paths["iqs"]), scores_run,
              InfluenceArgs(method="identity", batch_size=8, progress=False), max_length=int(MAX_LENGTH))
    # A and B share one thread (bit-identity is per thread count) and stay light beside other work
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "LANCET_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1"}
    n_train = len(paths["train"].read_text().splitlines())
    return Workspace(root, model_dir, eval_model, root / "demo", root / "suite.json", scores_run, env, n_train)


def _wide_llama(vocab_size: int) -> LlamaForCausalLM:
    """tiny_llama 32x wider (hidden 512): the tiny one evaluates a set in ~20 ms, too short to be killed inside."""
    cfg = tiny_llama(vocab_size).config.to_dict() | {"hidden_size": 512, "intermediate_size": 1024, "head_dim": 256}
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


# ---- reading progress and comparing artifacts ------------------------------------------------------------------

_rows_cache: dict[tuple, int] = {}


def _rows_done(path: Path, key: str) -> int:
    """The rows_done counter of a partial safetensors file; 0 when it is absent (or vanishes while read)."""
    try:
        st = path.stat()
        sig = (str(path), st.st_ino, st.st_mtime_ns, st.st_size)
        if sig not in _rows_cache:
            with safe_open(str(path), "pt") as fh:
                _rows_cache[sig] = int(fh.get_tensor(key))
        return _rows_cache[sig]
    except OSError:
        return 0


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _strip_seconds(obj: Any) -> Any:
    """Wall-clock durations are the only thing allowed to differ between A and B."""
    if isinstance(obj, dict):
        return {k: _strip_seconds(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_strip_seconds(v) for v in obj]
    return obj


def _max_abs_diff(a: Path, b: Path) -> float:
    """Largest |A - B| over the tensors of two safetensors files (same names, shapes and dtypes required)."""
    ta, tb = load_tensors(a), load_tensors(b)
    assert sorted(ta) == sorted(tb), f"{b}: tensor names differ from {a}"
    worst = 0.0
    for k, t in ta.items():
        assert t.shape == tb[k].shape and t.dtype == tb[k].dtype, f"{b}: {k} differs in shape or dtype"
        if not torch.equal(t, tb[k]):
            worst = max(worst, (t.double() - tb[k].double()).abs().max().item() if t.numel() else 0.0)
            worst = worst or math.inf  # not equal but no numeric difference: NaN patterns differ
    return worst


def _assert_same_file(a: Path, b: Path, b_root: Path | None = None, a_root: Path | None = None) -> float:
    """B's file equals A's: tensors bit-identical (returns the max abs diff, 0.0), JSON equal up to seconds and
    to the output directory's own path (``b_root`` read as ``a_root``)."""
    if a.suffix == ".safetensors":
        diff = _max_abs_diff(a, b)
        assert diff == 0.0, f"{b.name}: max abs diff {diff:g} vs the uninterrupted run"
        return diff
    text_a, text_b = a.read_text(errors="replace"), b.read_text(errors="replace")
    if b_root is not None and a_root is not None:
        text_b = text_b.replace(str(b_root), str(a_root))
    if a.suffix == ".json":
        assert _strip_seconds(json.loads(text_b)) == _strip_seconds(json.loads(text_a)), b
    elif a.suffix == ".jsonl":
        rows_a = [_strip_seconds(json.loads(x)) for x in text_a.splitlines()]
        rows_b = [_strip_seconds(json.loads(x)) for x in text_b.splitlines()]
        assert rows_b == rows_a, f"{b.name} differs from the uninterrupted run"
    else:
        assert text_b == text_a, f"{b.name} differs from the uninterrupted run"
    return 0.0


def _files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and not p.name.endswith(".tmp")}


def _temps(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob(".*.tmp"))


def _assert_same_dir(a: Path, b: Path) -> float:
    """Same files (temp files aside: no partials, checkpoints or pointers left over), each equal to A's."""
    assert _files(b) == _files(a), f"files differ: only in B {_files(b) - _files(a)}, only in A {_files(a) - _files(b)}"
    return max(_assert_same_file(a / rel, b / rel, b, a) for rel in sorted(_files(a)))


# ---- the harness ---------------------------------------------------------------------------------------------


def _watch(proc: subprocess.Popen, out: Path, stage: Stage, until: int | None = None) -> list[tuple[float, int]]:
    """Poll ``stage.progress`` until ``proc`` exits (or progress reaches ``until``): the (time, progress) changes."""
    t0 = time.monotonic()
    seen: list[tuple[float, int]] = []
    while True:
        p = stage.progress(out)
        if not seen or p != seen[-1][1]:
            seen.append((time.monotonic() - t0, p))
        if until is not None and p >= until:
            return seen
        if proc.poll() is not None:
            return seen
        if time.monotonic() - t0 > RUN_TIMEOUT_S:
            proc.kill()
            pytest.fail(f"{stage.name}: no progress to {until} within {RUN_TIMEOUT_S} s (at {seen[-1][1]})")
        time.sleep(POLL_S)


def _popen(stage: Stage, ws: Workspace, out: Path, log: Path) -> subprocess.Popen:
    with log.open("ab") as err:  # a file, not a pipe: a full pipe would block the child
        return subprocess.Popen(stage.argv(out), stdout=subprocess.DEVNULL, stderr=err, env=ws.env, cwd=ws.root)


def _assert_monotone(stage: Stage, seen: list[tuple[float, int]], floor: int, when: str) -> None:
    values = [p for _, p in seen]
    assert all(p >= floor for p in values) and values == sorted(values), (
        f"{stage.name}: progress went back {when} (resume point {floor}, observed {values}): the rerun started over")


def _chunk_seconds(timeline: list[tuple[float, int]], stage: Stage, p: int) -> float:
    """How long A took from showing progress ``p`` to showing the next point (per point, if polling skipped some)."""
    for (t, q), (t_next, q_next) in zip(timeline, timeline[1:], strict=False):
        if q >= p:
            return (t_next - t) / max(1, sum(q < x <= q_next for x in [*stage.points, stage.total]))
    raise AssertionError(f"{stage.name}: A never showed progress {p}")


def kill_and_resume(stage: Stage, ws: Workspace, tmp: Path) -> dict[str, Any]:
    """Run A uninterrupted, kill B ``KILLS`` times mid-work, finish B, compare; returns what happened."""
    a, b = tmp / f"{stage.name}-A", tmp / f"{stage.name}-B"
    log = tmp / f"{stage.name}.stderr"
    # (1) uninterrupted, watched: which progress points exist and how long the chunk after each one takes
    t0 = time.monotonic()
    proc = _popen(stage, ws, a, log)
    timeline = _watch(proc, a, stage)
    assert proc.wait() == 0, log.read_text()[-3000:]
    a_seconds = time.monotonic() - t0
    assert stage.progress(a) == stage.total
    observed = [p for _, p in timeline]
    assert set(observed) <= {0, *stage.points, stage.total}, f"{stage.name}: unexpected progress points {observed}"
    candidates = [p for p in stage.points if TARGETS[0] * stage.total <= p <= TARGETS[1] * stage.total]
    assert len(candidates) >= KILLS, f"{stage.name}: only resume points {stage.points}; make the work bigger"
    rng = random.Random(f"lancet-kill-resume:{stage.name}")  # a str seed: the same draws in every process
    targets = sorted(rng.sample(candidates, KILLS))
    delays = [rng.uniform(*DELAYS) for _ in targets]

    # (2) killed mid-work, rerun, killed again...
    kills: list[KillRecord] = []
    floor = 0
    for k, (target, u) in enumerate(zip(targets, delays, strict=True)):
        # the previous kill may have landed past this target (then: the next resume point, in the band if it can)
        later = [p for p in candidates if p > floor] or [p for p in stage.points if p > floor]
        if not later:  # the previous kill landed at the last resume point: nothing left to interrupt
            print(f"{stage.name}: kill {k} skipped: the previous one landed at the last resume point ({floor})")
            break
        target = max(target, later[0])
        delay = u * _chunk_seconds(timeline, stage, target)
        proc = _popen(stage, ws, b, log)
        seen = _watch(proc, b, stage, until=target)
        time.sleep(delay)
        proc.kill()  # SIGKILL; no-op if it had already exited
        rc = proc.wait()
        seen += [(0.0, stage.progress(b))]
        finished = rc == 0 and stage.progress(b) >= stage.total  # the kill came after a normal exit
        assert rc == -signal.SIGKILL or finished, f"{stage.name}: kill {k} (exit {rc}): {log.read_text()[-2000:]}"
        _assert_monotone(stage, seen, floor, f"during rerun {k}")
        floor = stage.progress(b)
        if floor >= stage.total:  # a slow machine let the work finish before the kill: later kills have no target
            print(f"{stage.name}: kill {k} landed after the last resume point (machine under load); no more kills")
            break
        kills.append(KillRecord(target, round(delay, 4), floor, stage.describe(floor)))
        print(f"{stage.name}: kill {k}: {vars(kills[-1])}")
        stage.check_killed(b, a)
        if k == 0:  # as if the kill had hit an atomic write: garbage temp files beside the artifacts
            for rel in stage.planted:
                p = b / rel
                p.parent.mkdir(parents=True, exist_ok=True)
                (p.parent / f".{p.name}.{PLANTED}.tmp").write_bytes(b"\x00garbage from a killed write")
    assert kills, f"{stage.name}: no kill landed mid-work"
    temps_after_kills = [t for t in _temps(b) if PLANTED not in t]

    # (3) the final rerun finishes; B must equal A
    t0 = time.monotonic()
    proc = _popen(stage, ws, b, log)
    seen = _watch(proc, b, stage)
    assert proc.wait() == 0, log.read_text()[-3000:]
    _assert_monotone(stage, seen, floor, "during the final rerun")
    diff = _assert_same_dir(a, b)
    report = {"stage": stage.name, "uninterrupted_s": round(a_seconds, 2),
              "final_rerun_s": round(time.monotonic() - t0, 2), "total": stage.total,
              "kills": [vars(x) for x in kills], "max_abs_diff": diff,
              "temp_files_left_by_kills": temps_after_kills, "temp_files_left_at_end": _temps(b)}
    print(json.dumps(report))
    return report


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lancet.cli", "-q", *args]


# ---- attribute -------------------------------------------------------------------------------------------------


def _attribute_stage(ws: Workspace, method: str) -> Stage:
    passes = get_estimator(method).passes
    n = ws.n_train
    stages = [*passes, "scores"]
    total = len(stages) * n + 1  # + 1: the ranking is written

    def progress(out: Path) -> int:
        # each artifact is read before the one that replaces it, so a stage finishing meanwhile never reads as a
        # step back (a partial is deleted only after its final file exists)
        cdir = out / "curvature" / method
        done = 0
        for i, name in enumerate(passes):
            rows = _rows_done(cdir / f"pass-{name}.partial.safetensors", "__progress__::rows_done")
            done = max(done, i * n + rows) if rows else done
        if (cdir / "curvature.safetensors").is_file():
            done = len(passes) * n
        for sdir in sorted((out / "scores").glob(f"{method}-*")):
            rows = _rows_done(sdir / "scores.partial.safetensors", "rows_done")
            done = max(done, len(passes) * n + rows) if rows else done
            if (sdir / "scores.safetensors").is_file():
                done = max(done, len(stages) * n)
        if (out / f"ranking-{method}.safetensors").is_file():
            done = total
        return done

    def describe(p: int) -> str:
        if p >= len(stages) * n:
            return "scores written, ranking not yet"
        return f"{method} {stages[p // n]} pass, {p % n}/{n} rows summed"

    def check_killed(b: Path, a: Path) -> None:
        cdir = b / "curvature" / method
        for partial in [*cdir.glob("pass-*.partial.safetensors"), *(b / "scores").glob("*/scores.partial.*")]:
            load_tensors(partial)  # a partial file is whole (written atomically) or absent
        finals = [cdir / "curvature.safetensors", *(b / "scores").glob("*/scores.safetensors"),
                  b / f"ranking-{method}.safetensors", b / f"influence-{method}.json"]
        for f in finals:  # a final file exists only complete: equal to the uninterrupted run's
            if f.is_file():
                _assert_same_file(a / f.relative_to(b), f, b, a)

    argv = lambda out: _cli("attribute", str(ws.model), "--train", str(ws.data / "train.jsonl"),  # noqa: E731
                            "--queries", str(ws.data / "iqs.jsonl"), "--out", str(out), "--method", method,
                            "--chunk-rows", "16", "--batch-size", "8", "--max-length", MAX_LENGTH)
    planted = [f"curvature/{method}/{f}" for f in (*(f"pass-{p}.partial.safetensors" for p in passes),
                                                    "curvature.safetensors")]
    planted += [f"ranking-{method}.safetensors", f"influence-{method}.json"]
    chunk = 16  # --chunk-rows, a whole number of --batch-size 8 batches
    points = sorted({i * n + r for i in range(len(stages)) for r in range(chunk, n, chunk)}
                    | {len(passes) * n, len(stages) * n})  # partial files, then the curvature and scores files
    return Stage(f"attribute-{method}", argv, progress, total, points, describe, check_killed, planted)


@pytest.mark.parametrize("method", ["ekfac", "linfac"])
def test_attribute_killed_and_resumed(ws, tmp_path, method):
    """Curvature passes and scoring resume chunk by chunk: the scores are bit-identical to an uninterrupted run."""
    stage = _attribute_stage(ws, method)
    report = kill_and_resume(stage, ws, tmp_path)
    assert report["max_abs_diff"] == 0.0
    a, b = tmp_path / f"{stage.name}-A", tmp_path / f"{stage.name}-B"
    ranking = f"ranking-{method}.safetensors"
    for key, t in load_tensors(a / ranking).items():  # explicit, though _assert_same_dir checked it already
        assert torch.equal(load_tensors(b / ranking)[key], t), key
    (sa,), (sb,) = (a / "scores").glob("*/scores.safetensors"), (b / "scores").glob("*/scores.safetensors")
    assert torch.equal(load_tensors(sa)["scores"], load_tensors(sb)["scores"])
    # the kills hit the curvature passes and scoring at several points, never twice at one
    assert len({k["resumed_from"] for k in report["kills"]}) == KILLS


# ---- correct ---------------------------------------------------------------------------------------------------


def _correct_stage(ws: Workspace) -> Stage:
    steps, save_every = 60, 3

    def progress(out: Path) -> int:
        # pointer, then the moved-in weights, then the done marker: the order in which the final save replaces them
        pointer = _read_json(out / CKPT_POINTER)
        done = int(pointer["step"]) if pointer else 0
        if (out / "model.safetensors").is_file():
            done = max(done, steps - 1)
        if (out / DONE_FILE).is_file():
            done = steps
        return done

    def check_killed(b: Path, a: Path) -> None:
        assert not (b / DONE_FILE).exists(), "killed mid-run but marked done"
        pointer = _read_json(b / CKPT_POINTER)
        if pointer:  # the checkpoint the pointer names is whole
            load_tensors(b / pointer["dir"] / "state.safetensors")
        if (b / "model.safetensors").is_file():  # moved in whole from the temp dir, only at the very end
            _assert_same_file(a / "model.safetensors", b / "model.safetensors")
        logged = [json.loads(x)["step"] for x in (b / LOG_FILE).read_text().splitlines()]
        assert logged == list(range(1, len(logged) + 1))

    argv = lambda out: _cli("correct", str(ws.model), "--train", str(ws.data / "train.jsonl"),  # noqa: E731
                            "--scores", str(ws.scores_run), "--method", "ibo", "--iqs", str(ws.data / "iqs.jsonl"),
                            "--out", str(out), "--max-steps", str(steps), "--save-every", str(save_every),
                            "--batch-size", "4", "--lr", "1e-3", "--max-length", MAX_LENGTH)
    planted = [CKPT_POINTER, LOG_FILE, DONE_FILE, "model.safetensors"]
    points = [*range(save_every, steps, save_every), steps - 1]  # checkpoints, then the final weights moved in
    return Stage("correct-ibo", argv, progress, steps, points, lambda p: f"resumes at step {p}/{steps}",
                 check_killed, planted)


def test_correct_killed_and_resumed(ws, tmp_path):
    """IBO resumes from its checkpoints: the final weights equal the uninterrupted run's, each step logged once."""
    stage = _correct_stage(ws)
    report = kill_and_resume(stage, ws, tmp_path)
    a, b = tmp_path / f"{stage.name}-A", tmp_path / f"{stage.name}-B"
    diff = _max_abs_diff(a / "model.safetensors", b / "model.safetensors")
    print(f"correct-ibo: final weights max abs diff {diff:g}")
    assert diff == 0.0  # exact on CPU: same batches, same RNG state, same summation order
    steps = [json.loads(x)["step"] for x in (b / LOG_FILE).read_text().splitlines()]
    assert steps == list(range(1, 61))
    assert len({k["resumed_from"] for k in report["kills"]}) == KILLS


# ---- evaluate --------------------------------------------------------------------------------------------------


def _evaluate_stage(ws: Workspace) -> Stage:
    names = [s["name"] for s in json.loads(ws.suite.read_text())["sets"]]

    def progress(out: Path) -> int:
        m = _read_json(out / "metrics.json")
        if not m:
            return 0
        return len(names) if m.get("complete") else len(m["sets"])

    def check_killed(b: Path, a: Path) -> None:
        if not (b / "metrics.json").is_file():
            return
        m, full = json.loads((b / "metrics.json").read_text()), json.loads((a / "metrics.json").read_text())
        # the sets written are the first ones of the suite (the file lists them sorted by name)
        assert not m["complete"] and set(m["sets"]) == set(names[: len(m["sets"])])
        for name, res in m["sets"].items():  # every set written before the kill holds its final numbers
            assert _strip_seconds(res) == _strip_seconds(full["sets"][name]), name

    def describe(p: int) -> str:
        return f"{p}/{len(names)} sets written, killed inside '{names[p]}'"

    argv = lambda out: _cli("evaluate", str(ws.eval_model), "--suite", str(ws.suite),  # noqa: E731
                            "--out", str(out / "metrics.json"))
    points = list(range(1, len(names)))  # metrics.json after each set but the last
    return Stage("evaluate-demo", argv, progress, len(names), points, describe, check_killed, ["metrics.json"])


def test_evaluate_killed_and_resumed(ws, tmp_path):
    """Evaluation resumes set by set: every set's numbers (and generated answers) equal the uninterrupted run's."""
    stage = _evaluate_stage(ws)
    report = kill_and_resume(stage, ws, tmp_path)
    a, b = tmp_path / f"{stage.name}-A", tmp_path / f"{stage.name}-B"
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert mb["complete"] and set(mb["sets"]) == set(ma["sets"])
    assert _strip_seconds(mb["sets"]) == _strip_seconds(ma["sets"])
    assert len({k["resumed_from"] for k in report["kills"]}) == KILLS
    # a rerun of a finished evaluation reuses it and still prints the table
    done = subprocess.run(stage.argv(b), capture_output=True, text=True, env=ws.env, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("set ") and "metrics written to" in done.stdout
    assert json.loads((b / "metrics.json").read_text()) == mb
