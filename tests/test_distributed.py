"""torchrun with 2 gloo processes on CPU (tests/distributed_worker.py) against the same runs in this single process,
tiny float64 Llama: curvature factors and scores within 1e-6, training losses and weights within 1e-6 (relative to
their scale; observed differences are ~1e-12, summation order), and kill + resume under torchrun.

Factors are compared as eigenvalues and as the matrices they rebuild (V diag(vals) V^T): eigenvectors are only
defined up to sign (and rotation within repeated eigenvalues), so comparing them entry by entry would test eigh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_worker import INFLUENCE_CONFIGS, QUERIES, TRAIN, TRAINERS, influence, tokenizer, trainer

from lancet.artifacts import load_tensors
from lancet.train import LOG_FILE

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
RTOL = 1e-6


def torchrun(*args: str, kill: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LANCET_TEST_KILL")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if kill:
        env["LANCET_TEST_KILL"] = kill
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def run_worker(out: Path, mode: str, kill: str | None = None) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    return torchrun(str(WORKER), str(out), mode, kill=kill)


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def factors_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        layer, name = key.rsplit("::", 1)
        if name.endswith("_vecs"):
            vals = expected[f"{layer}::{name[0]}_vals"]
            rebuilt = [v @ torch.diag(vals) @ v.T for v in (actual[key], value)]
            close(rebuilt[0], rebuilt[1])
        else:
            close(actual[key], value)


def losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun")
    done = run_worker(out, "all")
    assert done.returncode == 0, done.stderr[-4000:]
    return out


@pytest.mark.parametrize(("method", "fisher"), INFLUENCE_CONFIGS)
def test_factors_and_scores_match_one_process(two_process_run, tmp_path, method, fisher):
    expected = influence(tmp_path, method, fisher)  # this process: no WORLD_SIZE, no process group
    run = two_process_run / f"influence-{method}-{fisher}"
    factors_close(load_tensors(next(run.glob("curvature/*/curvature.safetensors"))),
                  load_tensors(next(tmp_path.glob("curvature/*/curvature.safetensors"))))
    stored = load_tensors(next(run.glob("scores/*/scores.safetensors")))
    for key in ("scores", "per_layer"):
        close(stored[key], expected[key])
    # every rank returned the gathered scores, in the original row order
    ranks = [torch.load(two_process_run / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key in ("scores", "per_layer"):
        assert torch.equal(ranks[0][f"{method}-{fisher}/{key}"], ranks[1][f"{method}-{fisher}/{key}"])
        assert torch.equal(ranks[0][f"{method}-{fisher}/{key}"], stored[key])
    # no partial files, temp files or per-rank artifacts left behind
    assert not list(run.rglob("*.partial.safetensors")) and not list(run.rglob("*.tmp"))


@pytest.mark.parametrize("kind", TRAINERS)
def test_training_matches_one_process(two_process_run, tmp_path, kind):
    """The global micro-batch and its loss normalisation are those of one process, so losses agree to rounding.
    The ranks' parts of a micro-batch have different response-token counts (51 and 42 in the first): a mean of
    per-rank means would be off by 1e-4 in the first loss here, 100x the tolerance. Weights agree to ~1e-15; the
    logged SFT loss to ~5e-8, as the model's own loss code computes it in float32."""
    single = trainer(kind, tmp_path / "single")
    single.train()
    run = two_process_run / f"train-{kind}"
    got, want = losses(run), losses(tmp_path / "single")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(got, want, strict=True):
        assert set(a) == set(b)
        for key in set(b) - {"seconds", "step", "lr"}:
            assert a[key] == pytest.approx(b[key], rel=RTOL, abs=RTOL), (a["step"], key)
    if kind == "sft_fsdp":  # the saved model, gathered from the shards
        weights = load_tensors(run / "model.safetensors")
    else:  # what rank 1 trained (rank 0 saved the same: checked for sft by the resume test)
        weights = {k.split("/", 1)[1]: v for k, v in torch.load(two_process_run / "rank1.pt", weights_only=True).items()
                   if k.startswith(f"{kind}/")}
    for name, p in single.module.named_parameters():
        close(weights[name], p.detach())
    assert not list(run.glob("checkpoint-*")) and (run / "lancet_done.json").is_file()


