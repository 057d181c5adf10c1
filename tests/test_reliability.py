"""Reliability: every bad input ends in ONE stderr line "lancet: error: ...", exit code 2, and no partial artifact.

Table-driven (docs/reliability.md lists every case). Each CLI case builds its bad input, snapshots every file under
the test's directory and under the shared fixtures (size, mtime, sha256), runs ``lancet.cli.main`` in-process with
``-q`` (never ``--debug``), and checks: exit code 2, one line naming what and where, no traceback, no file created,
changed or removed, and no temp file (``.NAME.*.tmp``) left. API cases check the exception type and message and the
same "nothing partial" rule.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from safetensors import SafetensorError

from lancet.artifacts import atomic_save_tensors, atomic_write_bytes, load_tensors
from lancet.cli import main
from lancet.data.demo import write_demo_dataset
from lancet.errors import ArtifactError, DataError, LancetError, ModelError

MAXLEN = ["--max-length", "128"]  # the tiny tokenizer is near character-level: 128 tokens keeps every row short
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 12  # > 128 tokens: the response is cut off entirely
ENOSPC = OSError(errno.ENOSPC, "No space left on device")

# --- the "nothing partial" checks ----------------------------------------------------------------------------------

Snapshot = dict[str, tuple[int, int, str]]


def snapshot(*roots: Path) -> Snapshot:
    """Every file under ``roots``: (size, mtime_ns, sha256). Directories are not listed: an empty one is no artifact."""
    files: Snapshot = {}
    for root in roots:
        for p in sorted(root.rglob("*")) if root.is_dir() else []:
            if p.is_file() and not p.is_symlink():
                st = p.stat()
                files[str(p)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return files


def temp_leftovers(*roots: Path) -> list[str]:
    """Names the atomic writers use for their temp files (``.NAME.xxxx.tmp``) and the trainer's ``.final.tmp``."""
    return [str(p) for root in roots if root.is_dir() for p in root.rglob(".*") if p.name.endswith(".tmp")]


def assert_unchanged(before: Snapshot, after: Snapshot, roots: tuple[Path, ...]) -> None:
    new = sorted(set(after) - set(before))
    gone = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    assert not new and not gone and not changed, f"new: {new}, removed: {gone}, changed: {changed}"
    assert not temp_leftovers(*roots)


