"""Supervised fine-tuning (full or LoRA): builds the contaminated models for the demo and the benchmarks.

With ``keep_checkpoints=K`` the run also keeps K models evenly spaced over training (``OUT/checkpoints/step-S/``),
each a directory ``load_model`` reads, with Adam's second moment and the learning rates it stands for beside it:
the inputs of checkpoint-aware influence (TracIn; TrackStar and LESS's optimizer normalisation;
lancet/influence/checkpoints.py, docs/method.md §2.11).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lancet.artifacts import atomic_save_tensors, atomic_write_json
from lancet.constants import DEFAULT_MAX_LENGTH
from lancet.data.records import Record
from lancet.data.tokenize import encode_records, require_response_tokens
from lancet.errors import LancetError
from lancet.models.loading import load_model
from lancet.train import CKPT_POINTER, DONE_FILE, TrainArgs, Trainer

KEPT_DIR = "checkpoints"  # not "checkpoint-*": Trainer deletes those (its resume points) when the run ends
CHECKPOINT_META = "lancet_checkpoint.json"  # written last: a directory without it is unfinished
SECOND_MOMENT_FILE = "adam_second_moment.safetensors"


def finetune(
    model_spec: str,
    train: Sequence[Record],
    args: TrainArgs,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    trust_remote_code: bool = False,
    keep_checkpoints: int | None = None,
) -> Path:
    """Fine-tune ``model_spec`` on ``train`` (loss on response tokens only) and save an HF directory to
    ``args.output_dir``. Resumes from the last checkpoint there; reuses a finished run with the same inputs.
    ``keep_checkpoints=K``: also keep K evenly spaced models under ``OUT/checkpoints/`` (``KeepingTrainer``).

    Every row must keep a response token after truncation to ``max_length``: a prompt-only or truncated-away row
    stops the run with a ``DataError`` naming its file:line (as the correction's rows do)."""
    if keep_checkpoints is not None and keep_checkpoints < 1:  # before the model loads
        raise LancetError(f"invalid keep_checkpoints={keep_checkpoints!r}: must be >= 1")
    model, tokenizer = load_model(model_spec, trust_remote_code=trust_remote_code, device=args.load_device)
    encoded = encode_records(list(train), tokenizer, max_length, progress=args.progress)
    require_response_tokens(encoded)  # a prompt-only or truncated-away row would train on nothing and "succeed"
    if keep_checkpoints is None:
        trainer = Trainer(model, tokenizer, args, encoded, base_spec=model_spec)
    else:
        trainer = KeepingTrainer(model, tokenizer, args, encoded, base_spec=model_spec, keep=keep_checkpoints)
    return trainer.train()


def kept_steps(total_steps: int, keep: int) -> list[int]:
    """The K steps kept of a T-step run: ceil(k T / K) for k = 1..K, evenly spaced, the last one the final model;
    distinct while K <= T."""
    if keep < 1:
        raise LancetError(f"invalid keep_checkpoints={keep!r}: must be >= 1")
    if keep > total_steps:
        raise LancetError(f"keep_checkpoints={keep} is more than the run's {total_steps} optimizer steps")
    return [-(-k * total_steps // keep) for k in range(1, keep + 1)]


class KeepingTrainer(Trainer):
    """A ``Trainer`` that keeps K models evenly spaced over training (``kept_steps``) in ``OUT/checkpoints/step-S/``:
    the model (an adapter under LoRA: merging would change the module mid-run), the tokenizer, Adam's second moment
    ``exp_avg_sq`` per trainable parameter (``adam_second_moment.safetensors``) and ``lancet_checkpoint.json`` (the
    step, the learning rate of that step, the sum of the learning rates of the steps since the previous kept one,
    Adam's betas, eps and step count). K enters the run's fingerprint: a run without kept checkpoints is not resumed
    or reused as one with them (its earlier checkpoints would be missing); without K nothing changes."""

    def __init__(self, model, tokenizer, args: TrainArgs, train_items: Sequence[Any], *, base_spec: str = "",
                 keep: int):
        self.keep = keep  # before Trainer.__init__, which fingerprints extra_fingerprint()
        super().__init__(model, tokenizer, args, train_items, base_spec=base_spec)
        if self.world > 1:  # FSDP shards the parameters and Adam's state: gathering them is not written yet
            raise LancetError("keep_checkpoints is not supported under torchrun yet: run the fine-tuning in one "
                              "process, or leave out --keep-checkpoints")
        self.kept = kept_steps(self.total_steps, keep)

    def extra_fingerprint(self) -> dict[str, Any]:
        return {"keep_checkpoints": self.keep}

    def train(self, on_checkpoint=None) -> Path:
        pointer = self.out / CKPT_POINTER
        ours = not pointer.is_file() or json.loads(pointer.read_text()).get("fingerprint") == self.fingerprint
        if not (self.out / DONE_FILE).is_file() and ours:  # else Trainer refuses the directory: nothing is touched
            # a run started afresh over an unfinished one of other inputs (no resume point yet) would leave that
            # run's kept models beside its own; unfinished directories are rewritten when their step comes
            for old in kept_dirs(self.out):
                meta = _read_meta(old)
                if meta is None or meta.get("fingerprint") != self.fingerprint:
                    shutil.rmtree(old, ignore_errors=True)
        return super().train(on_checkpoint)

    def after_step(self, step: int) -> None:
        if step in self.kept:
            self.save_kept(step)

    def save_kept(self, step: int) -> Path:
        directory = self.out / KEPT_DIR / f"step-{step}"
        meta_path = directory / CHECKPOINT_META
        old = _read_meta(directory)
        if old is not None and old.get("fingerprint") == self.fingerprint:
            return directory  # kept before a kill: the step is a pure function of the run, the files are the same
        meta_path.unlink(missing_ok=True)
        self.save_model(directory)
        second = {}
        for name, p in zip(self.param_names, self.params, strict=True):
            state = self.optimizer.state.get(p, {})
            if "exp_avg_sq" in state:
                second[name] = state["exp_avg_sq"].detach().cpu().contiguous()
        if second:
            atomic_save_tensors(directory / SECOND_MOMENT_FILE, second)
        group = self.optimizer.param_groups[0]
        adam_step = next((int(s["step"]) for s in self.optimizer.state.values() if "step" in s), step)
        previous = max([s for s in self.kept if s < step], default=0)
        atomic_write_json(meta_path, {
            "step": step, "total_steps": self.total_steps, "keep": self.keep,
            # step s ran at _lr(s - 1); the interval (previous, s] is what this checkpoint stands for in TracIn
            "lr": self._lr(step - 1), "lr_sum": sum(self._lr(i) for i in range(previous, step)),
            "interval": [previous, step],
            "adam": {"betas": [float(b) for b in group["betas"]], "eps": float(group["eps"]), "step": adam_step,
                     "weight_decay": float(group["weight_decay"])},
            "second_moment": SECOND_MOMENT_FILE if second else None,
            "lora": self.args.lora, "base": self.base_spec, "fingerprint": self.fingerprint,
        })
        return directory


@dataclass(frozen=True)
class KeptCheckpoint:
    """One kept checkpoint as ``lancet_checkpoint.json`` describes it (``read_checkpoint``)."""

    path: Path
    step: int
    lr: float  # the learning rate of its step
    lr_sum: float  # the sum of the learning rates of the steps it stands for: (previous kept step, step]
    adam: dict[str, Any]  # betas, eps, step count, weight decay
    second_moment: Path | None  # Adam's exp_avg_sq per trainable parameter, when saved

    @property
    def name(self) -> str:
        return self.path.name


def _read_meta(directory: Path) -> dict[str, Any] | None:
    path = directory / CHECKPOINT_META
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_checkpoint(directory: str | Path) -> KeptCheckpoint:
    """A kept checkpoint directory (``OUT/checkpoints/step-S``)."""
    directory = Path(directory)
    meta = _read_meta(directory)
    if meta is None:
        raise LancetError(f"{directory}: not a finished kept checkpoint (no readable {CHECKPOINT_META}; written by "
                          "`lancet finetune --keep-checkpoints K`)")
    second = directory / meta["second_moment"] if meta.get("second_moment") else None
    return KeptCheckpoint(directory, int(meta["step"]), float(meta["lr"]), float(meta["lr_sum"]),
                          dict(meta.get("adam") or {}), second)


def kept_dirs(run_dir: str | Path) -> list[Path]:
    """The ``step-S`` directories under ``run_dir/checkpoints``, by step (finished or not)."""
    root = Path(run_dir) / KEPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def kept_checkpoints(run_dir: str | Path) -> list[KeptCheckpoint]:
    """Every kept checkpoint of a finished ``lancet finetune --keep-checkpoints K`` run, by step."""
    run_dir = Path(run_dir)
    if not (run_dir / DONE_FILE).is_file():
        raise LancetError(f"{run_dir}: not a finished fine-tuning run (no {DONE_FILE}); finish it first (rerun the "
                          "same `lancet finetune` command to resume)")
    dirs = kept_dirs(run_dir)
    if not dirs:
        raise LancetError(f"{run_dir}: the run kept no checkpoints (fine-tune with --keep-checkpoints K)")
    return [read_checkpoint(d) for d in dirs]


def resolve_checkpoints(spec: str | Path | Sequence[str | Path]) -> list[KeptCheckpoint]:
    """Checkpoints from a fine-tuning run directory (all it kept), a comma-separated list of kept checkpoint
    directories, or a list of either."""
    items = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    if not items:
        raise LancetError("no checkpoints given")
    out: list[KeptCheckpoint] = []
    for item in items:
        path = Path(item)
        if (path / KEPT_DIR).is_dir() and not (path / CHECKPOINT_META).is_file():  # a fine-tuning run: all it kept
            out.extend(kept_checkpoints(path))
        else:
            out.append(read_checkpoint(path))
    return out