def test_kill_and_resume_under_torchrun(tmp_path):
    """Rank 0 dies (os._exit) mid-fit, then mid-scoring, then mid-training; torchrun stops the other rank; each
    rerun resumes from what rank 0 saved (chunk of rows / checkpoint) and the end equals one process."""
    out = tmp_path / "run"
    # 12 rows, batch 2, chunks of 4: rank 0 makes one forward per chunk. Fit: 3 covariance chunks, then dies at the
    # 2nd lambda chunk (the 1st is saved).
    died = run_worker(out, "resume", kill="fit:4")
    assert died.returncode != 0
    cdir = out / "influence" / "curvature" / "linfac"
    assert int(load_tensors(cdir / "pass-lambda.partial.safetensors")["__progress__::rows_done"]) == 4
    assert not (cdir / "curvature.safetensors").exists()
    # scoring: 2 query batches, then one forward per chunk; dies after 2 chunks
    died = run_worker(out, "resume", kill="score:4")
    assert died.returncode != 0
    assert (cdir / "curvature.safetensors").is_file()
    (partial,) = (out / "influence" / "scores").glob("*/scores.partial.safetensors")
    assert int(load_tensors(partial)["rows_done"]) == 8
    # training: dies after the 3rd optimizer step (checkpoint at step 2)
    died = run_worker(out, "resume", kill="train:3")
    assert died.returncode != 0
    assert json.loads((out / "train-sft" / "checkpoint_latest.json").read_text())["step"] == 2
    finished = run_worker(out, "resume")
    assert finished.returncode == 0, finished.stderr[-4000:]

    expected = influence(None, "linfac", "sampled")["scores"]
    for r in (0, 1):
        close(torch.load(out / f"rank{r}.pt", weights_only=True)["scores"], expected)
    single = trainer("sft", tmp_path / "single")
    single.train()
    got, want = losses(out / "train-sft"), losses(tmp_path / "single")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=RTOL)
    weights = load_tensors(out / "train-sft" / "model.safetensors")
    for name, p in single.module.named_parameters():
        close(weights[name], p.detach())
    assert not list(out.rglob("*.partial.safetensors"))


def cli_inputs(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """A saved tiny model and the worker's train and query rows as JSONL files, for the CLI under torchrun."""
    from conftest import tiny_llama

    tok = tokenizer()
    model_dir = tmp_path / "model"
    tiny_llama(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    files = {}
    for name, pairs in (("train", TRAIN), ("queries", QUERIES)):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    return model_dir, files


def test_cli_attribute_under_torchrun(tmp_path, capsys):
    """The same `lancet attribute` command under torchrun: the same ranking (float32: to rounding), printed once,
    artifacts written once."""
    from lancet.cli import main

    model_dir, files = cli_inputs(tmp_path)
    args = ["attribute", str(model_dir), "--train", str(files["train"]), "--queries", str(files["queries"]),
            "--method", "ekfac", "--batch-size", "2", "--max-length", "64"]
    done = torchrun("-m", "lancet.cli", "-q", *args, "--out", str(tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("training rows x 3 queries") == 1
    assert main(["-q", *args, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    two, one = (load_tensors(tmp_path / d / "ranking-ekfac.safetensors") for d in ("two", "one"))
    close(two["scores"], one["scores"], rtol=1e-4)
    summaries = [json.loads((tmp_path / d / "influence-ekfac.json").read_text()) for d in ("two", "one")]
    assert summaries[0]["ids"] == summaries[1]["ids"]
    assert not list((tmp_path / "two").rglob("*.tmp"))


def test_cli_index_under_torchrun(tmp_path, capsys):
    """`lancet index` under torchrun: the shards still to do are dealt to the two ranks; the index holds the same
    shards and projected gradients as a one-process build (float32: to rounding), and answers the same queries."""
    from lancet.cli import main

    model_dir, files = cli_inputs(tmp_path)
    args = ["index", str(model_dir), "--train", str(files["train"]), "--method", "ekfac", "--batch-size", "2",
            "--max-length", "64", "--rank", "8", "--dtype", "float32", "--shard-rows", "3"]
    done = torchrun("-m", "lancet.cli", "-q", *args, "--out", str(tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count('"shards": 4') == 1
    assert main(["-q", *args, "--out", str(tmp_path / "one")]) == 0
    metas = [json.loads((tmp_path / d / "index.json").read_text()) for d in ("two", "one")]
    assert [s["data"] for s in metas[0]["shards"]] == [s["data"] for s in metas[1]["shards"]]
    for shard in metas[1]["shards"]:
        two, one = (load_tensors(tmp_path / d / shard["file"]) for d in ("two", "one"))
        for key, value in one.items():
            close(two[key].double(), value.double(), rtol=1e-4)
    query = ["-q", "attribute", str(model_dir), "--train", str(files["train"]), "--queries", str(files["queries"]),
             "--method", "ekfac", "--max-length", "64"]
    for d in ("two", "one"):
        assert main([*query, "--out", str(tmp_path / f"q-{d}"), "--index", str(tmp_path / d)]) == 0
    capsys.readouterr()
    two, one = (load_tensors(tmp_path / f"q-{d}" / "ranking-ekfac.safetensors")["scores"] for d in ("two", "one"))
    close(two, one, rtol=1e-4)
    assert not list((tmp_path / "two").rglob("*.tmp"))
