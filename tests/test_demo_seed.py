"""``lancet demo --seed N``: the fine-tune's seed reaches its TrainArgs, and the default config is the demo's as
before (the contamination suite's demo seeds, docs/method.md §5.6). No model is trained."""

from __future__ import annotations

import json
from pathlib import Path

from lancet.artifacts import hash_json
from lancet.demo import demo_config
from lancet.train import TrainArgs

# hash_json of demo_config(out) with the run directory written as OUT; changed deliberately on 2026-12-05 (third
# session) when the correction became the self-anchored IBO the demo's re-choice selected, and on 2026-12-06
# (eleventh) when its learning rate became 1e-4 (docs/method.md §5.2)
DEFAULT_CONFIG_HASH = "5a768347d56ee73a"


def _normalised(config: dict, out: Path) -> dict:
    return json.loads(json.dumps(config).replace(str(out.resolve()), "OUT"))


def test_default_demo_config_is_unchanged(tmp_path):
    config = demo_config(tmp_path)
    assert hash_json(_normalised(config, tmp_path)) == DEFAULT_CONFIG_HASH
    assert demo_config(tmp_path, seed=0) == config
    assert "seed" not in config["finetune"]
    assert TrainArgs.from_json({**config["finetune"], "output_dir": "-"}).seed == 0  # TrainArgs' own default


def test_the_seed_reaches_the_finetune_train_args(tmp_path):
    from lancet.pipeline import RunConfig

    config = RunConfig.from_json(demo_config(tmp_path, seed=3))
    assert TrainArgs.from_json({**config.finetune, "output_dir": "-"}).seed == 3
    # only the fine-tune changes: the correction and everything else stay the default demo's
    default = demo_config(tmp_path)
    seeded = demo_config(tmp_path, seed=3)
    assert {k: v for k, v in seeded.items() if k != "finetune"} == {k: v for k, v in default.items() if k != "finetune"}
    assert {k: v for k, v in seeded["finetune"].items() if k != "seed"} == default["finetune"]


def test_stage_contaminate_passes_the_seed(tmp_path, monkeypatch):
    import lancet.demo as demo

    seen = {}
    monkeypatch.setattr(demo, "finetune", lambda spec, rows, args, max_length, keep_checkpoints: seen.update(
        args=args, keep=keep_checkpoints))
    demo.stage_contaminate(tmp_path, demo.build_demo_dataset(), seed=2, progress=False, keep_checkpoints=3)
    assert (seen["args"].seed, seen["keep"]) == (2, 3)
    seen.clear()
    demo.stage_contaminate(tmp_path, demo.build_demo_dataset(), progress=False)
    assert (seen["args"].seed, seen["keep"]) == (0, None)


def test_cli_demo_seed_option(monkeypatch):
    import lancet.demo
    from lancet.cli import build_parser, main

    assert build_parser().parse_args(["demo"]).seed == 0
    seen = {}
    monkeypatch.setattr(lancet.demo, "run_demo", lambda out, **kw: seen.update(kw) or {})
    assert main(["demo", "--out", "x", "--seed", "4", "--quiet"]) == 0
    assert seen["seed"] == 4
