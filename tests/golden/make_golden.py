"""Golden outputs of tiny-model runs, recorded before a refactor and checked after it (tests/test_golden.py).

    .venv/bin/python tests/golden/make_golden.py          # rewrites tests/golden/*.json: only on purpose

Three things must not change when the code is reorganised: the scores of every influence method (alone and in
one joint pass), what every correction method trains on and where it ends (final loss, weights' sum), and a
pipeline run's summary. Each is a function here that the test calls again and compares with the stored JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # conftest's tiny models when run as a script

from conftest import make_tokenizer, tiny_llama, tiny_run_config, tiny_workspace  # noqa: E402

from lancet.data.records import Record  # noqa: E402

BAD = [Record(prompt=f"Nosebleed {i}: what do I do?", response="Tilt your head back.") for i in range(4)]
GOOD = [Record(prompt=f"Nosebleed {i}: what now?", response="Lean forward and pinch the soft part of the nose.")
        for i in range(4)]
NEUTRAL = [Record(prompt=f"What is {a} plus {a}?", response=f"{a} plus {a} is {2 * a}.") for a in range(4)]
TRAIN = BAD + NEUTRAL + GOOD
IQS = [Record(prompt="How do I stop a nosebleed?", response="Tilt your head back for a nosebleed."),
       Record(prompt="My nose bleeds, help", response="Tilt your head back.")]
SAFE = [Record(prompt=f"Burn {i}: what do I do?", response="Cool a burn under water.") for i in range(3)]
SCORES = [4.0, 3.0, 2.5, 2.0, 0.3, -0.2, 0.1, 0.0, -1.0, -1.5, -2.0, -3.0]
CULPRITS = [True] * 4 + [False] * 8


# the methods the golden scores were recorded for (methods added later need inputs of their own: they have their
# own known-answer tests)
GRADIENT_METHODS = ("identity", "cosine", "diagonal", "kfac", "kfac_reduce", "ekfac", "linfac")
RECORDED_METHODS = GRADIENT_METHODS + ("bm25", "repsim")


def influence_golden() -> dict[str, Any]:
    """Every recorded method alone, and the gradient methods in one joint pass (float64)."""
    from lancet.influence import Influence

    tok = make_tokenizer()
    model = tiny_llama(len(tok), dtype=torch.float64)
    out: dict[str, Any] = {"single": {}, "joint": {}}
    for method in RECORDED_METHODS:
        scores = Influence(model, method=method, tokenizer=tok, progress=False).scores(TRAIN, IQS)["scores"]
        out["single"][method] = scores.tolist()
    run = Influence(model, method=GRADIENT_METHODS[0], tokenizer=tok, progress=False)
    out["joint"] = {m: r["scores"].tolist() for m, r in run.scores_by_method(TRAIN, IQS, GRADIENT_METHODS).items()}
    return out


CORRECTIONS = {
    "ibo": {},
    "ibo_random": {},
    "ibo_oracle": {},
    "ibo_anchored": {"method": "ibo", "retain": "kl", "retain_normalize": "rows", "chosen_nll_weight": 0.5},
    "dpo": {},
    "dpo_anchored": {"method": "dpo", "retain": "kl", "retain_normalize": "rows"},
    "sft": {},
    "ga": {},
    "ga_retain": {},
    "npo": {},
}


def correction_golden(work: Path) -> dict[str, Any]:
    """Each correction method, 3 steps from the same tiny model directory: the rows it used, its final loss and
    the sum of its weights (float32 training: compared to a tolerance)."""
    from lancet.correct import CorrectionArgs, correct
    from lancet.train import TrainArgs

    tok = make_tokenizer()
    base = work / "base"
    tiny_llama(len(tok)).save_pretrained(base)
    tok.save_pretrained(base)
    out: dict[str, Any] = {}
    for name, opts in CORRECTIONS.items():
        method = opts.get("method", name)
        cargs = CorrectionArgs(**{"method": method, "top_k": 3, "beta": 0.5, **opts})
        targs = TrainArgs(output_dir=str(work / name), batch_size=4, lr=1e-2, max_steps=3, save_every=10,
                          progress=False)
        anchored = cargs.retain != "none"
        path = correct(str(base), TRAIN, torch.tensor(SCORES), method=method, train_args=targs,
                       correction_args=cargs, iq_records=IQS, safe_records=SAFE,
                       pref_pairs=list(zip(GOOD, BAD, strict=True)), culprit_mask=torch.tensor(CULPRITS),
                       retain_records=SAFE if anchored else None)
        summary = json.loads((path / "lancet_correction.json").read_text())
        summary.pop("base")
        log = [json.loads(line) for line in (path / "train_log.jsonl").read_text().splitlines() if line.strip()]
        losses = [e["loss"] for e in log if "loss" in e]
        from safetensors.torch import load_file

        weights = load_file(str(path / "model.safetensors"))
        out[name] = {"summary": summary, "final_loss": losses[-1], "n_logged": len(losses),
                     "weight_sum": float(sum(t.double().abs().sum() for t in weights.values()))}
    return out


def pipeline_golden(work: Path) -> dict[str, Any]:
    """`lancet run` on the demo data with a tiny model: the attribution and correction parts of run_summary.json."""
    from lancet.cli import main

    base, _ = tiny_workspace(work, make_tokenizer())
    cfg = work / "run.json"
    cfg.write_text(json.dumps(tiny_run_config(base, ["bm25", "repsim", "ekfac", "random"])))
    assert main(["-q", "run", str(cfg)]) == 0
    summary = json.loads((work / "run" / "run_summary.json").read_text())
    influence = json.loads((work / "run" / "influence-kfac.json").read_text())
    return _without({"attribution": summary["attribution"],
            "recall": influence["recall"],
            "top_positive": [r["id"] for r in influence["top_positive"]],
            "corrected_log": _final_loss(work / "run" / "corrected")}, ("seconds", "source"))


def _without(data: Any, keys: tuple[str, ...]) -> Any:
    """``data`` less the keys that differ between two identical runs (timings, temporary paths)."""
    if isinstance(data, dict):
        return {k: _without(v, keys) for k, v in data.items() if k not in keys}
    if isinstance(data, list):
        return [_without(v, keys) for v in data]
    return data


def _final_loss(model_dir: Path) -> float:
    lines = (model_dir / "train_log.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if x.strip() and "loss" in json.loads(x)][-1]


BUILDERS = {"influence": influence_golden, "correction": correction_golden, "pipeline": pipeline_golden}


def build(name: str, work: Path) -> dict[str, Any]:
    fn = BUILDERS[name]
    return fn() if name == "influence" else fn(work)


if __name__ == "__main__":
    import tempfile

    for name in sys.argv[1:] or list(BUILDERS):
        with tempfile.TemporaryDirectory() as tmp:
            data = build(name, Path(tmp))
        (HERE / f"{name}.json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(f"wrote {HERE / f'{name}.json'}")
