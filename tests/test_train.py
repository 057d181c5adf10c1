import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

from lancet.data.records import Record
from lancet.data.tokenize import encode_records
from lancet.errors import ArtifactError, LancetError
from lancet.train import DONE_FILE, LOG_FILE, TrainArgs, Trainer

ROWS = [
    Record(prompt=f"What is {a} plus {b}?", response=f"{a} plus {b} is {a + b}.") for a in range(6) for b in range(4)
]


def _encoded(tok):
    return encode_records(ROWS, tok, 64, progress=False)


def _trainer(tmp_path, tok, model=None, **kw):
    opts = {"batch_size": 4, "lr": 1e-2, "max_steps": 6, "save_every": 2, "progress": False, **kw}
    args = TrainArgs(output_dir=str(tmp_path / "out"), **opts)
    return Trainer(model or tiny_llama(len(tok)), tok, args, _encoded(tok))


def _eval_loss(model, tok):
    from lancet.data.tokenize import collate

    batch = collate(list(_encoded(tok)), pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        return model(**batch).loss.item()


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_every_trainable_parameter_moves_and_loss_drops(tmp_path, tiny_tokenizer, lora, make):
    model = make(len(tiny_tokenizer))
    before_loss = _eval_loss(model, tiny_tokenizer)
    trainer = _trainer(tmp_path, tiny_tokenizer, model=model, lora=lora)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    still = [n for n, p in before.items() if torch.equal(p, after[n])]
    assert still == []
    if lora:
        assert all("lora_" in n for n in before)
    assert _eval_loss(trainer.model, tiny_tokenizer) < before_loss - 0.05
    rows = [json.loads(x) for x in (tmp_path / "out" / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "out" / DONE_FILE).is_file()
    assert list((tmp_path / "out").glob("checkpoint-*")) == []


class _Crash(Exception):
    pass


def test_resume_after_crash_is_bit_identical(tmp_path, tiny_tokenizer):
    ref = _trainer(tmp_path / "ref", tiny_tokenizer)
    ref.train()

    crashing = _trainer(tmp_path / "run", tiny_tokenizer, grad_accum=1)
    original = crashing.optimizer.step
    calls = {"n": 0}

    def step_then_crash():
        original()
        calls["n"] += 1
        if calls["n"] == 5:  # after the checkpoint at step 4, before the end
            raise _Crash

    crashing.optimizer.step = step_then_crash
    with pytest.raises(_Crash):
        crashing.train()
    assert (tmp_path / "run" / "out" / "checkpoint-4").is_dir()
    resumed = _trainer(tmp_path / "run", tiny_tokenizer)
    resumed.train()
    for (n, a), (_, b) in zip(ref.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "out" / LOG_FILE).read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_finished_run_is_reused_and_foreign_run_refused(tmp_path, tiny_tokenizer):
    _trainer(tmp_path, tiny_tokenizer).train()
    t = _trainer(tmp_path, tiny_tokenizer)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.train()  # reuse: no training happens
    assert all(torch.equal(before[n], p) for n, p in t.model.named_parameters())
    with pytest.raises(ArtifactError, match="other inputs"):
        _trainer(tmp_path, tiny_tokenizer, lr=2e-2).train()


def test_args_validation_and_json_roundtrip():
    args = TrainArgs(output_dir="x", lr=1e-3, lora=True)
    assert TrainArgs.from_json(json.loads(json.dumps(args.to_json()))) == args
    with pytest.raises(LancetError, match="batch_size"):
        TrainArgs(output_dir="x", batch_size=0)
    with pytest.raises(LancetError, match="unknown training option"):
        TrainArgs.from_json({"output_dir": "x", "learning_rate": 1})


@pytest.mark.parametrize(("option", "value", "message"), [
    ("lr", "1e-5", "invalid training option lr='1e-5': expected a number"),
    ("lr", None, "invalid training option lr=None: expected a number"),
    ("lr", [1e-5], "invalid training option lr=[1e-05]: expected a number"),
    ("lr", True, "invalid training option lr=True: expected a number"),
    ("lr", float("nan"), "invalid training option lr=nan: must be a finite number > 0"),
    ("epochs", float("inf"), "invalid training option epochs=inf: must be a finite number > 0"),
    ("batch_size", True, "invalid training option batch_size=True: expected an integer"),
    ("batch_size", 8.0, "invalid training option batch_size=8.0: expected an integer"),
    ("batch_size", "8", "invalid training option batch_size='8': expected an integer"),
    ("max_steps", False, "invalid training option max_steps=False: expected an integer or null"),
    ("max_steps", 0, "invalid training option max_steps=0: must be >= 1 or null"),
    ("lora", "false", "invalid training option lora='false': expected true or false"),
    ("lora", 1, "invalid training option lora=1: expected true or false"),
    ("lora_targets", "q_proj", "invalid training option lora_targets='q_proj': expected a list of strings"),
    ("lora_alpha", 0, "invalid training option lora_alpha=0: must be >= 1"),
    ("seed", None, "invalid training option seed=None: expected an integer"),
    ("device", 0, "invalid training option device=0: expected a string or null"),
])
def test_args_reject_wrong_types_in_one_line(option, value, message):
    """What a JSON config can get wrong (a string for a number, null, a list, a bool for an int) is one line naming
    the option and the value, not a TypeError from a comparison, and never a truthy string taken as true."""
    from lancet.train import OptionError

    with pytest.raises(OptionError) as err:
        TrainArgs.from_json({"output_dir": "x", option: value})
    assert str(err.value) == message
    assert (err.value.option, err.value.reason) == (option, message.split(": ", 1)[1])
    with pytest.raises(LancetError, match="expected a JSON object"):
        TrainArgs.from_json(["x"])


def test_args_take_ints_for_floats_and_paths_for_the_output_dir(tmp_path):
    import numpy as np

    args = TrainArgs(output_dir=tmp_path / "o", lr=1, epochs=2, batch_size=np.int64(4), lora_targets=("q_proj",))
    assert args.output_dir == str(tmp_path / "o") and args.lora_targets == ["q_proj"]
    assert TrainArgs.from_json(json.loads(json.dumps(args.to_json(), default=int))) == args


def test_a_batch_truncated_before_its_responses_counts_zero(tmp_path, tiny_tokenizer):
    """Rows cut off before their response leave a batch with no target: its loss is 0 (not NaN), the run goes on."""
    from lancet.data.tokenize import collate

    trainer = _trainer(tmp_path, tiny_tokenizer)
    batch = collate(list(encode_records(ROWS[:4], tiny_tokenizer, 12, progress=False)), tiny_tokenizer.pad_token_id)
    assert (batch["labels"] == -100).all()
    loss, logged = trainer.compute_loss(batch)
    loss.backward()
    assert loss.item() == 0.0 and logged == {"loss": 0.0}
    assert all(p.grad is None or not p.grad.any() for p in trainer.model.parameters())
    full = collate(list(_encoded(tiny_tokenizer))[:4], tiny_tokenizer.pad_token_id)
    assert trainer.compute_loss(full)[0].item() > 0


def test_nonfinite_loss_stops_with_clear_error(tmp_path, tiny_tokenizer):
    trainer = _trainer(tmp_path, tiny_tokenizer)
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    with pytest.raises(LancetError, match="non-finite loss"):
        trainer.train()


def test_cli_finetune_killed_and_resumed(tmp_path, tiny_tokenizer):
    """kill -9 the real CLI mid-run, rerun the same command: it resumes from its checkpoint and finishes."""
    model_dir = tmp_path / "base"
    tiny_llama(len(tiny_tokenizer)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    from lancet.data.demo import write_demo_dataset

    data = write_demo_dataset(tmp_path / "demo")["train"]  # the demo data, on a tiny model for speed
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "lancet.cli",
        "-q",
        "finetune",
        str(model_dir),
        "--train",
        str(data),
        "--out",
        str(out),
        "--max-steps",
        "300",
        "--save-every",
        "5",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--max-length",
        "128",  # every demo row keeps response tokens (at 64, 58 lose theirs: finetune refuses such rows)
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoint_latest.json").exists():
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed_from = json.loads((out / "checkpoint_latest.json").read_text())["step"]
    assert 5 <= resumed_from < 300
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    steps = [json.loads(x)["step"] for x in (out / LOG_FILE).read_text().splitlines()]
    assert steps == list(range(1, 301))
    assert (out / "model.safetensors").is_file() and (out / DONE_FILE).is_file()
