"""The gradient index (lancet.influence.index) on tiny float64 models: exact at full rank against ordinary scoring,
resumed and appended shard by shard, stale indexes refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tiny_llama

from lancet.data import Record, encode_records
from lancet.errors import LancetError
from lancet.influence import IndexArgs, Influence, InfluenceArgs
from lancet.influence.index import bytes_per_row, load_projections, make_projections, read_meta

TOPICS = ["paint a fence", "bake bread", "tune a guitar", "plant tomatoes", "fold a shirt", "learn chess",
          "write a poem", "brew tea", "knit a scarf", "read faster"]
FULL = 64  # at least every tracked width of the tiny model (16 and 32): the projections are complete


@pytest.fixture()
def setup(tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer), torch.float64)
    train = list(encode_records([Record(prompt=f"How do I {t}?", response=f"Go slowly and {t}, then rest.")
                                 for t in TOPICS], tiny_tokenizer, 64, progress=False))
    queries = list(encode_records([Record(prompt="How do I bake a cake?", response="Go slowly and bake it."),
                                   Record(prompt="Tell me a poem", response="Roses are red.")],
                                  tiny_tokenizer, 64, progress=False))
    return model, train, queries


def args(method: str) -> InfluenceArgs:
    return InfluenceArgs(method=method, dtype="float64", batch_size=4, progress=False)


@pytest.mark.parametrize(("method", "projection"), [("ekfac", "eigen"), ("kfac", "eigen"), ("linfac", "eigen"),
                                                    ("linfac", "random"), ("identity", "random"),
                                                    ("cosine", "random")])
def test_full_rank_index_is_exact(setup, tmp_path, method, projection):
    """r = the widths: every projection is a complete orthonormal basis, so the index scores are the ordinary
    scores (LinFAC's range has at most 10 directions here, fewer than the widths: the complement completes it)."""
    model, train, queries = setup
    run = Influence(model, args(method), out_dir=tmp_path / "run")
    want = run.scores(train, queries)["scores"]
    run.build_index(train, tmp_path / "index", IndexArgs(rank=FULL, projection=projection, dtype="float64",
                                                         shard_rows=4, batch_size=4, progress=False))
    got = run.index_scores(queries, tmp_path / "index")["scores"]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    if method == "linfac":  # a complete basis keeps all of the preconditioned queries; rank 2 keeps part
        from lancet.influence.index import index_curvature, project_queries

        curvature = index_curvature(tmp_path / "index", model)
        for rank, expect in ((None, 1.0), (2, None)):
            energy: dict[str, float] = {}
            project_queries(model, curvature, queries, tmp_path / "index", run.args, rank=rank, kept=energy)
            share = energy["kept"] / energy["total"]
            assert share == pytest.approx(1.0, abs=1e-9) if expect else 0 < share < 0.9


@pytest.mark.parametrize(("method", "rank_by"), [("linfac", "factor"), ("linfac", "corrected"), ("kfac", "factor"),
                                                 ("ekfac", "corrected")])
def test_eigen_queries_projected_first_equal_preconditioned_first(setup, tmp_path, method, rank_by):
    """Below full rank the kept directions of an eigen index are eigendirections of the preconditioner, so the fast
    path (project the query's (a, g) pairs, divide by the kept eigenvalues + damping) equals preconditioning the
    full gradient and projecting it (the path ``kept=`` forces), at the built rank and at a lower query rank."""
    from lancet.influence.index import fast_path_share, index_curvature, project_queries

    model, train, queries = setup
    run = Influence(model, args(method), out_dir=tmp_path / "run")
    run.fit(train)
    run.build_index(train, tmp_path / "index", IndexArgs(rank=4, rank_by=rank_by, dtype="float64", progress=False))
    curvature = index_curvature(tmp_path / "index", model)
    assert fast_path_share(curvature, tmp_path / "index", run.args) == 1.0
    for rank in (None, 2):
        fast = project_queries(model, curvature, queries, tmp_path / "index", run.args, rank=rank)
        slow = project_queries(model, curvature, queries, tmp_path / "index", run.args, rank=rank, kept={})
        assert set(fast) == set(slow)
        for name in slow:
            torch.testing.assert_close(fast[name], slow[name], rtol=1e-8, atol=1e-10 * float(slow[name].abs().max()))
    # with fewer range directions than the rank, random directions complete LinFAC's: those layers are
    # preconditioned at full size, the others projected first, and the two together equal the full-size path
    if method == "linfac":  # a coarse range cut leaves 3-10 directions per side, so rank 6 completes some layers
        from dataclasses import replace

        coarse = Influence(model, replace(args(method), range_rtol=0.01), out_dir=tmp_path / "coarse")
        coarse.build_index(train, tmp_path / "wide", IndexArgs(rank=6, dtype="float64", progress=False))
        wide = index_curvature(tmp_path / "wide", model)
        share = fast_path_share(wide, tmp_path / "wide", run.args)
        assert 0.0 < share < 1.0 and fast_path_share(wide, tmp_path / "wide", run.args, rank=3) == 1.0
        mixed = project_queries(model, wide, queries, tmp_path / "wide", run.args)
        slow = project_queries(model, wide, queries, tmp_path / "wide", run.args, kept={})
        for name in slow:
            torch.testing.assert_close(mixed[name], slow[name], rtol=1e-8, atol=1e-10 * float(slow[name].abs().max()))


def test_half_precision_storage_and_truncation(setup, tmp_path):
    """fp16 storage (each block scaled to unit max first) keeps scores to ~1e-3; rank 4 of widths 16/32 keeps the
    ranking's top rows only approximately, and the size formula matches the shards on disk."""
    model, train, queries = setup
    run = Influence(model, args("ekfac"), out_dir=tmp_path / "run")
    want = run.scores(train, queries)["scores"]
    run.build_index(train, tmp_path / "half", IndexArgs(rank=FULL, dtype="float16", progress=False))
    half = run.index_scores(queries, tmp_path / "half")["scores"]
    torch.testing.assert_close(half.double(), want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))
    run.build_index(train, tmp_path / "r4", IndexArgs(rank=4, dtype="float16", progress=False))
    low = run.index_scores(queries, tmp_path / "r4")["scores"]
    assert not torch.allclose(low.double(), want, rtol=1e-2)
    corr = torch.corrcoef(torch.stack([low.double().flatten(), want.flatten()]))[0, 1]
    assert corr > 0.5
    meta = read_meta(tmp_path / "r4")
    per_row = bytes_per_row(meta, load_projections(tmp_path / "r4"))
    assert per_row == len(meta["layers"]) * (4 * 4 * 2 + 4)
    assert bytes_per_row(meta, load_projections(tmp_path / "r4"), 2) == len(meta["layers"]) * (2 * 2 * 2 + 4)


