"""The report: numbers carried into report.json, untrusted text escaped, nothing executable, self-contained page."""

import json
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch

from lancet.artifacts import atomic_save_tensors
from lancet.cli import main
from lancet.report import collect, write_report
from lancet.report.build import methods

SCRIPT = "<script>alert(1)</script>"
IMG = "<img src=x onerror=alert(1)>"
PWN = "<img src=x onerror=\"document.title='pwned'\">"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _metrics(rate, ppl, acc=0.89):
    return {"judge": {"judge": "classifier", "accuracy": acc, "f1": 0.92, "n": 900, "refusal_matcher_accuracy": 0.84},
            "suite": {"name": "small", "max_new_tokens": 48}, "seconds": 12.5,
            "sets": {"advbench": {"kind": "harmful_prompts", "metric": "compliance_rate", "compliance_rate": rate,
                                  "n": 20, "judged": True},
                     PWN: {"kind": "perplexity", "metric": "perplexity", "perplexity": ppl, "n": 8, "judged": False}}}


@pytest.fixture()
def run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    row = {"rank": 1, "id": SCRIPT, "source": f"/data/{IMG}.jsonl", "line": 7, "score": 2.5, "sign": "+",
           "prompt": f"Tell me {SCRIPT}", "response": f"Sure {IMG} and {PWN}"}
    summary = {"method": SCRIPT, "n_train": 200, "n_queries": 12, "seconds": 3.25,
               "top_positive": [row], "top_negative": [{**row, "rank": 1, "score": -1.5, "sign": "-"}],
               "recall": {"average_precision": 0.75, "recall@10": 0.5}, "args": {"damping": SCRIPT}}
    (run / "influence-linfac.json").write_text(json.dumps(summary))
    torch.manual_seed(0)
    atomic_save_tensors(run / "ranking-linfac.safetensors", {"aggregate_normalized_mean": torch.randn(200)})
    (run / "tokens-linfac.json").write_text(json.dumps({"rows": [
        {"id": "r1", "tokens": ["Put", " butter", PWN, SCRIPT], "scores": [0.1, 2.0, -1.0, "x"]}]}))
    (run / "metrics_before.json").write_text(json.dumps(_metrics(0.6, 12.0)))
    (run / "metrics_after.json").write_text(json.dumps(_metrics(0.2, 13.0)))
    (run / "influence-bad.name.json").write_text("{}")  # a dotted method name is not used to build paths
    return run


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_report_escapes_untrusted_text(run_dir):
    html_path, json_path = write_report(run_dir)
    html = html_path.read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "&lt;img src=x onerror=&quot;document.title=&#x27;pwned&#x27;&quot;&gt;" in html
    assert "<script" not in html.lower()
    for i in range(len(html)):  # every onerror= sits inside escaped text (after "&lt;", not after a raw "<")
        if html.startswith("onerror=", i):
            assert html.rfind("&lt;", 0, i) > html.rfind("<", 0, i)
    parser = Tags()
    parser.feed(html)
    names = {t for t, _ in parser.tags}
    assert not names & {"script", "iframe", "object", "embed", "link", "base", "form"}
    for tag, attrs in parser.tags:
        assert not any(a.startswith("on") for a in attrs), tag
        if tag == "img":
            assert attrs["src"].startswith("data:image/png;base64,")
        assert not any("http:" in (v or "") or "https:" in (v or "") for v in attrs.values())
    assert sum(t == "img" for t, _ in parser.tags) == 2  # the histogram and the before/after bars


def test_report_json_numbers(run_dir):
    write_report(run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    (inf,) = report["influence"]
    assert inf["method"] == "linfac" and inf["n_train"] == 200 and inf["seconds"] == 3.25
    assert inf["recall"] == {"average_precision": 0.75, "recall@10": 0.5}
    assert inf["score_stats"]["n"] == 200 and inf["top_positive"][0]["score"] == 2.5
    assert report["tokens"]["linfac"][0]["tokens"][3] == [SCRIPT, 0.0]  # a non-number score becomes 0
    comp = {c["set"]: c for c in report["comparison"]}
    assert comp["advbench"]["before"] == 0.6 and comp["advbench"]["after"] == 0.2 and comp["advbench"]["judged"]
    assert comp[PWN]["metric"] == "perplexity" and comp[PWN]["after"] == 13.0
    assert report["compute"]["attribute linfac (s)"] == 3.25 and report["compute"]["evaluate after (s)"] == 12.5


def test_method_names_are_sanitised(tmp_path):
    for name in ("influence-ok_1.json", "influence-a.b.json", "influence-.json", "influence--x.json"):
        (tmp_path / name).write_text("{}")
    assert methods(tmp_path, "influence-", ".json") == ["ok_1"]


def test_empty_run_dir_and_cli(tmp_path, capsys):
    report, images = collect(tmp_path)
    assert report["influence"] == [] and images == {}
    assert main(["report", str(tmp_path)]) == 0
    assert "Nothing to report yet" in (tmp_path / "report.html").read_text()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "run directory not found" in capsys.readouterr().err


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")
def test_report_renders_in_headless_chromium_without_executing_payload(run_dir, tmp_path):
    html_path, _ = write_report(run_dir)
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1200,2000"]
    dom = subprocess.run(flags + [f"--user-data-dir={tmp_path / 'p1'}", "--virtual-time-budget=3000", "--dump-dom",
                                  html_path.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert "<title>lancet report</title>" in dom and "pwned" not in dom.split("</title>")[0]
    parser = Tags()
    parser.feed(dom)
    assert not [a for t, a in parser.tags if t == "img" and a.get("src") == "x"]
    assert not [t for t, _ in parser.tags if t == "script"]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom  # shown as text
    png = tmp_path / "shot.png"
    subprocess.run(flags + [f"--user-data-dir={tmp_path / 'p2'}", f"--screenshot={png}", html_path.as_uri()],
                   capture_output=True, timeout=120)
    assert png.is_file() and png.stat().st_size > 10_000
