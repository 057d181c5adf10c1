"""GPU checks for one lent device run: agreement with the CPU, resume, syncs, speed and memory.

    PYTHONPATH=. python benchmarks/gpu_check.py --out $OUT            # on the GPU machine (docs/scaling.md)
    PYTHONPATH=. python benchmarks/gpu_check.py --out /tmp/g --dry-run  # here: the same stages, tiny, on the CPU

No weights travel to the device machine, so every model is random-initialised from a config; the data are random
token ids (speed and agreement do not depend on what the tokens say). The JSON is rewritten after every stage, so
a run cut off by its time limit still returns what it measured; a stage that fails records its error and the
next one runs. Stages:

1. ``agreement``: linfac, ekfac, identity and cosine scores of a float64 tiny Llama on the CPU and on the device
   (TF32 off), relative error (goal <= 1e-8); and the host-device syncs counted while scoring (sync debug mode).
2. ``resume``: a tiny full fine-tune stopped after its first checkpoint and resumed on the device, against an
   uninterrupted run (goal: parameters within 1e-5).
3. ``speed_135m``: the SmolLM2-135M shape, 64 rows x 128 tokens, 4 queries: raw forward+backward, lancet linfac
   and ekfac fit + score at bf16 autocast and fp32, and kronfluence EK-FAC (its defaults) when it can be imported.
4. ``speed_1b``: a ~1B Llama shape (Llama-3.2-1B's), 32 rows x 256 tokens, 2 queries, linfac with rank-32 queries
   against raw forward+backward, with peak GPU memory.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import raw_forward_backward, sync_clock  # noqa: E402
from lancet.artifacts import atomic_write_json  # noqa: E402
from lancet.hardware import resolve_device  # noqa: E402
from lancet.influence import Influence, InfluenceArgs  # noqa: E402
from lancet.influence.scoring import score_rows  # noqa: E402
from lancet.train import TrainArgs, Trainer  # noqa: E402

SHAPES = {  # LlamaConfig fields; tiny ones for --dry-run
    "tiny": dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=False),
    "smollm2_135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True, rope_theta=100000.0),
    "llama_1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                     tie_word_embeddings=True, rope_theta=500000.0),
}
AGREEMENT_GOAL = 1e-8
RESUME_GOAL = 1e-5


def model_of(shape: str, device, dtype=torch.float32, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**SHAPES[shape])).to(dtype).to(device).eval()


def random_rows(n: int, length: int, vocab: int, seed: int, prompt: int | None = None) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    prompt = length // 4 if prompt is None else prompt
    rows = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def peak_gib(device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 1024**3, 3) if device.type == "cuda" else None


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ---- stages ------------------------------------------------------------------------------------------------------

def stage_agreement(device, dry: bool) -> dict:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    train, queries = random_rows(24, 12, 64, 0), random_rows(3, 10, 64, 1)
    out: dict = {"goal_relative_error": AGREEMENT_GOAL, "methods": {}}
    for method in ("linfac", "ekfac", "identity", "cosine"):
        args = InfluenceArgs(method=method, dtype="float64", batch_size=4, progress=False)
        cpu = Influence(model_of("tiny", "cpu", torch.float64), args).scores(train, queries)["scores"]
        on_device = Influence(model_of("tiny", device, torch.float64), args).scores(train, queries)["scores"]
        err = float((cpu - on_device).norm() / cpu.norm())
        out["methods"][method] = {"relative_error": err, "passed": err <= AGREEMENT_GOAL}
    out["passed"] = all(m["passed"] for m in out["methods"].values())
    if device.type == "cuda":  # syncs while scoring: every one is a warning in this mode
        model = model_of("tiny", device, torch.float64)
        run = Influence(model, InfluenceArgs(method="linfac", dtype="float64", batch_size=4, progress=False))
        curvature = run.fit(train)
        pre = run.preconditioned_queries(queries)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                score_rows(model, curvature.layers, train, pre, run.args)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
        batches_run = -(-len(train) // 4)
        out["scoring_syncs"] = {"count": len(syncs), "batches": batches_run, "layers": len(curvature.layers),
                                "first": sorted(set(syncs))[:5]}
    torch.backends.cuda.matmul.allow_tf32 = True
    return out


class _StopAfterFirstCheckpoint(Trainer):
    """Killed one step after its first resume checkpoint (through the public ``after_step`` hook), as a crash
    would be: the resumed run repeats that step from the checkpoint."""

    def after_step(self, step: int) -> None:
        if step == self.args.save_every + 1:
            raise KeyboardInterrupt


def word_tokenizer(vocab: int = 64):
    """A tokenizer of ``vocab`` words t0..t{vocab-1}, built offline (the trainer saves one with the model)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t1", eos_token="t2")


