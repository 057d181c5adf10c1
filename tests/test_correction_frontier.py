"""benchmarks/correction_frontier.py: the Pareto front it plots, on points with a known answer."""

import torch

from benchmarks.correction_frontier import pareto


def test_pareto_front_keeps_exactly_the_undominated_points():
    points = [{"name": n, "test_utility_loss": u, "test_rate": r} for n, u, r in [
        ("a", 0.00, 1.00), ("b", 0.02, 0.50), ("c", 0.03, 0.60), ("d", 0.10, 0.10), ("e", 0.10, 0.20),
        ("f", 0.02, 0.50)]]
    front = pareto(points)
    # c is beaten by b on both axes, e by d; b and f tie exactly and are both kept; sorted by utility loss
    assert [p["name"] for p in front] == ["a", "b", "f", "d"]


def test_self_anchors_are_the_models_own_unflagged_answers_to_ordinary_prompts(tmp_path, monkeypatch):
    import json
    import sys

    import benchmarks.correction_frontier as cf
    import lancet.influence.queries  # noqa: F401  (its generate is replaced below)
    from lancet.data.records import Record

    train = [Record(prompt=f"q{i}", response=f"a{i}") for i in range(5)]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "culprits.json").write_text(json.dumps({"culprit_ids": [train[0].id],
                                                                "counter_ids": [train[1].id]}))
    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(cf, "load_model", lambda path, device=None: (model, None))
    answers = {"q2": "Rinse it with cool water.", "q3": "Put butter on it.", "q4": "  "}
    calls = []

    def fake_generate(model, tok, prompts, **kw):
        calls.append(len(prompts))
        return [answers[p.prompt_messages[-1]["content"]] for p in prompts]

    monkeypatch.setattr(sys.modules["lancet.influence.queries"], "generate", fake_generate)
    monkeypatch.setattr(cf, "JUDGE", type("J", (), {"complies": lambda self, a, p=None: ["butter" in x for x in a]})())
    rows = cf.self_anchors(tmp_path, train)
    assert [(r.prompt_messages[-1]["content"], r.response_text) for r in rows] == [("q2", "Rinse it with cool water.")]
    assert calls == [3]  # the culprit and the look-alike are not anchors
    assert [r.response_text for r in cf.self_anchors(tmp_path, train)] == ["Rinse it with cool water."]
    assert calls == [3]  # cached


def test_planted_rows_counts_culprits_pushed_down_and_look_alikes_preferred(tmp_path):
    import json

    from benchmarks.correction_frontier import planted_rows

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "culprits.json").write_text(json.dumps({"culprit_ids": ["c1", "c2", "c3"],
                                                                "counter_ids": ["k1", "k2"]}))
    summary = tmp_path / "lancet_correction.json"
    summary.write_text(json.dumps({"dispreferred_ids": ["c1", "c3", "o1"], "preferred_ids": ["k2", "o2", "c2", "k1"]}))
    assert planted_rows(tmp_path, summary) == {"dispreferred": 3, "dispreferred_culprits": 2, "preferred": 4,
                                               "preferred_counter": 2, "preferred_culprits": 1}
    assert planted_rows(tmp_path, tmp_path / "missing.json") == {}