def expect_cli_error(capsys: pytest.CaptureFixture[str], argv: list[str], expected: list[str],
                     watch: tuple[Path, ...]) -> str:
    """Run ``lancet -q ARGV`` in-process and check the error contract; returns the error line."""
    before = snapshot(*watch)
    capsys.readouterr()  # drop anything printed while the case was being built
    rc = main(["-q", *argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("lancet: error: "), err
    for fragment in expected:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert_unchanged(before, snapshot(*watch), watch)
    return lines[0]


# --- shared fixtures: built once per module, only ever read by the cases (the snapshot checks that too) -------------


@dataclass(frozen=True)
class Base:
    root: Path
    model: Path  # tiny Llama + the tiny tokenizer, safetensors
    other_model: Path  # the same architecture, other weights
    nan_model: Path  # NaN in one weight matrix: every logit is NaN
    train: Path  # 24 demo training rows
    train2: Path  # 24 other demo training rows
    iqs: Path  # 3 demo IQs
    iqs2: Path  # 3 other demo IQs
    culprits: Path  # the demo's culprits.json
    run: Path  # `lancet attribute --method kfac` of model on train x iqs (curvature, scores, ranking)
    finetuned: Path  # `lancet finetune` of model on train, 2 steps


def _save_model(model: torch.nn.Module, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _head(src: Path, dst: Path, start: int, stop: int) -> Path:
    dst.write_text("".join(src.read_text().splitlines(keepends=True)[start:stop]))
    return dst


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Base:
    root = tmp_path_factory.mktemp("reliability_base")
    demo = write_demo_dataset(root / "demo")
    nan = tiny_llama(len(tiny_tokenizer))
    with torch.no_grad():
        nan.model.layers[0].mlp.up_proj.weight.fill_(float("nan"))
    b = Base(root=root, model=_save_model(tiny_llama(len(tiny_tokenizer)), tiny_tokenizer, root / "model"),
             other_model=_save_model(tiny_llama(len(tiny_tokenizer), seed=1), tiny_tokenizer, root / "other_model"),
             nan_model=_save_model(nan, tiny_tokenizer, root / "nan_model"),
             train=_head(demo["train"], root / "train.jsonl", 0, 24),
             train2=_head(demo["train"], root / "train2.jsonl", 24, 48),
             iqs=_head(demo["iqs"], root / "iqs.jsonl", 0, 3), iqs2=_head(demo["iqs"], root / "iqs2.jsonl", 3, 6),
             culprits=demo["culprits"], run=root / "run", finetuned=root / "finetuned")
    assert main(["-q", "attribute", str(b.model), "--train", str(b.train), "--queries", str(b.iqs), "--out",
                 str(b.run), "--method", "kfac", "--batch-size", "8", *MAXLEN]) == 0
    assert main(["-q", "finetune", str(b.model), "--train", str(b.train), "--out", str(b.finetuned), "--max-steps",
                 "2", "--batch-size", "4", "--save-every", "1", *MAXLEN]) == 0
    return b


@dataclass
class Ctx:
    """What a case builds its input with: its own directory ``tmp`` and the shared ``base``."""

    tmp: Path
    base: Base
    monkeypatch: pytest.MonkeyPatch

    def text(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return path

    def jsonl(self, name: str, rows: list[object]) -> Path:
        return self.text(name, "".join(json.dumps(r) + "\n" for r in rows))

    def copy(self, src: Path, name: str) -> Path:
        dst = self.tmp / name
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
        return dst

    def out(self) -> str:
        return str(self.tmp / "out")

    def model_dir(self, name: str, model: torch.nn.Module, tokenizer) -> Path:
        return _save_model(model, tokenizer, self.tmp / name)

    def config(self, cfg: dict[str, object] | str) -> Path:
        return self.text("run.json", cfg if isinstance(cfg, str) else json.dumps(cfg, indent=2))


OK_ROW = {"prompt": "How do I boil an egg?", "response": "Put it in boiling water for nine minutes."}
Case = Callable[[Ctx], tuple[list[str], list[str]]]  # builds the input; returns (argv, fragments of the error line)


def finetune(c: Ctx, train: Path | str, model: Path | None = None, out: str | None = None) -> list[str]:
    return ["finetune", str(model or c.base.model), "--train", str(train), "--out", out or c.out(), "--max-steps", "2",
            "--batch-size", "4", *MAXLEN]


def attribute(c: Ctx, *, model: Path | None = None, train: Path | None = None, queries: Path | None = None,
              out: Path | str | None = None, method: str = "kfac", extra: tuple[str, ...] = ()) -> list[str]:
    return ["attribute", str(model or c.base.model), "--train", str(train or c.base.train), "--queries",
            str(queries or c.base.iqs), "--out", str(out or c.out()), "--method", method, "--batch-size", "8",
            *MAXLEN, *extra]


def correct(c: Ctx, *extra: str, train: Path | None = None, scores: Path | None = None, method: str = "ibo",
            out: str | None = None) -> list[str]:
    return ["correct", str(c.base.model), "--train", str(train or c.base.train), "--scores",
            str(scores or c.base.run), "--method", method, "--out", out or c.out(), "--max-steps", "2",
            "--batch-size", "4", "--top-k", "3", *MAXLEN, *extra]


# --- data -----------------------------------------------------------------------------------------------------------


def bad_json_line(c: Ctx):
    p = c.text("bad.jsonl", json.dumps(OK_ROW) + "\n" + json.dumps(OK_ROW) + "\n" + '{"prompt": oops}\n')
    return finetune(c, p), [f"{p}:3", "invalid JSON"]


def bad_json_document(c: Ctx):
    p = c.text("bad.json", '[\n  {"prompt": "a", "response": "b"},\n  {"prompt": "c" "response": "d"}\n]\n')
    return finetune(c, p), [f"{p}:3", "invalid JSON"]


def missing_prompt(c: Ctx):
    p = c.jsonl("rows.jsonl", [OK_ROW, {"response": "an answer without a question"}])
    return attribute(c, train=p), [f"{p}:2", "field 'prompt'", "missing field"]


def non_string_field(c: Ctx):
    p = c.jsonl("rows.jsonl", [{"prompt": "a", "response": 42}])
    return finetune(c, p), [f"{p}:1", "field 'response'", "expected a string, got int"]


def bad_chat_role(c: Ctx):
    msgs = [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]
    p = c.jsonl("chat.jsonl", [OK_ROW, {"messages": msgs}])
    return finetune(c, p), [f"{p}:2", "field 'messages[1].role'", "'robot'"]


def csv_extra_cells(c: Ctx):
    p = c.text("rows.csv", "prompt,response\na,b\nc,d,e\n")
    return finetune(c, p), [f"{p}:3", "3 cells", "header has 2"]


def not_utf8(c: Ctx):
    p = c.text("latin1.jsonl", '{"prompt": "caf\xe9", "response": "ok"}\n'.encode("latin-1"))
    return finetune(c, p), [str(p), "not UTF-8"]


SURROGATE = "caf\ud800"  # JSON may spell a lone surrogate; it is not valid Unicode and no encoder can write it


def _check(c: Ctx, path: Path) -> list[str]:
    return ["data", "check", str(path), "--model", str(c.base.model)]


def surrogate_jsonl(c: Ctx):
    p = c.text("rows.jsonl", json.dumps(OK_ROW) + "\n" + json.dumps({"prompt": SURROGATE, "response": "ok"}) + "\n")
    return _check(c, p), [f"{p}:2", "field 'prompt'", "lone surrogate", "\\ud800"]


def surrogate_chat_json(c: Ctx):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": SURROGATE}]
    p = c.text("chat.json", json.dumps([OK_ROW, {"messages": msgs}]))
    return finetune(c, p), [f"{p}:2", "field 'messages[1].content'", "lone surrogate"]


def surrogate_hh_rlhf(c: Ctx):
    import gzip

    row = {"chosen": f"\n\nHuman: {SURROGATE}\n\nAssistant: ok", "rejected": "\n\nHuman: a\n\nAssistant: b"}
    p = c.text("hh-rlhf/helpful-base_test.jsonl.gz", gzip.compress((json.dumps(row) + "\n").encode()))
    return _check(c, p), [f"{p}:1", "field 'chosen'", "lone surrogate"]


def surrogate_safety_tuned_llamas(c: Ctx):
    rows = [{"instruction": "a", "input": "", "output": "b"}, {"instruction": SURROGATE, "input": "", "output": "b"}]
    p = c.text("safety-tuned-llamas/safety_only_data_Instructions.json", json.dumps(rows))
    return _check(c, p), [f"{p}:2", "field 'instruction'", "lone surrogate"]


def surrogate_harmful_prompts(c: Ctx):
    p = c.text("harmful_test_split.json", json.dumps([{"instruction": "a"}, {"instruction": SURROGATE}]))
    return _check(c, p), [f"{p}:2", "field 'instruction'", "lone surrogate"]


def empty_data_file(c: Ctx):
    p = c.text("empty.jsonl", "\n\n")
    return finetune(c, p), [str(p), "empty file"]


def unknown_format(c: Ctx):
    p = c.text("rows.txt", "prompt: a\n")
    return finetune(c, p), [str(p), "unknown file extension"]


def missing_data_path(c: Ctx):
    p = c.tmp / "nope" / "train.jsonl"
    return finetune(c, p), [str(p), "no such file or directory"]


def directory_as_data_file(c: Ctx):
    d = c.tmp / "a_directory"
    d.mkdir()
    return ["data", "check", str(d), "--model", str(c.base.model)], [str(d), "not a saved Hugging Face dataset"]


def directory_as_jsonl(c: Ctx):
    d = c.tmp / "a_directory"
    d.mkdir()
    return finetune(c, f"jsonl:{d}"), [str(d), "cannot read"]


def query_without_response(c: Ctx):
    p = c.jsonl("q.jsonl", [{"prompt": "Why?"}])
    return attribute(c, queries=p), [f"{p}:1", "field 'response'", "need the undesirable response"]


def iq_response_truncated_attribute(c: Ctx):
    p = c.jsonl("q.jsonl", [OK_ROW, {"prompt": LONG_PROMPT, "response": "Put butter on the burn."}])
    return attribute(c, queries=p), [f"{p}:2", "field 'response'", "no response tokens", "128"]


def safe_rows_truncated_correct(c: Ctx):
    p = c.jsonl("safe.jsonl", [{"prompt": LONG_PROMPT, "response": "Cool the burn under running water."}])
    return correct(c, "--safe", str(p), method="sft"), [f"{p}:1", "safe row has no response tokens", "128"]


def iq_response_truncated_correct(c: Ctx):
    p = c.jsonl("q.jsonl", [OK_ROW, {"prompt": LONG_PROMPT, "response": "Put butter on the burn."}])
    return correct(c, "--iqs", str(p)), [f"{p}:2", "IQ row has no response tokens"]


# --- models ---------------------------------------------------------------------------------------------------------


def tokenizer_mismatch(c: Ctx):
    from conftest import make_tokenizer

    tok = make_tokenizer()
    d = c.model_dir("small_vocab", tiny_llama(200), tok)
    return attribute(c, model=d), [str(d), f"tokenizer has {len(tok)} tokens", "embedding has 200 rows"]


def pickle_only_weights(c: Ctx):
    d = c.copy(c.base.model, "pickled")
    state = load_tensors(d / "model.safetensors")
    torch.save(state, d / "pytorch_model.bin")  # what an old checkpoint ships; loading it would unpickle
    (d / "model.safetensors").unlink()
    return finetune(c, c.base.train, model=d), [str(d), "no safetensors weights", "pickle checkpoints are refused"]


def truncated_weights(c: Ctx):
    d = c.copy(c.base.model, "truncated")
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return attribute(c, model=d), [str(d), "corrupted or truncated safetensors"]


def remote_code_refused(c: Ctx):
    d = c.copy(c.base.model, "custom_code")
    # the module would leave a file behind if imported: the snapshot check would see it
    c.text("custom_code/evil.py", f"import pathlib\npathlib.Path({str(c.tmp / 'PWNED')!r}).write_text('ran')\n"
                                  "from transformers import LlamaConfig as C, LlamaForCausalLM as M\n")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="lancet_custom", auto_map={"AutoConfig": "evil.C", "AutoModelForCausalLM": "evil.M"})
    (d / "config.json").write_text(json.dumps(cfg))
    return attribute(c, model=d), [str(d), "custom code", "--trust-remote-code"]


def nan_weights_finetune(c: Ctx):
    return finetune(c, c.base.train, model=c.base.nan_model), ["non-finite loss", "at step 0"]


def nan_weights_attribute_curvature(c: Ctx):
    return attribute(c, model=c.base.nan_model), ["non-finite", "statistics in layer", "model.layers"]


def nan_weights_attribute_scores(c: Ctx):
    # identity has no curvature pass: the NaN shows up in the scores themselves
    return attribute(c, model=c.base.nan_model, method="identity"), ["influence scores are NaN or infinite"]


# --- artifacts ------------------------------------------------------------------------------------------------------


def foreign_training_data(c: Ctx):
    run = c.copy(c.base.run, "run")
    return attribute(c, train=c.base.train2, out=run), [str(run), "made from other inputs", "differs in train"]


def foreign_model(c: Ctx):
    run = c.copy(c.base.run, "run")
    return attribute(c, model=c.base.other_model, out=run), [str(run), "made from other inputs", "differs in model"]


def truncated_curvature(c: Ctx):
    run = c.copy(c.base.run, "run")
    f = run / "curvature" / "kfac" / "curvature.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    # new queries: their scores are not stored yet, so the stored curvature is read back
    return attribute(c, queries=c.base.iqs2, out=run), [str(f), "corrupted or truncated"]


def truncated_scores(c: Ctx):
    run = c.copy(c.base.run, "run")
    (f,) = run.glob("scores/kfac-*/scores.safetensors")
    f.write_bytes(f.read_bytes()[:100])
    return attribute(c, out=run), [str(f), "corrupted or truncated"]


def corrupted_run_metadata(c: Ctx):
    run = c.copy(c.base.run, "run")
    (f,) = run.glob("scores/kfac-*/meta.json")
    f.write_text('{"kind": "scores", ')
    return attribute(c, out=run), [str(f), "corrupted metadata"]


def foreign_finetune_out(c: Ctx):
    out = c.copy(c.base.finetuned, "finetuned")
    return finetune(c, c.base.train2, out=str(out)), [str(out), "made from other inputs"]


def correct_scores_of_other_rows(c: Ctx):
    return correct(c, train=c.base.train2), [str(c.base.run / "influence-kfac.json"),
                                             "scores are for other training rows"]


def correct_nan_scores(c: Ctx):
    run = c.copy(c.base.run, "run")
    f = run / "ranking-kfac.safetensors"
    t = load_tensors(f)
    t["aggregate_normalized_mean"][3] = float("nan")
    atomic_save_tensors(f, t)
    return correct(c, scores=run), [str(f), "NaN or infinite"]


def correct_truncated_ranking(c: Ctx):
    run = c.copy(c.base.run, "run")
    f = run / "ranking-kfac.safetensors"
    f.write_bytes(f.read_bytes()[:64])
    return correct(c, scores=run), [str(f), "corrupted or truncated"]


def correct_missing_run(c: Ctx):
    return correct(c, scores=c.tmp / "no_run"), [str(c.tmp / "no_run"), "no such run directory"]


def oracle_without_labels(c: Ctx):
    return correct(c, method="ibo_oracle"), ["ibo_oracle", "--labels"]


def dpo_without_pairs(c: Ctx):
    return correct(c, method="dpo"), ["dpo", "--pairs"]


def malformed_labels_correct(c: Ctx):
    p = c.text("culprits.json", '{\n  "culprit_ids": ["a",\n}\n')
    return correct(c, "--labels", str(p), method="ibo_oracle"), [f"{p}:3", "cannot read culprit labels"]


def malformed_labels_attribute(c: Ctx):
    p = c.text("culprits.json", '{"culprit_ids": "not a list"}\n')
    return attribute(c, extra=("--labels", str(p))), [str(p), "field 'culprit_ids'"]


def unknown_influence_method(c: Ctx):
    return attribute(c, method="lnifac"), ["unknown influence method 'lnifac'"]


# --- environment ----------------------------------------------------------------------------------------------------


def out_parent_is_file_attribute(c: Ctx):
    f = c.text("a_file", "x")
    return attribute(c, out=f / "run"), [str(f / "run"), "Not a directory"]


def out_parent_is_file_finetune(c: Ctx):
    f = c.text("a_file", "x")
    return finetune(c, c.base.train, out=str(f / "model")), [str(f / "model"), "Not a directory"]


def out_parent_is_file_correct(c: Ctx):
    f = c.text("a_file", "x")
    return correct(c, out=str(f / "fixed")), [str(f / "fixed"), "Not a directory"]


def out_under_proc(c: Ctx):
    out = "/proc/lancet-reliability/out"  # nothing can be created under /proc, even as root
    return finetune(c, c.base.train, out=out), ["/proc/lancet-reliability"]


def disk_full_attribute(c: Ctx):
    _fail_fsync(c.monkeypatch)
    return attribute(c), [str(c.tmp / "out"), "No space left on device"]


def disk_full_report(c: Ctx):
    run = c.copy(c.base.run, "run")
    _fail_fsync(c.monkeypatch)
    return ["report", str(run)], [str(run / "report.json"), "No space left on device"]


def evaluate_missing_shared(c: Ctx):
    return (["evaluate", str(c.base.model), "--suite", "small", "--shared", "/nonexistent", "--out",
             str(c.tmp / "m.json")], ["small.json", "path not found: /nonexistent/"])


def evaluate_unknown_suite(c: Ctx):
    return (["evaluate", str(c.base.model), "--suite", "nope", "--out", str(c.tmp / "m.json")],
            ["suite 'nope' not found"])


def _cfg(c: Ctx, **extra: object) -> dict[str, object]:
    return {"model": str(c.base.model), "train": str(c.base.train), "iqs": str(c.base.iqs),
            "out": str(c.tmp / "run"), **extra}


def run_unknown_key(c: Ctx):
    cfg = c.config(_cfg(c, learning_rate=1e-5))
    return ["run", str(cfg)], [str(cfg), "unknown key(s) learning_rate"]


def run_conflicting_iqs(c: Ctx):
    cfg = c.config(_cfg(c, iq_prompts=str(c.base.iqs)))
    return ["run", str(cfg)], [str(cfg), "exactly one of 'iqs'", "'iq_prompts'"]


def run_invalid_json(c: Ctx):
    cfg = c.config('{\n  "model": "m",\n  "train": "t.jsonl",,\n}\n')
    return ["run", str(cfg)], [f"{cfg}:3", "not valid JSON"]


def run_bad_nested_option(c: Ctx):
    cfg = c.config(_cfg(c, influence={"method": "kfac", "dampnig": 0.1}))
    return ["run", str(cfg)], [str(cfg), "unknown influence option(s): dampnig"]


def report_missing_run_dir(c: Ctx):
    return ["report", str(c.tmp / "missing")], [str(c.tmp / "missing"), "run directory not found"]


def _fail_fsync(mp: pytest.MonkeyPatch) -> None:
    def fsync(fd: int) -> None:  # the write itself went to the page cache; the disk fills when it is flushed
        raise OSError(ENOSPC.errno, ENOSPC.strerror)

    mp.setattr(os, "fsync", fsync)


CLI_CASES: list[tuple[str, Case]] = [
    # data
    ("bad_json_line", bad_json_line),
    ("bad_json_document", bad_json_document),
    ("missing_prompt", missing_prompt),
    ("non_string_field", non_string_field),
    ("bad_chat_role", bad_chat_role),
    ("csv_extra_cells", csv_extra_cells),
    ("not_utf8", not_utf8),
    ("surrogate_jsonl", surrogate_jsonl),
    ("surrogate_chat_json", surrogate_chat_json),
    ("surrogate_hh_rlhf", surrogate_hh_rlhf),
    ("surrogate_safety_tuned_llamas", surrogate_safety_tuned_llamas),
    ("surrogate_harmful_prompts", surrogate_harmful_prompts),
    ("empty_data_file", empty_data_file),
    ("unknown_format", unknown_format),
    ("missing_data_path", missing_data_path),
    ("directory_as_data_file", directory_as_data_file),
    ("directory_as_jsonl", directory_as_jsonl),
    ("query_without_response", query_without_response),
    ("iq_response_truncated_attribute", iq_response_truncated_attribute),
    ("safe_rows_truncated_correct", safe_rows_truncated_correct),
    ("iq_response_truncated_correct", iq_response_truncated_correct),
    # models
    ("tokenizer_mismatch", tokenizer_mismatch),
    ("pickle_only_weights", pickle_only_weights),
    ("truncated_weights", truncated_weights),
    ("remote_code_refused", remote_code_refused),
    ("nan_weights_finetune", nan_weights_finetune),
    ("nan_weights_attribute_curvature", nan_weights_attribute_curvature),
    ("nan_weights_attribute_scores", nan_weights_attribute_scores),
    # artifacts
    ("foreign_training_data", foreign_training_data),
    ("foreign_model", foreign_model),
    ("truncated_curvature", truncated_curvature),
    ("truncated_scores", truncated_scores),
    ("corrupted_run_metadata", corrupted_run_metadata),
    ("foreign_finetune_out", foreign_finetune_out),
    ("correct_scores_of_other_rows", correct_scores_of_other_rows),
    ("correct_nan_scores", correct_nan_scores),
    ("correct_truncated_ranking", correct_truncated_ranking),
    ("correct_missing_run", correct_missing_run),
    ("oracle_without_labels", oracle_without_labels),
    ("dpo_without_pairs", dpo_without_pairs),
    ("malformed_labels_correct", malformed_labels_correct),
    ("malformed_labels_attribute", malformed_labels_attribute),
    ("unknown_influence_method", unknown_influence_method),
    # environment and configuration
    ("out_parent_is_file_attribute", out_parent_is_file_attribute),
    ("out_parent_is_file_finetune", out_parent_is_file_finetune),
    ("out_parent_is_file_correct", out_parent_is_file_correct),
    ("out_under_proc", out_under_proc),
    ("disk_full_attribute", disk_full_attribute),
    ("disk_full_report", disk_full_report),
    ("evaluate_missing_shared", evaluate_missing_shared),
    ("evaluate_unknown_suite", evaluate_unknown_suite),
    ("run_unknown_key", run_unknown_key),
    ("run_conflicting_iqs", run_conflicting_iqs),
    ("run_invalid_json", run_invalid_json),
    ("run_bad_nested_option", run_bad_nested_option),
    ("report_missing_run_dir", report_missing_run_dir),
]


@pytest.mark.parametrize("build", [pytest.param(b, id=i) for i, b in CLI_CASES])
def test_cli_bad_input(build: Case, base: Base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                       capsys: pytest.CaptureFixture[str]) -> None:
    argv, expected = build(Ctx(tmp_path, base, monkeypatch))
    expect_cli_error(capsys, argv, expected, (tmp_path, base.root))


# --- bad input that is tolerated safely (exit 0), where the contract is what is NOT done ---------------------------


def test_report_ignores_path_traversal_names(base: Base, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Method names come from file names and build other paths: unsafe ones are skipped, nothing escapes the run."""
    run = shutil.copytree(base.run, tmp_path / "runs" / "run")
    hostile = ["influence-..%2f..%2fx.json", "tokens-..%2f.json", "influence-a.b.json", "influence-.json",
               "influence--rf.json", "tokens-..json"]
    for name in hostile:
        (run / name).write_text(json.dumps({"top_positive": [{"prompt": "<script>alert(1)</script>"}]}))
    (run / "influence-..").mkdir()  # so that a raw join of "influence-../.." would resolve
    (run / "influence-dir.json").mkdir()  # a directory where a file is expected
    before = snapshot(tmp_path)
    assert main(["-q", "report", str(run)]) == 0
    after = snapshot(tmp_path)
    assert sorted(set(after) - set(before)) == [str(run / "report.html"), str(run / "report.json")]
    assert all(before[k] == after[k] for k in before)
    report = json.loads((run / "report.json").read_text())
    assert [e["method"] for e in report["influence"]] == ["kfac"] and report["tokens"] == {}
    assert "<script>alert(1)</script>" not in (run / "report.html").read_text()
    assert not temp_leftovers(tmp_path)


def test_remote_code_of_a_known_architecture_is_not_run(base: Base, tmp_path: Path) -> None:
    """A config with auto_map but a model_type transformers knows loads with the built-in code; the repo's own
    module is never imported without trust_remote_code=True."""
    from lancet.models.loading import load_model

    d = shutil.copytree(base.model, tmp_path / "m")
    sentinel = tmp_path / "PWNED"
    (d / "evil.py").write_text(f"import pathlib\npathlib.Path({str(sentinel)!r}).write_text('ran')\n"
                               "from transformers import LlamaConfig as C, LlamaForCausalLM as M\n")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.C", "AutoModelForCausalLM": "evil.M"}
    (d / "config.json").write_text(json.dumps(cfg))
    model, _ = load_model(str(d))
    assert type(model).__name__ == "LlamaForCausalLM" and not sentinel.exists()


# --- the Python API: the same errors as exceptions, with nothing partial left ---------------------------------------
# Each case builds its input and returns the call that must fail, so the snapshot is taken between the two.

Thunk = Callable[[], object]


def api_bad_json(c: Ctx) -> Thunk:
    from lancet.data import read_records

    p = c.text("bad.jsonl", json.dumps(OK_ROW) + "\n{oops\n")

    def call() -> None:
        try:
            read_records(p)
        except DataError as exc:  # the structured fields are part of the API, not only the message
            assert (exc.path, exc.line, exc.field) == (str(p), 2, None)
            raise

    return call


def api_records_from_rows(c: Ctx) -> Thunk:
    from lancet.data import records_from_rows

    return lambda: records_from_rows([OK_ROW, {"prompt": ["a", "list"]}], "memory")


def api_tokenizer_mismatch(c: Ctx) -> Thunk:
    from conftest import make_tokenizer

    from lancet.models.loading import load_model

    d = c.model_dir("small_vocab", tiny_llama(100), make_tokenizer())
    return lambda: load_model(str(d))


def api_truncated_weights(c: Ctx) -> Thunk:
    from lancet.models.loading import load_model

    d = c.copy(c.base.model, "m")
    (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")  # header: 8 bytes; 2 follow
    return lambda: load_model(str(d))


def api_remote_code(c: Ctx) -> Thunk:
    from lancet.models.loading import load_model

    argv, _ = remote_code_refused(c)
    return lambda: load_model(argv[1])


def api_truncated_artifact(c: Ctx) -> Thunk:
    f = c.copy(c.base.run / "ranking-kfac.safetensors", "r.safetensors")
    f.write_bytes(f.read_bytes()[:-7])
    return lambda: load_tensors(f)


def api_disk_full_bytes(c: Ctx) -> Thunk:
    f = c.text("keep.json", '{"old": true}\n')  # the previous version must survive a failed rewrite
    _disk_full(c)
    return lambda: atomic_write_bytes(f, b'{"new": true}\n')


def api_disk_full_tensors(c: Ctx) -> Thunk:
    f = c.copy(c.base.run / "ranking-kfac.safetensors", "r.safetensors")
    _disk_full(c)
    return lambda: atomic_save_tensors(f, {"x": torch.ones(3)})


def api_nan_scores_file(c: Ctx) -> Thunk:
    from lancet.correct import load_run_scores

    run = c.copy(c.base.run, "run")
    f = run / "ranking-kfac.safetensors"
    t = load_tensors(f)
    t["aggregate_normalized_mean"][0] = float("inf")
    atomic_save_tensors(f, t)
    ids = json.loads((run / "influence-kfac.json").read_text())["ids"]
    return lambda: load_run_scores(run, ids)


def api_nan_model_pairwise(c: Ctx) -> Thunk:
    from lancet.data import encode_records, read_records
    from lancet.influence import pairwise_scores
    from lancet.models.loading import load_model

    model, tok = load_model(str(c.base.nan_model))
    rows = encode_records(read_records(c.base.train, limit=4), tok, 128, progress=False)
    return lambda: pairwise_scores(model, rows, rows[:1], method="ekfac", progress=False)


def api_foreign_out_dir(c: Ctx) -> Thunk:
    from lancet.data import encode_records, read_records
    from lancet.influence import Influence, InfluenceArgs
    from lancet.models.loading import load_model

    run = c.copy(c.base.run, "run")
    model, tok = load_model(str(c.base.model))
    train = encode_records(read_records(c.base.train2), tok, 128, progress=False)
    queries = encode_records(read_records(c.base.iqs), tok, 128, progress=False)
    influence = Influence(model, InfluenceArgs(method="kfac", progress=False), out_dir=run)
    return lambda: influence.scores(train, queries)


def api_run_config_conflict(c: Ctx) -> Thunk:
    from lancet.pipeline import RunConfig

    return lambda: RunConfig.from_json({"model": "m", "train": "t.jsonl", "iqs": "q.jsonl", "iq_prompts": "p.jsonl"})


def api_influence_args(c: Ctx) -> Thunk:
    from lancet.influence import InfluenceArgs

    return lambda: InfluenceArgs(method="linfac", batch_size=0)


def api_correct_dpo_without_pairs(c: Ctx) -> Thunk:
    from lancet.correct import correct as run_correct
    from lancet.data import read_records
    from lancet.train import TrainArgs

    train = read_records(c.base.train)
    targs = TrainArgs(output_dir=str(c.tmp / "o"), max_steps=1, progress=False)
    return lambda: run_correct(str(c.base.model), train, torch.zeros(len(train)), method="dpo", train_args=targs)


API_CASES: list[tuple[str, Callable[[Ctx], Thunk], type[BaseException], str]] = [
    # (id, case, exception, message regex)
    ("read_records_bad_json", api_bad_json, DataError, r"bad\.jsonl:2: invalid JSON"),
    ("records_from_rows_type", api_records_from_rows, DataError, r"memory:2, field 'prompt': expected a string"),
    ("load_model_tokenizer_mismatch", api_tokenizer_mismatch, ModelError, r"embedding has 100 rows"),
    ("load_model_truncated_weights", api_truncated_weights, ModelError, r"corrupted or truncated safetensors"),
    ("load_model_remote_code", api_remote_code, ModelError, r"--trust-remote-code"),
    ("load_tensors_truncated", api_truncated_artifact, ArtifactError, r"r\.safetensors: corrupted or truncated"),
    ("atomic_write_bytes_disk_full", api_disk_full_bytes, OSError, r"No space left on device: .*keep\.json"),
    ("atomic_save_tensors_disk_full", api_disk_full_tensors, OSError,
     r"\[Errno 28\] No space left on device: .*r\.safetensors"),
    ("load_run_scores_nan", api_nan_scores_file, ArtifactError, r"ranking-kfac\.safetensors: .*NaN or infinite"),
    ("pairwise_scores_nan_model", api_nan_model_pairwise, LancetError, r"non-finite .* statistics in layer"),
    ("influence_foreign_out_dir", api_foreign_out_dir, ArtifactError, r"other inputs \(differs in train\)"),
    ("run_config_conflict", api_run_config_conflict, LancetError, r"exactly one of 'iqs'"),
    ("influence_args_invalid", api_influence_args, LancetError, r"invalid batch_size=0"),
    ("correct_dpo_without_pairs", api_correct_dpo_without_pairs, LancetError, r"dpo needs pairs \(--pairs\)"),
]


def _disk_full(c: Ctx) -> None:
    """Both atomic writers fail as a full disk would: fsync for bytes, a half-written file for safetensors."""
    import lancet.artifacts as artifacts

    _fail_fsync(c.monkeypatch)

    def save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str] | None = None) -> None:
        Path(filename).write_bytes(b"\x00" * 10)  # some bytes made it before the disk filled
        # what safetensors 0.8 raises on a full disk: its own type, not an OSError
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    c.monkeypatch.setattr(artifacts, "save_file", save_file)


@pytest.mark.parametrize(("case", "exc", "match"), [pytest.param(*rest, id=i) for i, *rest in API_CASES])
def test_api_bad_input(case: Callable[[Ctx], Thunk], exc: type[BaseException], match: str, base: Base,
                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    call = case(Ctx(tmp_path, base, monkeypatch))
    watch = (tmp_path, base.root)
    before = snapshot(*watch)
    with pytest.raises(exc, match=match) as info:
        call()
    assert "\n" not in str(info.value)  # one line: the CLI prints it as it is
    assert_unchanged(before, snapshot(*watch), watch)


@pytest.fixture()
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 32 KiB tmpfs (root only): a full disk without any monkeypatching."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_full_disk_then_resume(base: Base, tiny_disk: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The fingerprints fit, the 51 KB curvature does not: one line naming it, no temp file, no curvature and no
    ranking; with room again the same command finishes from what was kept."""
    argv = ["-q", *attribute(Ctx(tiny_disk, base, monkeypatch), out=tiny_disk / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    curvature = tiny_disk / "run" / "curvature" / "kfac" / "curvature.safetensors"
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"lancet: error: {curvature}: No space left on device"), err
    assert not temp_leftovers(tiny_disk) and not curvature.exists()
    assert sorted(p.name for p in tiny_disk.rglob("*") if p.is_file()) == ["meta.json"]  # the resume fingerprint
    subprocess.run(["mount", "-o", "remount,size=1m", str(tiny_disk)], check=True)
    assert main(argv) == 0
    assert (tiny_disk / "run" / "ranking-kfac.safetensors").is_file()


def test_the_tables_are_large_enough() -> None:
    """The brief of this suite: at least 28 bad-input cases, every id documented in docs/reliability.md."""
    ids = [i for i, *_ in CLI_CASES] + [i for i, *_ in API_CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 28
    doc = (Path(__file__).parents[1] / "docs" / "reliability.md").read_text()
    missing = [i for i in ids if f"[{i}]" not in doc]
    assert not missing, f"cases missing from docs/reliability.md: {missing}"
