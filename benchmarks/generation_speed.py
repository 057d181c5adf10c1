"""Greedy generation throughput of SmolLM2-135M-Instruct at batch 1, 8 and 16 (KV cache, left padding), the way
the evaluation stage and IQ generation call it (lancet.models.generate).

    PYTHONPATH=. .venv/bin/python benchmarks/generation_speed.py [--prompts 16] [--new-tokens 64] [--precision fp32]

Tokens/s counts the new tokens the model produced (up to its end of sequence; padding after it is not counted),
over the wall time of ``generate`` on the same prompts at each batch size. Batch 16 must reach >= 3x batch 1
(issue 15). Writes benchmarks/results/generation_speed.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, write_result  # noqa: E402
from lancet.data.demo import build_demo_dataset  # noqa: E402
from lancet.hardware import autocast, decide  # noqa: E402
from lancet.models.generate import render_prompt  # noqa: E402
from lancet.models.loading import load_model  # noqa: E402


@torch.no_grad()
def timed_generate(model, tok, texts: list[str], batch_size: int, new_tokens: int, device, bf16: bool
                   ) -> tuple[float, int]:
    """(seconds, new tokens produced) for greedy generation of every text in batches of ``batch_size``."""
    tok.padding_side = "left"
    produced, t0 = 0, time.perf_counter()
    for start in range(0, len(texts), batch_size):
        batch = tok(texts[start:start + batch_size], return_tensors="pt", padding=True,
                    add_special_tokens=False).to(device)
        with autocast(device, bf16):
            out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None,
                                 top_k=None, pad_token_id=tok.pad_token_id, use_cache=True)
        new = out[:, batch["input_ids"].shape[1]:]
        ended = (new == tok.eos_token_id).cumsum(1) > 0  # tokens after the first end of sequence are padding
        produced += int((~ended).sum()) + int(ended.any(1).sum())
    return time.perf_counter() - t0, produced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--name", default="generation_speed",
                        help="result file under benchmarks/results (one per machine sort)")
    ns = parser.parse_args()
    device, precision = decide(ns.device, ns.precision)
    model, tok = load_model("smollm2-135m-instruct", device=device)
    texts = [render_prompt(r, tok) for r in build_demo_dataset().iq_prompts[: ns.prompts]]
    timed_generate(model, tok, texts[:2], 2, 4, device, precision.bf16)  # warm-up
    result: dict = {"model": "smollm2-135m-instruct", "prompts": len(texts), "max_new_tokens": ns.new_tokens,
                    "device": str(device), "precision": precision.name, "env": environment(), "batches": {}}
    for batch_size in (1, 8, 16):
        seconds, produced = timed_generate(model, tok, texts, batch_size, ns.new_tokens, device, precision.bf16)
        result["batches"][str(batch_size)] = {"seconds": round(seconds, 2), "new_tokens": produced,
                                              "tokens_per_s": round(produced / seconds, 1)}
        print(batch_size, result["batches"][str(batch_size)], flush=True)
    one, sixteen = (result["batches"][b]["tokens_per_s"] for b in ("1", "16"))
    result["batch16_over_batch1"] = round(sixteen / one, 2)
    write_result(ns.name, result)


if __name__ == "__main__":
    main()
