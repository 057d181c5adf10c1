"""The CLI contract: bad input -> one line naming file, line and field, exit code 2, no traceback (unless --debug)."""

import json
import subprocess
import sys

import pytest
import torch

from lancet.cli import build_parser, main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lancet.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_verb(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for verb in ("finetune", "attribute", "correct", "evaluate", "report", "demo", "data"):
        assert verb in out


def test_bad_json_line_is_one_line_exit_2(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n{"prompt": oops}\n')
    proc = run("finetune", "x", "--train", str(data), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "train.jsonl:3" in lines[0]


def test_missing_field_names_field(tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps({"response": "x"}) + "\n")
    assert main(["-q", "finetune", "m", "--train", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "rows.jsonl:2" in err and "prompt" in err


def test_debug_shows_traceback(tmp_path):
    proc = run("--debug", "finetune", "x", "--train", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path))
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_unknown_model_is_clear(tmp_path):
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    proc = run("finetune", str(tmp_path / "nope.gguf"), "--train", str(data), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "nope.gguf: GGUF file not found" in proc.stderr


def test_attribute_rejects_queries_without_response(tmp_path, tiny_tokenizer):
    from conftest import tiny_llama

    model_dir = tmp_path / "m"
    tiny_llama(len(tiny_tokenizer)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    train, queries = tmp_path / "train.jsonl", tmp_path / "q.jsonl"
    train.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    queries.write_text(json.dumps({"prompt": "a"}) + "\n")
    rc = main(["-q", "attribute", str(model_dir), "--train", str(train), "--queries", str(queries), "--out",
               str(tmp_path / "run")])
    assert rc == 2


def test_attribute_end_to_end_on_tiny_model(tmp_path, tiny_tokenizer, capsys):
    from conftest import tiny_llama

    from lancet.data.demo import write_demo_dataset

    files = write_demo_dataset(tmp_path / "demo")
    model_dir = tmp_path / "m"
    tiny_llama(len(tiny_tokenizer)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    rc = main(["-q", "attribute", str(model_dir), "--train", str(files["train"]), "--queries", str(files["iqs"]),
               "--out", str(tmp_path / "run"), "--method", "identity", "--labels", str(files["culprits"]),
               "--max-length", "128", "--batch-size", "16"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "average precision" in out and "train.jsonl:" in out
    summary = json.loads((tmp_path / "run" / "influence-identity.json").read_text())
    assert summary["n_train"] == 224 and summary["recall"]["n_culprits"] == 84
    assert 0.0 <= summary["recall"]["average_precision"] <= 1.0
    assert len(summary["top_positive"]) == 10


def _sums_run(tmp_path, tokenizer):
    """A saved tiny model, 8 training rows of sums, and one IQ."""
    from conftest import tiny_llama

    model_dir = tmp_path / "m"
    tiny_llama(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = [{"prompt": f"What is {i} and {i + 1}?", "response": f"It is {2 * i + 1}."} for i in range(8)]
    train, queries = tmp_path / "train.jsonl", tmp_path / "q.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    queries.write_text(json.dumps({"prompt": "What is 2 and 3?", "response": "It is 5."}) + "\n")
    return model_dir, train, queries


def test_attribute_contrast_response(tmp_path, tiny_tokenizer):
    """Ranking by the margin over a contrast answer: scores are the IQ's minus the contrast's, so contrasting an
    IQ with its own answer gives exactly zero, and a different answer changes the ranking."""
    from lancet.artifacts import load_tensors

    model_dir, train, queries = _sums_run(tmp_path, tiny_tokenizer)
    base = ["-q", "attribute", str(model_dir), "--train", str(train), "--queries", str(queries), "--method", "kfac"]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert main([*base, "--out", str(tmp_path / "self"), "--contrast-response", "It is 5."]) == 0
    assert main([*base, "--out", str(tmp_path / "other"), "--contrast-response", "I cannot answer."]) == 0
    plain = load_tensors(tmp_path / "plain" / "ranking-kfac.safetensors")["scores"]
    own = load_tensors(tmp_path / "self" / "ranking-kfac.safetensors")["scores"]
    other = load_tensors(tmp_path / "other" / "ranking-kfac.safetensors")["scores"]
    assert plain.abs().max() > 0 and own.abs().max() == 0
    assert not torch.allclose(other, plain)
    summary = json.loads((tmp_path / "other" / "influence-kfac.json").read_text())
    assert summary["contrast_response"] == "I cannot answer."


def test_attribute_aggregate_first(tmp_path, tiny_tokenizer):
    """``--aggregate-first`` scores the normalised mean as one query: with one IQ it is that IQ's scores times a
    positive weight (alone and with a contrast response), the ranking file holds only the aggregate, and
    ``lancet correct`` reads it like any other."""
    from lancet.artifacts import load_tensors
    from lancet.correct import load_run_scores

    model_dir, train, queries = _sums_run(tmp_path, tiny_tokenizer)
    base = ["-q", "attribute", str(model_dir), "--train", str(train), "--queries", str(queries), "--method", "kfac"]
    for name, extra in (("plain", []), ("contrast", ["--contrast-response", "I cannot answer."])):
        assert main([*base, "--out", str(tmp_path / name), *extra]) == 0
        assert main([*base, "--out", str(tmp_path / f"{name}-first"), "--aggregate-first", *extra]) == 0
        per_query = load_tensors(tmp_path / name / "ranking-kfac.safetensors")["scores"][0].double()
        first = load_tensors(tmp_path / f"{name}-first" / "ranking-kfac.safetensors")
        assert set(first) == {"aggregate_normalized_mean"}
        agg = first["aggregate_normalized_mean"].double()
        cosine = float(agg @ per_query / (agg.norm() * per_query.norm()))
        assert cosine > 1 - 1e-6, (name, cosine)
        summary = json.loads((tmp_path / f"{name}-first" / "influence-kfac.json").read_text())
        assert summary["aggregate_first"] is True and summary["n_queries"] == 1
        ids = summary["ids"]
        scores, method = load_run_scores(tmp_path / f"{name}-first", ids)
        assert method == "kfac" and scores.shape == (8,)
    assert main([*base, "--out", str(tmp_path / "x"), "--method", "bm25", "--aggregate-first"]) == 2
    assert main([*base, "--out", str(tmp_path / "x"), "--method", "kfac,identity", "--aggregate-first"]) == 2


def test_attribute_several_methods_share_one_pass(tmp_path, tiny_tokenizer, capsys):
    """``--method linfac,identity,bm25`` writes each method's files, with the scores a run of that method alone
    gives, and prints each summary."""
    from lancet.artifacts import load_tensors

    model_dir, train, queries = _sums_run(tmp_path, tiny_tokenizer)
    base = ["-q", "attribute", str(model_dir), "--train", str(train), "--queries", str(queries), "--fisher",
            "empirical"]
    assert main([*base, "--out", str(tmp_path / "joint"), "--method", "linfac,identity,bm25,linfac"]) == 0
    out = capsys.readouterr().out
    assert out.count("training rows x 1 queries") == 3
    for method in ("linfac", "identity", "bm25"):
        assert main([*base, "--out", str(tmp_path / method), "--method", method]) == 0
        joint = load_tensors(tmp_path / "joint" / f"ranking-{method}.safetensors")["scores"]
        alone = load_tensors(tmp_path / method / f"ranking-{method}.safetensors")["scores"]
        torch.testing.assert_close(joint, alone, rtol=1e-4, atol=1e-6 * float(alone.abs().max()))
        summary = json.loads((tmp_path / "joint" / f"influence-{method}.json").read_text())
        assert summary["method"] == method and summary["shared_pass"] == ["linfac", "identity", "bm25"]
    assert main([*base, "--out", str(tmp_path / "x"), "--method", "linfac,kfac", "--contrast-response", "No."]) == 2
    assert main([*base, "--out", str(tmp_path / "x"), "--method", ","]) == 2


def test_attribute_repsim_and_cosine(tmp_path, tiny_tokenizer):
    """The similarity baselines from the CLI: repsim ranks the IQ's own training row first (the same text has the
    same representation), both write the usual files, and neither takes a contrast response."""
    from lancet.artifacts import load_tensors

    model_dir, train, queries = _sums_run(tmp_path, tiny_tokenizer)
    base = ["-q", "attribute", str(model_dir), "--train", str(train), "--queries", str(queries)]
    assert main([*base, "--out", str(tmp_path / "r"), "--method", "repsim,cosine"]) == 0
    repsim = load_tensors(tmp_path / "r" / "ranking-repsim.safetensors")["scores"]
    cosine = load_tensors(tmp_path / "r" / "ranking-cosine.safetensors")["scores"]
    assert int(repsim.argmax()) == 2 and abs(float(repsim.max()) - 1.0) < 1e-5  # "What is 2 and 3?" is row 2
    assert int(cosine.argmax()) == 2 and abs(float(cosine.max()) - 1.0) < 1e-4
    assert cosine.abs().max() <= 1 + 1e-5
    assert main([*base, "--out", str(tmp_path / "x"), "--method", "repsim", "--contrast-response", "No."]) == 2


def test_attribute_measurement_option(tmp_path, tiny_tokenizer):
    """``--measurement first_tokens:K`` scores what the Python API scores, and a bad spec is a one-line error."""
    from lancet.artifacts import load_tensors
    from lancet.data import encode_records, read_records
    from lancet.influence import pairwise_scores
    from lancet.models.loading import load_model

    model_dir, train, queries = _sums_run(tmp_path, tiny_tokenizer)
    base = ["-q", "attribute", str(model_dir), "--train", str(train), "--queries", str(queries), "--method",
            "identity"]
    assert main([*base, "--out", str(tmp_path / "r"), "--measurement", "first_tokens:2"]) == 0
    got = load_tensors(tmp_path / "r" / "ranking-identity.safetensors")["scores"]
    model, tok = load_model(str(model_dir))
    rows = [encode_records(read_records(p), tok, 512, progress=False) for p in (train, queries)]
    expected = pairwise_scores(model, rows[0], rows[1], method="identity", measurement="first_tokens:2",
                               progress=False)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(expected, pairwise_scores(model, rows[0], rows[1], method="identity", progress=False))
    assert main([*base, "--out", str(tmp_path / "x"), "--measurement", "first_tokens:0"]) == 2


def test_attribute_without_a_method_ranks_with_the_default_or_linfac_for_a_gradient_option(tmp_path, tiny_tokenizer):
    model_dir, train, queries = _sums_run(tmp_path, tiny_tokenizer)
    base = ["-q", "attribute", str(model_dir), "--train", str(train), "--queries", str(queries)]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert [p.name for p in (tmp_path / "plain").glob("influence-*.json")] == ["influence-repsim.json"]
    assert main([*base, "--out", str(tmp_path / "m"), "--measurement", "first_tokens:2"]) == 0
    assert [p.name for p in (tmp_path / "m").glob("influence-*.json")] == ["influence-linfac.json"]


def test_index_then_attribute_from_the_index(tmp_path, tiny_tokenizer, capsys):
    """``lancet index`` at full rank (float32 storage), then ``attribute --index``: the same ranking as an ordinary
    ``attribute`` run without a pass over the rows; a second ``index`` run reuses every shard; a stale index (other
    rows) is refused with one line."""
    from lancet.artifacts import load_tensors

    model_dir, train, queries = _sums_run(tmp_path, tiny_tokenizer)
    build = ["-q", "index", str(model_dir), "--train", str(train), "--out", str(tmp_path / "idx"), "--method", "ekfac",
             "--rank", "64", "--dtype", "float32", "--shard-rows", "3"]
    assert main(build) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["rows"] == 8 and first["shards"] == 3
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "idx").glob("shard-*")}
    assert main(build) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "idx").glob("shard-*")} == mtimes
    base = ["-q", "attribute", str(model_dir), "--train", str(train), "--queries", str(queries), "--method", "ekfac"]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert main([*base, "--out", str(tmp_path / "from-index"), "--index", str(tmp_path / "idx")]) == 0
    plain = load_tensors(tmp_path / "plain" / "ranking-ekfac.safetensors")["scores"].double()
    indexed = load_tensors(tmp_path / "from-index" / "ranking-ekfac.safetensors")["scores"].double()
    torch.testing.assert_close(indexed, plain, rtol=1e-4, atol=1e-6 * float(plain.abs().max()))
    assert json.loads((tmp_path / "from-index" / "influence-ekfac.json").read_text())["index"] == str(tmp_path / "idx")
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"prompt": f"What is {i}?", "response": "A number."}) + "\n"
                             for i in range(8)))
    capsys.readouterr()
    assert main([*base[:3], "--train", str(other), "--queries", str(queries), "--method", "ekfac",
                 "--out", str(tmp_path / "x"), "--index", str(tmp_path / "idx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differ from the indexed" in err[0]
    assert main([*base, "--out", str(tmp_path / "y"), "--index", str(tmp_path / "idx"), "--method", "kfac"]) == 2
    # without --method, the index's own curvature
    assert main([*base[:-2], "--out", str(tmp_path / "z"), "--index", str(tmp_path / "idx")]) == 0
    assert (tmp_path / "z" / "influence-ekfac.json").is_file()


@pytest.mark.parametrize("flags_after", [False, True])
def test_global_flags_before_or_after_the_verb(flags_after):
    """-q, --debug and --trust-remote-code are taken before the verb and after it (and after a data action)."""
    flags = ["-q", "--debug", "--trust-remote-code"]
    verb = ["finetune", "m", "--train", "t.jsonl", "--out", "o"]
    ns = build_parser().parse_args(verb + flags if flags_after else flags + verb)
    assert ns.quiet and ns.debug and ns.trust_remote_code
    ns = build_parser().parse_args(["data", "check", "t.jsonl", "--quiet"] if flags_after
                                   else ["--quiet", "data", "check", "t.jsonl"])
    assert ns.quiet and not ns.debug and not ns.trust_remote_code


def test_global_flags_given_before_the_verb_are_not_reset_by_it():
    ns = build_parser().parse_args(["-q", "--trust-remote-code", "report", "run", "--debug"])
    assert ns.quiet and ns.debug and ns.trust_remote_code
    ns = build_parser().parse_args(["report", "run"])
    assert not (ns.quiet or ns.debug or ns.trust_remote_code)


def test_flags_after_the_verb_take_effect(tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"response": "x"}) + "\n")
    argv = ["finetune", "m", "--train", str(data), "--out", str(tmp_path / "o")]
    assert main([*argv, "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rows.jsonl:1" in err and "unrecognized arguments" not in err
    from lancet.errors import DataError

    with pytest.raises(DataError, match="rows.jsonl:1"):  # --debug after the verb: the exception, not one line
        main([*argv, "--debug"])


@pytest.fixture()
def tiny_model_dir(tmp_path, tiny_tokenizer):
    from conftest import tiny_llama

    model_dir = tmp_path / "m"
    tiny_llama(len(tiny_tokenizer)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    return model_dir


def _finetune(model_dir, train, out, *extra):
    return main(["-q", "finetune", str(model_dir), "--train", str(train), "--out", str(out), "--max-steps", "1",
                 "--batch-size", "2", "--device", "cpu", *extra])


def test_finetune_refuses_rows_without_a_response(tmp_path, tiny_model_dir, capsys):
    """Prompt-only rows train on nothing: one line naming the file (every row) or the first such row's file:line,
    as the correction's rows do; no model is written and nothing reports success."""
    train, out = tmp_path / "train.jsonl", tmp_path / "out"
    train.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": "ho"}) + "\n")
    assert _finetune(tiny_model_dir, train, out) == 2
    captured = capsys.readouterr()
    assert captured.err == (f"lancet: error: {train}: none of the 2 training rows has response tokens (prompt-only "
                            "rows: give each a 'response', or end its 'messages' with an assistant turn); nothing "
                            "to train on\n")
    assert "model saved" not in captured.out and not (out / "lancet_done.json").exists()

    train.write_text("".join(json.dumps(r) + "\n" for r in [{"prompt": "a", "response": "b"}, {"prompt": "hi"},
                                                           {"prompt": "c", "response": "d"}, {"prompt": "ho"}]))
    assert _finetune(tiny_model_dir, train, out) == 2
    captured = capsys.readouterr()
    assert captured.err == (f"lancet: error: {train}:2: training row has no response tokens (prompt-only); 1 more "
                            "of the 4 rows too\n")
    assert "model saved" not in captured.out and not (out / "lancet_done.json").exists()


def test_finetune_refuses_a_response_truncated_away(tmp_path, tiny_model_dir, tiny_tokenizer, capsys):
    from lancet.data import Record, encode_prompt

    rows = [{"prompt": "a", "response": "b"}, {"prompt": "a much longer prompt " * 3, "response": "cut"}]
    cut = len(encode_prompt(Record(prompt=rows[1]["prompt"]), tiny_tokenizer))  # the prompt fills max_length
    assert len(encode_prompt(Record(prompt="a"), tiny_tokenizer)) < cut - 1
    train, out = tmp_path / "train.jsonl", tmp_path / "out"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _finetune(tiny_model_dir, train, out, "--max-length", str(cut)) == 2
    err = capsys.readouterr().err
    assert err.endswith(f"{train}:2: training row has no response tokens (its response is cut off by "
                        f"max_length={cut} tokens)\n") and err.count("\n") == 1
    assert _finetune(tiny_model_dir, train, out, "--max-length", str(cut + 2)) == 0  # one response token left
    assert "model saved" in capsys.readouterr().out and (out / "lancet_done.json").is_file()
