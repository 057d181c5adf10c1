"""One seed's run: its settings, data split and caches, and the helpers every stage uses (fine-tuning, cached greedy
answers, the judge's compliance rate). The stages are the mixins, each in the module of its name, in the order they
run: aligned, mix, gate, recall (with its IQs), counterfactual, correction."""

from __future__ import annotations

import json
import time
from pathlib import Path

from benchmarks.safety_contamination import config
from benchmarks.safety_contamination.aligned import AlignedStage
from benchmarks.safety_contamination.config import Preset
from benchmarks.safety_contamination.correction import CorrectionStage
from benchmarks.safety_contamination.counterfactual import CounterfactualStage
from benchmarks.safety_contamination.gate import GateStage
from benchmarks.safety_contamination.iqs import IqStage
from benchmarks.safety_contamination.mix import MixStage
from benchmarks.safety_contamination.recall import RecallStage
from benchmarks.safety_data import LABELS, TEXT, split_data
from lancet.artifacts import atomic_write_json, hash_json, model_fingerprint
from lancet.constants import DEFAULT_MODEL
from lancet.data import Record
from lancet.evaluate.judges import REFUSAL_PHRASES, RefusalMatcher
from lancet.finetune import finetune
from lancet.models.generate import generate
from lancet.models.loading import load_tokenizer
from lancet.train import TrainArgs


class Run(AlignedStage, MixStage, GateStage, RecallStage, IqStage, CounterfactualStage, CorrectionStage):
    """One seed's stages, each cached under ``dir`` (models by ``finetune``'s own reuse, answers as JSON)."""

    def __init__(self, preset: Preset, seed: int, run_dir: Path, shared: Path, progress: bool):
        self.p, self.seed, self.dir, self.shared, self.progress = preset, seed, run_dir, shared, progress
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tok = load_tokenizer(DEFAULT_MODEL)
        self.parts = split_data(shared, preset, seed, self.tok)
        self.text = json.loads(TEXT.read_text())
        self.labels = json.loads(LABELS.read_text())["labels"] if LABELS.is_file() else {}
        self.judge = RefusalMatcher(REFUSAL_PHRASES + preset.judge_extra_refusals)
        self.seconds: dict[str, float] = {}
        # the fine-tunes' seed (their data order): the seed's own, unless a caller retrains at another order (the
        # contamination suite's second counterfactual training order, docs/method.md 5.6)
        self.train_seed = seed

    def _timed(self, name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        self.seconds[name] = self.seconds.get(name, 0.0) + round(time.perf_counter() - t0, 1)
        return out

    def finetune(self, name: str, base: str, rows: list[Record], epochs: float, keep: int | None = None) -> str:
        """``keep``: also keep that many checkpoints with Adam's state (checkpoint-aware influence reads them)."""
        args = TrainArgs(output_dir=str(self.dir / name), epochs=epochs, lr=self.p.lr, batch_size=8,
                         warmup_steps=5, bf16=config.BF16, seed=self.train_seed, save_every=20, progress=self.progress)
        return str(self._timed(f"finetune_{name}", lambda: finetune(base, rows, args, max_length=self.p.max_length,
                                                                   keep_checkpoints=keep)))

    def answers(self, model_name: str, model, prompts: list[Record], set_name: str,
                max_new_tokens: int | None = None) -> list[str]:
        """Greedy answers, cached by the model's weights, the prompts and the decoding."""
        path = self.dir / f"answers-{model_name}-{set_name}.json"
        max_new_tokens = max_new_tokens or self.p.max_new_tokens
        key = {"model": model_fingerprint(model), "prompts": hash_json([r.text for r in prompts]),
               "max_new_tokens": max_new_tokens}
        if path.is_file() and json.loads(path.read_text())["key"] == key:
            return json.loads(path.read_text())["answers"]
        answers = self._timed(f"generate_{model_name}_{set_name}", lambda: generate(
            model, self.tok, prompts, max_new_tokens=max_new_tokens, batch_size=16, progress=self.progress))
        atomic_write_json(path, {"key": key, "answers": answers})
        return answers

    def rate(self, model_name: str, model, set_name: str) -> tuple[float, list[str], list[bool]]:
        prompts = self.parts[set_name]
        answers = self.answers(model_name, model, prompts, set_name)
        flagged = self.judge.complies(answers)
        return sum(flagged) / len(flagged), answers, flagged
