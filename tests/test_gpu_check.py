"""benchmarks/gpu_check.py runs here in its --dry-run mode (tiny shapes, CPU), so the script a lent GPU gets once
has run end to end before: every stage writes its numbers, none records an error."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_every_stage(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path), "--dry-run",
           "--stages", "agreement,resume,speed_1b"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = result["stages"]
    assert result["dry_run"] and result["device"] == "cpu" and set(stages) == {"agreement", "resume", "speed_1b"}
    assert not any("error" in s for s in stages.values()), stages
    # on one device the comparisons are exact: CPU against CPU, and resume is bit-identical on CPU
    assert stages["agreement"]["passed"] and all(m["relative_error"] == 0.0
                                                 for m in stages["agreement"]["methods"].values())
    assert stages["resume"]["bit_identical"] and stages["resume"]["passed"]
    run = stages["speed_1b"]["runs"]["linfac_bf16_rank32"]
    assert run["finite"] and run["fit_plus_score_s"] > 0 and run["score_vs_raw"] > 0
    assert stages["speed_1b"]["raw_fp32"]["tokens_per_s"] > 0