def test_eigen_projection_keeps_the_largest_eigendirections(setup, tmp_path):
    model, train, _ = setup
    run = Influence(model, args("ekfac"), out_dir=tmp_path / "run")
    curvature = run.fit(train)
    name = curvature.layers[0].name
    state = curvature.state[name]
    by_factor = make_projections(curvature.layers, IndexArgs(rank=3), curvature)[name]
    top = torch.argsort(state["S_vals"], descending=True)[:3]
    torch.testing.assert_close(by_factor["S"], state["S_vecs"][:, top].double())
    by_corrected = make_projections(curvature.layers, IndexArgs(rank=3, rank_by="corrected"), curvature)[name]
    top = torch.argsort(state["lambda"].sum(0), descending=True)[:3]
    torch.testing.assert_close(by_corrected["A"], state["A_vecs"][:, top].double())
    with pytest.raises(LancetError, match="corrected eigenvalues"):
        kfac = Influence(model, args("kfac"), out_dir=tmp_path / "run").fit(train)
        make_projections(kfac.layers, IndexArgs(rank_by="corrected"), kfac)


def test_resume_is_bit_identical_and_append_adds_rows(setup, tmp_path):
    from lancet.influence.index import build_index, index_curvature

    model, train, queries = setup
    run = Influence(model, args("linfac"), out_dir=tmp_path / "run")
    opts = IndexArgs(rank=8, dtype="float32", shard_rows=4, batch_size=4, progress=False)
    whole = run.build_index(train, tmp_path / "whole", opts)
    assert [(s["start"], s["stop"]) for s in whole["shards"]] == [(0, 4), (4, 8), (8, 10)]
    # a build killed after its first shard: the later shards and their sidecars were never written, nor the
    # final index.json (it still lists no shard); until the rerun, the index refuses to answer
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "whole", killed)
    meta = json.loads((killed / "index.json").read_text())
    for shard in meta["shards"][1:]:
        (killed / shard["file"]).unlink()
        (killed / shard["file"].replace(".safetensors", ".json")).unlink()
    meta["shards"], meta["n_rows"] = [], 0
    (killed / "index.json").write_text(json.dumps(meta))
    with pytest.raises(LancetError, match="holds 0 rows"):
        run.index_scores(queries, killed, train=train)
    run.build_index(train, killed, opts)
    for shard in whole["shards"]:
        assert (killed / shard["file"]).read_bytes() == (tmp_path / "whole" / shard["file"]).read_bytes()
    # append: an index of 6 rows grown to 10 keeps its curvature and its shards (4..6 stays a short shard)
    small = Influence(model, args("linfac"), out_dir=tmp_path / "run6")
    grown = tmp_path / "grown"
    small.build_index(train[:6], grown, opts)
    meta = small.build_index(train, grown, opts)
    assert [(s["start"], s["stop"]) for s in meta["shards"]] == [(0, 4), (4, 6), (6, 10)]
    reference = build_index(model, train, tmp_path / "ref", opts, curvature=index_curvature(grown, model))
    assert reference["n_rows"] == 10
    torch.testing.assert_close(small.index_scores(queries, grown)["scores"],
                               small.index_scores(queries, tmp_path / "ref")["scores"], rtol=1e-5, atol=1e-9)