def stage_resume(device, dry: bool, tmp: Path) -> dict:
    rows = random_rows(24, 16, 64, 2)
    tok = word_tokenizer()

    def train(out: Path, cls=Trainer) -> LlamaForCausalLM:
        model = model_of("tiny", "cpu", seed=3)
        args = TrainArgs(output_dir=str(out), max_steps=6, batch_size=4, lr=1e-3, save_every=3, progress=False,
                         device=str(device), seed=0)
        cls(model, tok, args, rows).train()
        return model

    straight = train(tmp / "straight")
    try:
        train(tmp / "resumed", _StopAfterFirstCheckpoint)
    except KeyboardInterrupt:
        pass
    resumed = train(tmp / "resumed")
    diff = max(float((a.detach().cpu() - b.detach().cpu()).abs().max())
               for a, b in zip(straight.parameters(), resumed.parameters(), strict=True))
    return {"max_abs_param_diff": diff, "goal": RESUME_GOAL, "passed": diff <= RESUME_GOAL,
            "bit_identical": diff == 0.0}


def lancet_run(model, rows, queries, device, **options) -> dict:
    reset_peak(device)
    run = Influence(model, InfluenceArgs(batch_size=8, progress=False, **options))
    t0 = sync_clock(device)
    curvature = run.fit(rows)
    t1 = sync_clock(device)
    pre = run.preconditioned_queries(queries)
    t2 = sync_clock(device)
    scores = score_rows(model, curvature.layers, rows, pre, run.args)["scores"]
    t3 = sync_clock(device)
    return {"fit_s": round(t1 - t0, 3), "queries_s": round(t2 - t1, 3), "score_rows_s": round(t3 - t2, 3),
            "fit_plus_score_s": round(t3 - t0, 3), "peak_gib": peak_gib(device),
            "finite": bool(scores.isfinite().all())}


