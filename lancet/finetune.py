"""Supervised fine-tuning (full or LoRA): builds the contaminated models for the demo and the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lancet.constants import DEFAULT_MAX_LENGTH
from lancet.data.records import Record
from lancet.data.tokenize import encode_records, require_response_tokens
from lancet.models.loading import load_model
from lancet.train import TrainArgs, Trainer


def finetune(
    model_spec: str,
    train: Sequence[Record],
    args: TrainArgs,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    trust_remote_code: bool = False,
) -> Path:
    """Fine-tune ``model_spec`` on ``train`` (loss on response tokens only) and save an HF directory to
    ``args.output_dir``. Resumes from the last checkpoint there; reuses a finished run with the same inputs.

    Every row must keep a response token after truncation to ``max_length``: a prompt-only or truncated-away row
    stops the run with a ``DataError`` naming its file:line (as the correction's rows do)."""
    model, tokenizer = load_model(model_spec, trust_remote_code=trust_remote_code, device=args.load_device)
    encoded = encode_records(list(train), tokenizer, max_length, progress=args.progress)
    require_response_tokens(encoded)  # a prompt-only or truncated-away row would train on nothing and "succeed"
    trainer = Trainer(model, tokenizer, args, encoded, base_spec=model_spec)
    return trainer.train()
