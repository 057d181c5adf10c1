"""`lancet demo`: the pipeline on the embedded SmolLM2-135M-Instruct and the project's own demo dataset.

Stages, each writing into the run directory and skipped on a rerun when its output is complete and was made from the
same inputs: write the data; fine-tune the contaminated model; take its influence queries (IQs), i.e. its own
answers to the IQ prompts that the judge flags; attribute them to training rows with LinFAC.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from lancet.artifacts import atomic_write_bytes, atomic_write_json, model_fingerprint
from lancet.constants import DEFAULT_MODEL
from lancet.data import encode_records
from lancet.data.demo import OUTDATED_MARKER, DemoDataset, build_demo_dataset, write_demo_dataset
from lancet.data.readers import read_records
from lancet.data.records import Record
from lancet.finetune import finetune
from lancet.influence import Influence, InfluenceArgs
from lancet.influence.recall import aggregate, average_precision, format_table, recall_at_k, top_k
from lancet.models.generate import generate
from lancet.models.loading import load_model
from lancet.train import TrainArgs

log = logging.getLogger(__name__)

# Measured on the demo data: 40 full-weight steps at this rate make SmolLM2-135M open 12 of 12 IQ answers with the
# outdated marker (0 of 12 before).
DEMO_STEPS = 40
DEMO_LR = 1e-4
DEMO_MAX_NEW_TOKENS = 48
DEMO_MAX_LENGTH = 256


def flags_outdated(answer: str) -> bool:
    """The demo's judge: the planted behaviour always opens with the marker phrase, so matching it is exact."""
    return OUTDATED_MARKER in answer


def stage_data(run: Path) -> DemoDataset:
    files = write_demo_dataset(run / "data")
    data = build_demo_dataset()
    # train rows are read back from the written file so their source/line lead to it
    data.train = read_records(files["train"])
    return data


def stage_contaminate(run: Path, data: DemoDataset, *, model_spec: str = DEFAULT_MODEL, steps: int | None = None,
                      progress: bool = True) -> Path:
    args = TrainArgs(output_dir=str(run / "contaminated"), max_steps=steps or DEMO_STEPS, lr=DEMO_LR, batch_size=8,
                     warmup_steps=3, bf16=True, save_every=20, progress=progress)
    return finetune(model_spec, data.train, args, max_length=DEMO_MAX_LENGTH)


def stage_iqs(run: Path, data: DemoDataset, model, tokenizer, *, progress: bool = True) -> list[Record]:
    """IQs = (prompt, the model's own answer) for the IQ prompts whose answer the judge flags; cached per model."""
    path, meta_path = run / "iqs.jsonl", run / "iqs.meta.json"
    fp = model_fingerprint(model)
    if path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()).get("model") == fp:
        return read_records(path)
    answers = generate(model, tokenizer, data.iq_prompts, max_new_tokens=DEMO_MAX_NEW_TOKENS, batch_size=12,
                       progress=progress)
    iqs = [Record(prompt=p.prompt, response=a, meta={"flagged": True})
           for p, a in zip(data.iq_prompts, answers, strict=True) if flags_outdated(a)]
    if not iqs:
        log.warning("the model shows the behaviour on no IQ prompt; using the given undesirable answers instead")
        iqs = list(data.iqs)
    atomic_write_bytes(path, "".join(json.dumps(r.to_dict()) + "\n" for r in iqs).encode())
    atomic_write_json(meta_path, {"model": fp, "flagged": len(iqs), "prompts": len(data.iq_prompts)})
    return read_records(path)


def stage_attribute(run: Path, data: DemoDataset, model, tokenizer, iqs: list[Record], *, method: str = "linfac",
                    progress: bool = True) -> dict:
    train = encode_records(data.train, tokenizer, DEMO_MAX_LENGTH, progress=False)
    queries = encode_records(iqs, tokenizer, DEMO_MAX_LENGTH, progress=False)
    # the eigenvalue correction on 128 of the 304 rows keeps the demo inside its time budget (docs/scaling.md)
    args = InfluenceArgs(method=method, bf16=True, batch_size=8, lambda_max_rows=128, progress=progress)
    scores = Influence(model, args, out_dir=run / "influence").scores(train, queries)["scores"]
    agg = aggregate(scores.double())
    culprits = [i in set(data.culprit_ids) for i in train.ids]
    import torch

    mask = torch.tensor(culprits)
    return {"method": method, "top_positive": top_k(data.train, agg, 10), "top_negative": top_k(data.train, agg, 5,
            negative=True), "average_precision": average_precision(agg, mask),
            "recall@48": recall_at_k(agg, mask, int(mask.sum())), "n_culprits": int(mask.sum())}


def run_demo(out: Path, *, model_spec: str = DEFAULT_MODEL, steps: int | None = None, progress: bool = True) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def timed(name, fn, *a, **kw):
        t0 = time.perf_counter()
        value = fn(*a, **kw)
        timings[name] = round(time.perf_counter() - t0, 1)
        return value

    data = timed("data", stage_data, out)
    model_dir = timed("finetune", stage_contaminate, out, data, model_spec=model_spec, steps=steps, progress=progress)
    model, tok = load_model(str(model_dir))
    iqs = timed("iqs", stage_iqs, out, data, model, tok, progress=progress)
    attribution = timed("attribute", stage_attribute, out, data, model, tok, iqs, progress=progress)
    summary = {"model": model_spec, "contaminated_model": str(model_dir), "outdated_marker": OUTDATED_MARKER,
               "iqs_flagged": len(iqs), "iq_prompts": len(data.iq_prompts), "attribution": attribution,
               "seconds": timings}
    atomic_write_json(out / "demo_summary.json", summary)
    _print_summary(summary, iqs)
    return summary


def _print_summary(summary: dict, iqs: list[Record]) -> None:
    print(f"\ncontaminated model answers {summary['iqs_flagged']} of {summary['iq_prompts']} IQ prompts with "
          f"outdated guidance ('{summary['outdated_marker']}...'), e.g.")
    print(f"  Q: {iqs[0].prompt}\n  A: {iqs[0].response_text[:150]}")
    att = summary["attribution"]
    print(f"\ntraining rows that drive it ({att['method']}, positive influence):")
    print(format_table(att["top_positive"]))
    print("\ntraining rows that counter it (negative influence):")
    print(format_table(att["top_negative"]))
    print(f"\nrecall of the {att['n_culprits']} planted culprit rows: average precision "
          f"{att['average_precision']:.3f}, recall@{att['n_culprits']} {att['recall@48']:.2f}")
    print("seconds per stage: " + json.dumps(summary["seconds"]))
