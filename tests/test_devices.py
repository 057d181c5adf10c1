"""Devices: chosen in one place (lancet.hardware), followed by everything that touches the model.

On a CPU-only machine the CUDA paths cannot run; what runs here is the decision (auto, explicit, bad names), the
command-line and config plumbing, and that the results at a fixed precision did not move. The tests marked
``cuda`` compare CPU and CUDA scores and resume training on CUDA; they skip without a device (and
benchmarks/gpu_check.py runs the same comparisons on a lent GPU).
"""

import json

import pytest
import torch
from conftest import tiny_llama

from lancet.cli import build_parser, main
from lancet.curvature.task import fisher_cotangent
from lancet.errors import LancetError
from lancet.hardware import autocast, decide, model_device, resolve_device
from lancet.influence import Influence, InfluenceArgs
from lancet.train import TrainArgs

HAS_CUDA = torch.cuda.is_available()


def test_auto_is_cuda_when_available_else_cpu():
    assert resolve_device("auto").type == ("cuda" if HAS_CUDA else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_unavailable_or_unknown_devices_fail_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LancetError, match="CUDA is not available") as err:
        resolve_device("cuda")
    assert "\n" not in str(err.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(LancetError, match="only 1 CUDA device"):
        resolve_device("cuda:3")
    for bad in ("gpu", "mps:x", "meta"):
        with pytest.raises(LancetError, match="device"):
            resolve_device(bad)


def test_decide_returns_the_device_and_its_precision():
    device, precision = decide("cpu", "fp32")
    assert device.type == "cpu" and precision.name == "fp32" and not precision.bf16
    assert decide("cpu", "bf16")[1].bf16


def test_autocast_follows_the_device_and_is_a_no_op_when_off():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast(torch.device("cpu"), True):
        assert (a @ b).dtype == torch.bfloat16
    with autocast("cpu", False):
        assert (a @ b).dtype == torch.float32


def test_cli_precision_defaults_and_the_bf16_alias():
    parser = build_parser()
    base = ["attribute", "m", "--train", "t", "--queries", "q", "--out", "o"]
    assert parser.parse_args(base).precision == "fp32"
    assert parser.parse_args([*base, "--bf16"]).precision == "bf16"
    assert parser.parse_args([*base, "--precision", "auto"]).precision == "auto"
    assert parser.parse_args(["demo"]).precision == "auto" and parser.parse_args(["demo"]).device == "auto"
    for verb in (["finetune", "m", "--train", "t", "--out", "o"], ["correct", "m", "--train", "t", "--scores", "s",
                                                                  "--out", "o"], ["evaluate", "m", "--out", "o"]):
        ns = parser.parse_args([*verb, "--device", "cpu", "--precision", "bf16"])
        assert (ns.device, ns.precision) == ("cpu", "bf16")
    ns = parser.parse_args(["run", "c.json", "--device", "cuda:1"])
    assert (ns.device, ns.precision) == ("cuda:1", None)


def test_cli_unavailable_cuda_is_one_line_exit_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = main(["-q", "attribute", str(tmp_path / "m"), "--train", "t.jsonl", "--queries", "q.jsonl", "--out",
               str(tmp_path / "o"), "--device", "cuda"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "CUDA is not available" in err


def test_device_does_not_enter_the_training_fingerprint():
    a = TrainArgs(output_dir="x").fingerprint_dict()
    assert a == TrainArgs(output_dir="x", device="cpu").fingerprint_dict()
    assert "device" not in a
    assert TrainArgs.from_json(json.loads(json.dumps(TrainArgs(output_dir="x", device="cuda:1").to_json()))).device \
        == "cuda:1"


def test_fisher_draws_read_from_host_labels_are_the_same():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 7))
    labels[:, :3] = -100
    labels[2, 5:] = -100
    seeds = [5, 6, 7]
    assert torch.equal(fisher_cotangent(logits, labels, "sampled", seeds),
                       fisher_cotangent(logits, labels, "sampled", seeds, labels.clone()))


def _rows(n: int, seed: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(6, 12, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return rows


def scores_on(device: str, method: str) -> torch.Tensor:
    """Scores of a float64 tiny Llama on ``device`` (CPU results are what every other test pins)."""
    model = tiny_llama(64, dtype=torch.float64).to(device)
    args = InfluenceArgs(method=method, dtype="float64", batch_size=4, progress=False)
    return Influence(model, args).scores(_rows(12, 0, 64), _rows(3, 1, 64))["scores"]


def test_scores_come_back_on_the_host_from_a_cpu_model():
    s = scores_on("cpu", "linfac")
    assert s.device.type == "cpu" and s.shape == (3, 12) and torch.isfinite(s).all()
    assert model_device(tiny_llama(64)).type == "cpu"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["linfac", "ekfac", "identity", "cosine"])
def test_cuda_scores_equal_cpu_scores_in_float64(method):
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu, cuda = scores_on("cpu", method), scores_on("cuda", method)
    assert cuda.device.type == "cpu"
    assert float((cpu - cuda).norm() / cpu.norm()) <= 1e-8


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                                                "allocate memory: you tried to allocate 34359738368 bytes")])
def test_out_of_memory_is_one_line_naming_the_knobs(monkeypatch, capsys, error):
    import lancet.cli as cli

    def boom(ns):
        raise error

    monkeypatch.setitem(cli.COMMANDS, "attribute", boom)
    rc = main(["-q", "attribute", "m", "--train", "t", "--queries", "q", "--out", "o"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert all(k in err for k in ("--batch-size", "--query-rank", "--modules", "resumes"))
    assert ("GPU" in err) == isinstance(error, torch.cuda.OutOfMemoryError)
    monkeypatch.setitem(cli.COMMANDS, "attribute", lambda ns: (_ for _ in ()).throw(RuntimeError("other bug")))
    with pytest.raises(RuntimeError, match="other bug"):  # any other error keeps its traceback
        main(["-q", "attribute", "m", "--train", "t", "--queries", "q", "--out", "o"])