def test_stale_index_is_refused(setup, tiny_tokenizer, tmp_path):
    model, train, queries = setup
    run = Influence(model, args("ekfac"), out_dir=tmp_path / "run")
    run.build_index(train, tmp_path / "index", IndexArgs(rank=4, progress=False))
    with pytest.raises(LancetError, match="differ from the indexed"):
        run.index_scores(queries, tmp_path / "index", train=list(reversed(train)))
    with pytest.raises(LancetError, match="holds 10 rows"):
        run.index_scores(queries, tmp_path / "index", train=train[:9])
    other = Influence(tiny_llama(len(tiny_tokenizer), torch.float64, seed=1), args("ekfac"), out_dir=tmp_path / "run")
    with pytest.raises(LancetError, match="another model"):
        other.index_scores(queries, tmp_path / "index")
    with pytest.raises(LancetError, match="another"):
        run.build_index(train, tmp_path / "index", IndexArgs(rank=8, progress=False))
    with pytest.raises(LancetError, match="differ from the rows"):
        run.build_index(list(reversed(train)), tmp_path / "index", IndexArgs(rank=4, progress=False))
    assert json.loads((tmp_path / "index" / "index.json").read_text())["n_rows"] == 10


def test_index_args_validate_and_round_trip():
    a = IndexArgs(rank=8, projection="random", dtype="bfloat16")
    assert IndexArgs.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    for bad in ({"rank": 0}, {"projection": "pca"}, {"rank_by": "size"}, {"dtype": "int8"}, {"shard_rows": 0}):
        with pytest.raises(LancetError):
            IndexArgs(**bad)


def test_lower_rank_at_query_time_equals_an_index_of_that_rank(setup, tmp_path):
    """The eigen projection's columns are sorted by the ranking rule, so an index of rank 8 read at rank 4 is the
    rank-4 index (to the fp rounding of its per-block scale)."""
    model, train, queries = setup
    run = Influence(model, args("ekfac"), out_dir=tmp_path / "run")
    run.build_index(train, tmp_path / "r8", IndexArgs(rank=8, dtype="float64", progress=False))
    run.build_index(train, tmp_path / "r4", IndexArgs(rank=4, dtype="float64", progress=False))
    torch.testing.assert_close(run.index_scores(queries, tmp_path / "r8", rank=4)["scores"],
                               run.index_scores(queries, tmp_path / "r4")["scores"], rtol=1e-9, atol=1e-12)


def test_index_speed_benchmark_runs_end_to_end(tiny_tokenizer, tmp_path, monkeypatch):
    """benchmarks/index_speed.py on a tiny model and a fake safety run: every (projection, rank) row is written, at
    the largest rank of a complete basis the index agrees with full LinFAC, and a rerun reuses the stored timings."""
    import gzip
    import sys

    import benchmarks.common as common
    import benchmarks.index_speed as bench
    from lancet.data.records import records_to_jsonl

    safety = tmp_path / "safety"
    tiny_llama(len(tiny_tokenizer)).save_pretrained(safety / "impure")
    tiny_tokenizer.save_pretrained(safety / "impure")
    mix = [Record(prompt=f"How do I {t}?", response=f"Go slowly and {t}.", label="unsafe" if i % 3 == 0 else "benign")
           for i, t in enumerate(TOPICS)]
    (safety / "mix.jsonl").write_bytes(records_to_jsonl(mix))
    (safety / "iqs.jsonl").write_bytes(records_to_jsonl([Record(prompt="How do I bake a cake?", response="Slowly."),
                                                         Record(prompt="Tell me a poem", response="Roses.")]))
    shared = tmp_path / "data" / "hh-rlhf"
    shared.mkdir(parents=True)
    with gzip.open(shared / "helpful-base_test.jsonl.gz", "wt") as fh:
        fh.writelines(json.dumps({"chosen": f"\n\nHuman: Why {t}?\n\nAssistant: Because {t} helps.",
                                  "rejected": "\n\nHuman: x\n\nAssistant: y"}) + "\n" for t in TOPICS[:6])
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    argv = ["index_speed", "--safety-run", str(safety), "--run-dir", str(tmp_path / "run"), "--shared",
            str(tmp_path / "data"), "--hh-rows", "4", "--iqs", "2", "--ranks", "2,64", "--lambda-rows", "8",
            "--quiet"]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    out = json.loads((tmp_path / "results" / "index_speed.json").read_text())
    assert out["n_rows"] == 14 and set(out["indexes"]) == {"eigen", "random"}
    assert out["env"]["precision"] == "fp32" and out["bf16"] is False  # what ran, whatever this machine prefers
    for name in ("eigen", "random"):
        full = out["indexes"][name]["rank_64"]
        assert full["spearman"] > 0.999 and full["query_energy_kept"] == pytest.approx(1.0, abs=1e-6)
        assert out["indexes"][name]["rank_2"]["query_energy_kept"] < 1.0
    low = out["indexes"]["eigen"]["rank_2"]  # LinFAC's range (14 rows) holds 2 directions: projected first
    assert low["fast_path_share"] == 1.0 and low["fast_path_max_rel_diff"] < 1e-4
    assert out["indexes"]["random"]["rank_2"]["fast_path_share"] == 0.0
    text = bench.table(out)
    assert text.count("\n| eigen | ") == 2 and text.count("\n| random | ") == 2 and "over 14 rows" in text
    seen = json.loads((tmp_path / "run" / "timings.json").read_text())
    bench.main()
    assert json.loads((tmp_path / "run" / "timings.json").read_text()) == seen