def kronfluence_run(model, rows, queries, device) -> dict:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    from benchmarks.kronfluence_ref import ListDataset, default_module_names, make_task, pad_batch

    reset_peak(device)
    task = make_task(default_module_names(model))
    wrapped = prepare_model(copy.deepcopy(model).eval(), task)
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer(analysis_name="gpu", model=wrapped, task=task, cpu=device.type == "cpu",
                            disable_tqdm=True, output_dir=tmp)
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=pad_batch))
        t0 = sync_clock(device)
        analyzer.fit_all_factors(factors_name="f", dataset=ListDataset(rows), per_device_batch_size=8,
                                 factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
        t1 = sync_clock(device)
        analyzer.compute_pairwise_scores(scores_name="s", factors_name="f", query_dataset=ListDataset(queries),
                                         train_dataset=ListDataset(rows), per_device_query_batch_size=8,
                                         per_device_train_batch_size=8, score_args=ScoreArguments(),
                                         overwrite_output_dir=True)
        t2 = sync_clock(device)
    return {"fit_s": round(t1 - t0, 3), "score_s": round(t2 - t1, 3), "fit_plus_score_s": round(t2 - t0, 3),
            "peak_gib": peak_gib(device)}


def stage_speed(device, shape: str, n_rows: int, length: int, n_queries: int, variants: dict[str, dict],
                kronfluence: bool) -> dict:
    model = model_of(shape, device)
    vocab = SHAPES[shape]["vocab_size"]
    rows, queries = random_rows(n_rows, length, vocab, 4), random_rows(n_queries, length, vocab, 5)
    tokens = n_rows * length
    out: dict = {"shape": shape, "parameters": sum(p.numel() for p in model.parameters()), "rows": n_rows,
                 "tokens_per_row": length, "queries": n_queries, "runs": {}}
    for bf16 in (True, False):
        raw_forward_backward(model, rows[:8], 8, device, bf16)  # warm-up (kernels, allocator)
        reset_peak(device)
        seconds = raw_forward_backward(model, rows, 8, device, bf16)
        out[f"raw_{'bf16' if bf16 else 'fp32'}"] = {"seconds": round(seconds, 3),
                                                     "tokens_per_s": round(tokens / seconds, 1),
                                                     "peak_gib": peak_gib(device)}
    for name, options in variants.items():
        record = lancet_run(model, rows, queries, device, **options)
        raw = out["raw_bf16" if options.get("bf16") else "raw_fp32"]
        record["score_tokens_per_s"] = round(tokens / record["score_rows_s"], 1)
        record["score_vs_raw"] = round(record["score_tokens_per_s"] / raw["tokens_per_s"], 3)
        out["runs"][name] = record
    if kronfluence:
        try:
            out["runs"]["kronfluence_ekfac"] = kronfluence_run(model, rows, queries, device)
            kf = out["runs"]["kronfluence_ekfac"]["fit_plus_score_s"]
            for name in variants:
                out["runs"][name]["speedup_vs_kronfluence"] = round(kf / out["runs"][name]["fit_plus_score_s"], 2)
        except ImportError as exc:
            out["runs"]["kronfluence_ekfac"] = {"skipped": f"kronfluence not importable ({exc})"}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for gpu_check.json (the device tool's $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (the test of this script)")
    parser.add_argument("--stages", default="agreement,resume,speed_135m,speed_1b")
    ns = parser.parse_args()
    device = torch.device("cpu") if ns.dry_run else resolve_device("cuda")
    out_path = Path(ns.out) / "gpu_check.json"
    result: dict = {"device": str(device), "dry_run": ns.dry_run, "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "stages": {}}
    linfac = {"linfac_bf16": {"method": "linfac", "bf16": True}, "linfac_fp32": {"method": "linfac"},
              "ekfac_bf16": {"method": "ekfac", "bf16": True}}
    stages = {
        "agreement": lambda: stage_agreement(device, ns.dry_run),
        "resume": lambda: stage_resume(device, ns.dry_run, Path(tempfile.mkdtemp())),
        "speed_135m": lambda: stage_speed(device, "tiny" if ns.dry_run else "smollm2_135m", 16 if ns.dry_run else 64,
                                          32 if ns.dry_run else 128, 2 if ns.dry_run else 4, linfac, True),
        "speed_1b": lambda: stage_speed(device, "tiny" if ns.dry_run else "llama_1b", 8 if ns.dry_run else 32,
                                        32 if ns.dry_run else 256, 2,
                                        {"linfac_bf16_rank32": {"method": "linfac", "bf16": True, "query_rank": 32}},
                                        False),
    }
    for name in ns.stages.split(","):
        t0 = time.perf_counter()
        try:
            result["stages"][name] = stages[name]()
        except Exception as exc:  # the next stage still runs; the error is the result
            result["stages"][name] = {"error": f"{type(exc).__name__}: {exc}",
                                      "traceback": traceback.format_exc()[-2000:]}
        result["stages"][name]["seconds"] = round(time.perf_counter() - t0, 1)
        atomic_write_json(out_path, result)
        print(name, json.dumps(result["stages"][name])[:400], flush=True)


if __name__ == "__main__":
    main()
