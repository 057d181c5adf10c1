"""The demo as the README runs it, recorded: `lancet demo --out DIR`, then its headline numbers, the machine, the
date, the command and the wall time in benchmarks/results/demo.json (the file the README's demo table is rendered
from by ``python -m benchmarks.tables``).

    .venv/bin/python -m benchmarks.demo                      # about 10 min on 2 cores
    .venv/bin/python -m benchmarks.tables                    # then: the README's demo table from demo.json
    .venv/bin/python -m benchmarks.demo --out runs/demo_b    # another run directory (it must not exist yet)
    .venv/bin/python -m benchmarks.demo --from-run demo_out  # record a finished run without running it again

The command is the installed ``lancet`` script next to this Python (``.venv/bin/lancet``), in a subprocess, so that
the run is the one a user gets. The run directory must be new: ``lancet demo`` reuses every finished stage of an
existing one, and the wall time would then not be the demo's (``--from-run`` records such a run, with
``"wall_seconds": null``). Set ``LANCET_CACHE`` as for the demo; the model's one-time conversion into the cache is
part of the wall time when the cache is empty (recorded as ``model_cache_was_empty``).

What is read from the run directory (lancet/demo.py, lancet/pipeline.py):
- ``demo_summary.json`` (else ``run_summary.json``): the IQ count, the attribution (the main method's recall and
  the ``compare`` methods' average precision), the checkpoint chosen on validation, the seconds per stage and the
  hardware the run decided on;
- ``influence-<method>.json``: the number of training rows and of culprits;
- ``metrics_before.json`` and ``metrics_after.json``: every test set's headline number and size, and the judge's
  accuracy on its labelled held-out answers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from lancet.artifacts import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"
COUNTED = ("behaviour", "harmful_prompts", "over_refusal")  # rates of n answers, shown as count/n


def cpu() -> dict:
    """The CPU's model name and whether it computes bf16 natively (what `precision auto` decides on)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first processor's
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    info = {"cpu": fields.get("model name") or platform.processor() or None, "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags}
    try:
        import torch

        info |= {"torch": torch.__version__, "threads": torch.get_num_threads()}
    except ImportError:
        pass
    return info


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"{path}: missing; did `lancet demo` finish? (see its output above)") from None


def model_cache_empty() -> bool:
    cache = Path(os.environ.get("LANCET_CACHE", Path.home() / ".cache" / "lancet"))
    return not cache.is_dir() or not any(cache.iterdir())


def headline(run: Path) -> dict:
    """The numbers the README's demo table shows, from the files `lancet demo` wrote into ``run``."""
    summary_file = run / "demo_summary.json" if (run / "demo_summary.json").is_file() else run / "run_summary.json"
    summary = read_json(summary_file)
    att = summary["attribution"]
    method = att["method"]
    influence = read_json(run / f"influence-{method}.json")
    recall = att.get("recall") or influence["recall"]
    compare = att.get("compare", {})
    methods = {method: {"average_precision": round(recall["average_precision"], 4),
                        "recall@50": round(recall["recall@50"], 4), "seconds": att.get("seconds")}}
    for name, row in compare.items():
        if name != method:
            methods[name] = {k: row[k] for k in ("average_precision", "recall@50", "seconds") if k in row}
    before, after = read_json(run / "metrics_before.json"), read_json(run / "metrics_after.json")
    sets = {}
    for name, b in before["sets"].items():
        a = after["sets"][name]
        value_b, value_a = b.get(b["metric"]), a.get(a["metric"])
        entry = {"kind": b["kind"], "metric": b["metric"], "n": b["n"], "before": value_b, "after": value_a}
        if b["kind"] in COUNTED and value_b is not None and value_a is not None:
            entry |= {"before_count": round(value_b * b["n"]), "after_count": round(value_a * a["n"])}
        sets[name] = entry
    selection = summary.get("selection")
    out = {"n_train": influence["n_train"], "n_culprits": recall["n_culprits"],
           "iq_prompts": summary.get("iq_prompts"), "n_iqs": summary["n_iqs"], "method": method, "recall": methods,
           "sets": sets, "judge_accuracy": before.get("judge", {}).get("accuracy"),
           "seconds": summary.get("seconds", {}), "hardware": summary.get("hardware", {}),
           "summary_file": summary_file.name}
    if selection:
        out["selection"] = {"chosen_steps": selection["chosen_steps"],
                            "max_utility_loss": selection.get("max_utility_loss"),
                            "curve": [{k: p[k] for k in ("steps", "behaviour", "utility_loss") if k in p}
                                      for p in selection["curve"]]}
    if out["iq_prompts"] is None:
        out["iq_prompts"] = sum(1 for line in (run / "data" / "iq_prompts.jsonl").open() if line.strip())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo_benchmark", help="a new run directory for `lancet demo --out`")
    parser.add_argument("--from-run", default=None, help="record this finished demo directory; run nothing")
    parser.add_argument("--result", default=str(RESULTS / "demo.json"))
    ns = parser.parse_args(argv)
    started = datetime.now(UTC)
    if ns.from_run:
        run, wall, command, cache_empty = Path(ns.from_run), None, f"lancet demo --out {ns.from_run}", None
    else:
        run = Path(ns.out)
        if run.exists() and any(run.iterdir()):
            raise SystemExit(f"{run} exists: `lancet demo` would reuse its finished stages and the wall time would "
                             "not be the demo's. Pass a new --out, or --from-run to record it as it is.")
        lancet = Path(sys.executable).with_name("lancet")
        if not lancet.is_file():
            raise SystemExit(f"{lancet}: no lancet script beside this Python; install lancet (`make install`)")
        argv_run = [str(lancet), "demo", "--out", str(run)]
        command = f"lancet demo --out {run}"
        cache_empty = model_cache_empty()
        print(f"running: {' '.join(argv_run)}", flush=True)
        t0 = time.perf_counter()
        done = subprocess.run(argv_run, check=False)
        wall = round(time.perf_counter() - t0, 1)
        if done.returncode != 0:
            raise SystemExit(f"`{command}` exited with {done.returncode} after {wall} s; nothing recorded")
    result = {"command": command, "date": started.strftime("%Y-%m-%d"),
              "started": started.isoformat(timespec="seconds"), "wall_seconds": wall,
              "model_cache_was_empty": cache_empty, "run_dir": str(run), "machine": cpu(), **headline(run)}
    atomic_write_json(Path(ns.result), result)  # temp file + rename: never a half-written result
    print(f"wrote {ns.result}; render the tables with `.venv/bin/python -m benchmarks.tables`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