def test_safety_index_recall_at_full_rank_is_full_linfac(tiny_tokenizer, tmp_path, monkeypatch):
    """benchmarks/safety_index_recall.py on a fake seed directory: at a rank covering every width the eigen and
    random indexes rank the rows exactly as LinFAC's aggregated scores do (same AP and tiers); a lower rank runs."""
    from dataclasses import replace

    import benchmarks.safety_contamination as sc
    import benchmarks.safety_index_recall as bench
    from lancet.artifacts import atomic_save_tensors
    from lancet.data.records import records_to_jsonl
    from lancet.influence.recall import aggregate

    seed_dir = tmp_path / "seed0"
    model = tiny_llama(len(tiny_tokenizer))
    model.save_pretrained(seed_dir / "impure")
    tiny_tokenizer.save_pretrained(seed_dir / "impure")
    labels = ["unsafe", "benign", "implicit", "benign", "refusal"]
    mix = [Record(prompt=f"How do I {t}?", response=f"Go slowly and {t}.", label=labels[i % 5], id=f"r{i}")
           for i, t in enumerate(TOPICS)]
    iqs = [Record(prompt="How do I bake a cake?", response="Go slowly and bake."),
           Record(prompt="Tell me a poem", response="Roses.")]
    (seed_dir / "mix.jsonl").write_bytes(records_to_jsonl(mix))
    (seed_dir / "iqs.jsonl").write_bytes(records_to_jsonl(iqs))
    preset = replace(sc.PRESETS["small"], max_length=64, lambda_max_rows=8)
    train = encode_records(mix, tiny_tokenizer, 64, progress=False)
    args = InfluenceArgs(method="linfac", batch_size=8, lambda_max_rows=8, per_layer=True, progress=False)
    full = Influence(model, args, out_dir=tmp_path / "ref").scores(
        train, list(encode_records(iqs, tiny_tokenizer, 64, progress=False)))["scores"].double()
    atomic_save_tensors(seed_dir / "rankings.safetensors", {"linfac": aggregate(full).contiguous()})
    (seed_dir / "rankings.json").write_text(json.dumps({"ids": list(train.ids)}))
    out = bench.seed_recall(seed_dir, preset, [2, FULL], bf16=False, progress=False)
    assert out["n_train"] == 10 and out["n_positives"] == 4
    for projection in ("eigen", "random"):
        at_full = out["indexes"][projection][f"rank_{FULL}"]
        assert at_full["average_precision"] == out["full"]["linfac"]["average_precision"]
        assert at_full["ap_by_tier"] == out["full"]["linfac"]["ap_by_tier"]
        assert 0.0 < out["indexes"][projection]["rank_2"]["average_precision"] <= 1.0
    ablation = bench.range_ablation(seed_dir, preset, [None, 0.3], bf16=False, progress=False)
    assert set(ablation) == {"default", "0.3"}
    coarse, default = ablation["0.3"]["ranges"], ablation["default"]["ranges"]
    assert coarse["layers"] == default["layers"] and coarse["median_A"] + coarse["median_S"] < (
        default["median_A"] + default["median_S"])
    assert all(0.0 < row["average_precision"] <= 1.0 for row in ablation.values())
    assert (seed_dir / "influence-range-0.3" / "curvature" / "linfac" / "meta.json").is_file()


def test_spearman_and_top_overlap_known_answers():
    from lancet.influence.recall import spearman, top_overlap

    a = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert spearman(a, a * 10) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    assert top_overlap(a, torch.tensor([4.0, 1.0, 3.0, 2.0]), 2) == 0.5  # tops {0, 1} and {0, 2}
    assert top_overlap(a, a, 100) == 1.0  # k larger than the rows: every row
