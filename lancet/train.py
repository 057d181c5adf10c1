"""The training loop every trainer shares (fine-tuning now, correction methods later).

One optimizer step = ``grad_accum`` micro-batches. The data order is a pure function of (seed, epoch), so a run
killed at any point resumes from its last checkpoint onto exactly the batches it would have seen.

Under torchrun (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel (or sharded with FSDP2 when
``fsdp``), every rank takes a disjoint contiguous part of each global micro-batch (so the global batch is the one of
a single process), and losses are normalised by the *global* micro-batch's denominators (token counts, pair
weights, row counts: ``loss_denominators``, all-reduced), so the summed gradient equals the single-process one up
to summation order. Only rank 0 writes checkpoints, the log and the final model; every rank reads a checkpoint to
resume (which also works with another number of processes).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lancet import distributed as dist
from lancet.artifacts import atomic_save_tensors, atomic_write_json, hash_json, load_tensors, model_fingerprint
from lancet.curvature.task import shifted_targets
from lancet.data.tokenize import collate
from lancet.errors import ArtifactError, LancetError
from lancet.hardware import autocast, model_device, resolve_device
from lancet.options import OptionError, check_option_types, options_from_json, short_repr  # noqa: F401

log = logging.getLogger(__name__)
DONE_FILE = "lancet_done.json"
LOG_FILE = "train_log.jsonl"
CKPT_POINTER = "checkpoint_latest.json"


@dataclass
class TrainArgs:
    """Options of every trainer; validated on creation and JSON round-trippable (``to_json``/``from_json``)."""

    output_dir: str
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_targets: list[str] = field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
            "c_attn",
            "c_proj",
            "c_fc",
        ]
    )
    merge_lora: bool = False
    bf16: bool = False
    seed: int = 0
    save_every: int = 50
    progress: bool = True
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of DDP
    # None: train where the model already is; else move it there first ("auto": CUDA when available)
    device: str | None = None

    # Options that do not change the result: excluded from the fingerprint that gates reuse and resume (a run
    # resumed on another device continues it: the results agree to rounding, not bit for bit).
    _UNHASHED = ("output_dir", "save_every", "progress", "fsdp", "device")

    def __post_init__(self) -> None:
        if isinstance(self.output_dir, os.PathLike):  # a Path would not survive to_json (the run's done file)
            self.output_dir = os.fspath(self.output_dir)
        if isinstance(self.lora_targets, tuple):  # JSON has lists: keeps to_json -> from_json equal
            self.lora_targets = list(self.lora_targets)
        check_option_types(self, "training")  # before the range checks: "1e-5" > 0 is a TypeError
        checks = {
            "epochs": (self.epochs > 0 and math.isfinite(self.epochs), "must be a finite number > 0"),
            "batch_size": (self.batch_size >= 1, "must be >= 1"),
            "grad_accum": (self.grad_accum >= 1, "must be >= 1"),
            "lr": (self.lr > 0 and math.isfinite(self.lr), "must be a finite number > 0"),
            "weight_decay": (self.weight_decay >= 0 and math.isfinite(self.weight_decay),
                             "must be a finite number >= 0"),
            "warmup_steps": (self.warmup_steps >= 0, "must be >= 0"),
            "max_grad_norm": (self.max_grad_norm > 0, "must be > 0"),
            "lora_r": (self.lora_r >= 1, "must be >= 1"),
            "lora_alpha": (self.lora_alpha >= 1, "must be >= 1"),
            "save_every": (self.save_every >= 1, "must be >= 1"),
            "max_steps": (self.max_steps is None or self.max_steps >= 1, "must be >= 1 or null"),
        }
        for name, (ok, reason) in checks.items():
            if not ok:
                raise OptionError("training", name, getattr(self, name), reason)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainArgs:
        return options_from_json(cls, data, "training", required=("output_dir",))

    def fingerprint_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_json().items() if k not in self._UNHASHED}

    @property
    def load_device(self) -> str:
        """Where a function that loads the model itself (``finetune``, ``correct``) puts it: ``device``, else auto."""
        return self.device if self.device is not None else "auto"


def _fused_adam_supported(params: list[torch.nn.Parameter]) -> bool:
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


class Trainer:
    """Shared loop: batching, bf16 autocast, accumulation, clipping, schedule, checkpoint/resume, logging.

    Subclasses override ``compute_loss`` (and ``collate`` if their items are not token rows). To train under
    torchrun they also declare ``loss_denominators`` (the sums their loss divides by, from a collated batch) and
    divide by ``denominator(key, local)``; every logged part must then be a sum over rows divided by such a
    denominator, so that the parts of all ranks add up to the global value (the loop sums them over ranks).

    ``self.module`` is the model being trained (what is saved); ``self.model`` is what the loop calls: the same
    module in one process or under FSDP (sharded in place), its DistributedDataParallel wrapper under torchrun.
    """

    name = "sft"

    def __init__(self, model, tokenizer, args: TrainArgs, train_items: Sequence[Any], *, base_spec: str = ""):
        self.tokenizer, self.args, self.items, self.base_spec = tokenizer, args, train_items, base_spec
        self.out = Path(args.output_dir)
        if len(train_items) == 0:
            raise LancetError("no training rows")
        dist.init_from_env()
        self.world = dist.world_size()
        if args.fsdp and args.lora and args.merge_lora:
            raise LancetError("--merge-lora is not supported with --fsdp: save the adapter, merge it afterwards")
        self.model_fp = model_fingerprint(model)
        if args.device is not None:
            model = model.to(resolve_device(args.device))
        self.device = model_device(model)
        torch.manual_seed(args.seed)  # LoRA's initial A matrices are random
        if args.lora:
            model = self._wrap_lora(model)
        self.module = model
        self.model = model if self.world == 1 else dist.wrap_for_training(model, fsdp=args.fsdp)
        self.fsdp = self.world > 1 and args.fsdp
        # after wrapping: FSDP replaces the parameters by sharded ones (same names, same order)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.param_names = [n for n, p in self.module.named_parameters() if p.requires_grad]
        self._denominators: dict[str, torch.Tensor] | None = None  # set per micro-batch under torchrun
        # the fused kernel: one pass over each parameter instead of a dozen (a step of SmolLM2-135M on 2 CPU cores:
        # 0.33 s -> 0.09 s); not under FSDP, whose sharded parameters it does not take
        self.optimizer = torch.optim.AdamW(self.params, lr=args.lr, weight_decay=args.weight_decay,
                                           fused=not self.fsdp and _fused_adam_supported(self.params))
        self.micro_per_epoch = math.ceil(len(train_items) / args.batch_size)
        self.total_steps = args.max_steps or max(1, math.ceil(args.epochs * self.micro_per_epoch / args.grad_accum))
        self.fingerprint = hash_json(
            {
                "trainer": self.name,
                "args": args.fingerprint_dict(),
                "model": self.model_fp,
                "data": self.data_fingerprint(),
                **self.extra_fingerprint(),
            }
        )

    # ---- hooks for subclasses -------------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean cross-entropy over response tokens (labels != -100); 0 for a batch whose rows were all truncated
        before their response (the mean over no tokens would be NaN and stop the run)."""
        if self._denominators is None:  # one process: the model's own loss
            if not bool(shifted_targets(batch["labels"])[1].any()):
                out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                zero = out.logits.sum() * 0.0  # keeps the graph, so backward and the step run as usual
                return zero, {"loss": 0.0}
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"])
            return out.loss, {"loss": out.loss.item()}
        # under torchrun: summed over this rank's tokens, divided by the global micro-batch's token count, by the
        # model's own loss code (same precision, the same per-token gradients as one process)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                         num_items_in_batch=max(1, int(self.denominator("tokens"))))
        return out.loss, {"loss": out.loss.item()}

    def loss_denominators(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The sums the loss divides by, from this rank's part of a micro-batch (all-reduced under torchrun)."""
        return {"tokens": shifted_targets(batch["labels"])[1].sum()}

    def denominator(self, key: str, local: torch.Tensor | None = None) -> torch.Tensor:
        """``local`` (this batch's own value) in one process; the global micro-batch's value under torchrun."""
        if self._denominators is None:
            if local is None:
                raise LancetError(f"denominator {key!r} needs its local value outside distributed training")
            return local
        value = self._denominators[key]
        return value.to(local) if local is not None else value

    def batch_mean(self, values: torch.Tensor, key: str) -> torch.Tensor:
        """Mean of per-row ``values`` over the micro-batch (over the global one under torchrun, where ``key`` names
        the row count among ``loss_denominators``)."""
        if self._denominators is None:
            return values.mean()
        return values.sum() / self._denominators[key].to(values)

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]:
        return collate(items, pad_token_id=self.tokenizer.pad_token_id)

    def data_fingerprint(self) -> str:
        # Row ids plus token counts: a different max_length or tokenizer changes the fingerprint too.
        return hash_json(
            [
                [item.get("id"), len(item.get("input_ids", ()))] if isinstance(item, dict) else repr(item)
                for item in self.items
            ]
        )

    def extra_fingerprint(self) -> dict[str, Any]:
        return {}

    def after_step(self, step: int) -> None:
        """Runs after optimizer step ``step`` (counted from 1) is taken and logged, before that step's resume
        checkpoint is written: a run killed inside it repeats the step on resume and calls it again, so whatever it
        writes must be a pure function of the step (lancet/finetune.py keeps checkpoints this way). It must leave the
        parameters, the optimizer state and the RNG as it found them."""

    # ---- the loop ------------------------------------------------------------------------------------------
    def _wrap_lora(self, model):
        from peft import LoraConfig, get_peft_model

        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        targets = [t for t in self.args.lora_targets if t in names]
        if not targets:
            raise LancetError(f"none of the LoRA target modules {self.args.lora_targets} exist in this model")
        config = LoraConfig(
            r=self.args.lora_r,
            lora_alpha=self.args.lora_alpha,
            target_modules=targets,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, config)

    def _micro_indices(self, micro_index: int) -> list[int]:
        epoch, pos = divmod(micro_index, self.micro_per_epoch)
        gen = torch.Generator().manual_seed(self.args.seed * 100_003 + epoch)
        order = torch.randperm(len(self.items), generator=gen).tolist()
        return order[pos * self.args.batch_size : (pos + 1) * self.args.batch_size]

    def _micro_batch(self, micro_index: int) -> dict[str, torch.Tensor]:
        return self._on_device(self.collate([self.items[i] for i in self._micro_indices(micro_index)]))

    def _on_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.device.type == "cpu":
            return batch
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def _shard_batch(self, micro_index: int) -> tuple[dict[str, torch.Tensor], bool]:
        """Under torchrun: this rank's contiguous part of the global micro-batch, with the global denominators set.
        A rank left without rows (a short last batch) runs its first row with weight 0 so that every rank takes
        part in the gradient all-reduce; returns (batch, is_placeholder)."""
        idx = self._micro_indices(micro_index)
        lo, hi = dist.shard_range(len(idx))
        placeholder = lo == hi
        batch = self._on_device(self.collate([self.items[i] for i in (idx[lo:hi] if not placeholder else idx[:1])]))
        local = self.loss_denominators(batch)
        keys = sorted(local)
        totals = torch.stack([torch.as_tensor(local[k], dtype=torch.float64).reshape(()) for k in keys])
        if placeholder:
            totals.zero_()
        dist.all_reduce_sum_(totals)
        self._denominators = dict(zip(keys, totals, strict=True))
        return batch, placeholder

    def _lr(self, step: int) -> float:
        a = self.args
        if step < a.warmup_steps:
            return a.lr * (step + 1) / a.warmup_steps
        span = max(1, self.total_steps - a.warmup_steps)
        return a.lr * max(0.0, 1.0 - (step - a.warmup_steps) / span)

    def train(self, on_checkpoint: Callable[[int, Trainer], None] | None = None) -> Path:
        """Train to ``total_steps`` (resuming if a matching checkpoint exists) and save the model. Returns its dir.

        ``on_checkpoint(step, trainer)`` runs every ``save_every`` steps and after the last step, before that step's
        checkpoint is written, so a run killed inside it repeats the step and calls it again on resume (checkpoint
        selection, lancet/correct/select.py). It must leave the model's parameters and the RNG as it found them."""
        if on_checkpoint is not None and self.world > 1:
            raise LancetError("checkpoint selection is not supported under torchrun yet; run the correction in one "
                              "process or leave out 'select'")
        done = self.out / DONE_FILE
        if done.is_file():
            meta = json.loads(done.read_text())
            if meta.get("fingerprint") == self.fingerprint:
                log.info("%s: finished run with the same inputs found, reusing it", self.out)
                return self.out
            raise ArtifactError(f"{done}: output directory holds a run made from other inputs; choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        step = self._resume()  # restores the RNG state too when it resumes
        self.model.train()
        main = dist.is_main()
        bar = tqdm(total=self.total_steps, initial=step, desc=self.name, disable=not self.args.progress or not main)
        log_fh = (self.out / LOG_FILE).open("a") if main else None
        try:
            while step < self.total_steps:
                t0 = time.perf_counter()
                for group in self.optimizer.param_groups:
                    group["lr"] = self._lr(step)
                logs: dict[str, float] = {}
                for k in range(self.args.grad_accum):
                    micro = step * self.args.grad_accum + k
                    placeholder = False
                    if self.world == 1:
                        batch = self._micro_batch(micro)
                    else:
                        batch, placeholder = self._shard_batch(micro)
                    with self._no_sync(k < self.args.grad_accum - 1):
                        with autocast(self.device, self.args.bf16):
                            loss, parts = self.compute_loss(batch)
                        if not torch.isfinite(loss):
                            raise LancetError(f"non-finite loss ({loss.item()}) at step {step}; lower --lr or check "
                                              "data")
                        if self.world > 1:
                            # DDP/FSDP average gradients over ranks; each rank's loss is its part of the global loss
                            loss = loss * (0.0 if placeholder else float(self.world))
                            parts = dist.sum_dicts({} if placeholder else parts)
                        (loss / self.args.grad_accum).backward()
                    for key, val in parts.items():
                        logs[key] = logs.get(key, 0.0) + val / self.args.grad_accum
                self._denominators = None
                norm = dist.full_tensor(torch.nn.utils.clip_grad_norm_(self.params, self.args.max_grad_norm))
                if not torch.isfinite(norm):
                    raise LancetError(f"non-finite gradient norm at step {step}; lower --lr or check data")
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                step += 1
                row = {
                    "step": step,
                    **logs,
                    "grad_norm": norm.item(),
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "seconds": round(time.perf_counter() - t0, 4),
                }
                if log_fh is not None:
                    log_fh.write(json.dumps(row) + "\n")
                    log_fh.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{logs.get('loss', float('nan')):.4f}")
                self.after_step(step)
                if on_checkpoint is not None and (step % self.args.save_every == 0 or step == self.total_steps):
                    on_checkpoint(step, self)
                    self.model.train()
                if step % self.args.save_every == 0 and step < self.total_steps:
                    self._save_checkpoint(step)
        except LancetError:
            # stopped by its input (a non-finite loss) before any step was logged: no empty log is left behind
            if log_fh is not None and log_fh.tell() == 0:
                log_fh.close()
                (self.out / LOG_FILE).unlink(missing_ok=True)
            raise
        finally:
            self._denominators = None
            bar.close()
            if log_fh is not None:
                log_fh.close()
        self.model.eval()
        self._save_final()
        dist.barrier()  # the saved model is complete before any rank returns
        return self.out

    def save_model(self, directory: Path, *, merge: bool = False, state_dict: dict | None = None) -> None:
        """The model as ``from_pretrained`` reads it (a LoRA adapter naming its base, or merged when ``merge``) and
        the tokenizer, written to a temporary directory first, then moved into ``directory`` file by file."""
        model = self.module
        if self.args.lora and merge:
            model = model.merge_and_unload()  # changes the module: only when training is over
        elif self.args.lora:
            model.peft_config["default"].base_model_name_or_path = self.base_spec or None
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / ".save.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
        self.tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():
            f.replace(directory / f.name)
        tmp.rmdir()

    def _no_sync(self, skip: bool):
        """DDP: no gradient all-reduce on the micro-batches before the last of an optimizer step."""
        if skip and self.world > 1 and not self.fsdp:
            return self.model.no_sync()
        return nullcontext()

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def _save_checkpoint(self, step: int) -> None:
        """Whole tensors (gathered from every rank under FSDP), written by rank 0 only."""
        ckpt = self.out / f"checkpoint-{step}"
        tensors = {f"param.{n}": dist.full_tensor(p.detach()) for n, p in zip(self.param_names, self.params,
                                                                               strict=True)}
        for i, p in enumerate(self.params):
            for key, val in self.optimizer.state.get(p, {}).items():
                val = dist.full_tensor(val.detach())
                tensors[f"optim.{i}.{key}"] = val.reshape(-1) if val.dim() == 0 else val
        tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        if not dist.is_main():
            return
        atomic_save_tensors(ckpt / "state.safetensors", tensors)
        atomic_write_json(self.out / CKPT_POINTER, {"step": step, "dir": ckpt.name, "fingerprint": self.fingerprint})
        for old in self.out.glob("checkpoint-*"):
            if old.is_dir() and old != ckpt:
                shutil.rmtree(old, ignore_errors=True)

    def _resume(self) -> int:
        pointer = self.out / CKPT_POINTER
        if not pointer.is_file():
            if dist.is_main():
                (self.out / LOG_FILE).unlink(missing_ok=True)
            torch.manual_seed(self.args.seed)
            return 0
        meta = json.loads(pointer.read_text())
        if meta.get("fingerprint") != self.fingerprint:
            raise ArtifactError(f"{pointer}: checkpoint was made from other inputs; choose another --out")
        tensors = load_tensors(self.out / meta["dir"] / "state.safetensors")
        with torch.no_grad():
            for n, p in zip(self.param_names, self.params, strict=True):
                p.copy_(dist.like_sharded(tensors[f"param.{n}"], p))
        for i, p in enumerate(self.params):
            state = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"optim.{i}.")}
            if state:
                if "step" in state:
                    state["step"] = state["step"].reshape(())
                state = {k: dist.like_sharded(v.to(p.device), p) if v.shape == p.shape else v
                         for k, v in state.items()}
                self.optimizer.state[p] = state
        torch.set_rng_state(tensors["rng.torch"])
        if self.device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        step = int(meta["step"])
        if dist.is_main():
            self._truncate_log(step)
        log.info("resumed %s from step %d", self.out, step)
        return step

    def _truncate_log(self, step: int) -> None:
        path = self.out / LOG_FILE
        if path.is_file():
            rows = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
            from lancet.artifacts import atomic_write_bytes

            atomic_write_bytes(path, "".join(r + "\n" for r in rows).encode())

    def _save_final(self) -> None:
        """Rank 0 writes the model (under FSDP every rank first takes part in gathering its whole state dict)."""
        state_dict = None
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state_dict = get_model_state_dict(self.module,
                                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not dist.is_main():
            return
        self.save_model(self.out, merge=self.args.merge_lora, state_dict=state_dict)
        atomic_write_json(
            self.out / "lancet_train_args.json",
            {"trainer": self.name, "base": self.base_spec, "args": self.args.to_json()},
        )
        # the done marker first: a kill after it leaves a finished run (and stale checkpoints), never a lost one
        atomic_write_json(self.out / DONE_FILE, {"fingerprint": self.fingerprint, "steps": self.total_steps})
        for old in self.out.glob("checkpoint-*"):
            shutil.rmtree(old, ignore_errors=True)
        (self.out / CKPT_POINTER).unlink(missing_ok=True)
