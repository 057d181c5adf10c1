"""The ``lancet`` command line. Errors caused by input print one line and exit 2 (traceback only with --debug)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from lancet.constants import (
    CORRECTION_ALIASES,
    CORRECTION_METHODS,
    DEFAULT_MAX_LENGTH,
    DEFAULT_METHOD,
    DEFAULT_MODEL,
    PAIR_WEIGHTINGS,
    PAIRINGS,
    PREFERRED_ROWS,
    RANKINGS,
)
from lancet.errors import LancetError

PIPELINE = """pipeline: data -> finetune -> attribute (influence) -> correct (IBO) -> evaluate -> report.
`lancet demo` runs it end to end on the embedded SmolLM2-135M-Instruct and a dataset lancet writes itself."""


def _add_train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=5e-5)
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of all weights")
    g.add_argument("--lora-r", type=int, default=16)
    g.add_argument("--merge-lora", action="store_true", help="save merged full weights instead of the adapter")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--save-every", type=int, default=50, help="checkpoint every N optimizer steps (resume point)")
    g.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="tokens per row; longer rows are cut")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard weights, gradients and optimizer state (FSDP2) instead of DDP")


def _add_hardware_options(p: argparse.ArgumentParser, precision: str = "fp32") -> None:
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    g.add_argument("--precision", default=precision, choices=["auto", "fp32", "bf16"],
                   help="bf16 autocast (weights stay fp32) or fp32; auto: bf16 on CUDA and on CPUs with native bf16, "
                   f"fp32 elsewhere (default: {precision})")
    g.add_argument("--bf16", dest="precision", action="store_const", const="bf16", help="= --precision bf16")


def _hardware(ns: argparse.Namespace):
    """(device, Precision) of this command, decided once and logged (lancet.hardware)."""
    from lancet.hardware import decide

    return decide(ns.device, ns.precision)


def _train_args(ns: argparse.Namespace, out: str):
    from lancet.train import TrainArgs

    device, precision = _hardware(ns)
    return TrainArgs(
        output_dir=out,
        epochs=ns.epochs,
        max_steps=ns.max_steps,
        batch_size=ns.batch_size,
        grad_accum=ns.grad_accum,
        lr=ns.lr,
        warmup_steps=ns.warmup_steps,
        lora=ns.lora,
        lora_r=ns.lora_r,
        lora_alpha=2 * ns.lora_r,
        merge_lora=ns.merge_lora,
        bf16=precision.bf16,
        device=str(device),
        seed=ns.seed,
        save_every=ns.save_every,
        progress=not ns.quiet,
        fsdp=ns.fsdp,
    )


def _add_global_options(p: argparse.ArgumentParser, default: bool | str = False) -> None:
    g = p.add_argument_group("global options (before or after the command)")
    g.add_argument("--debug", action="store_true", default=default, help="show tracebacks")
    g.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="no progress bars, warnings only (for logs)")
    g.add_argument("--trust-remote-code", action="store_true", default=default,
                   help="allow model repos to run their own code")


class _CommandParser(argparse.ArgumentParser):
    """The parser of a command (and of a command's actions: ``data check``): takes the global options too, so that
    ``lancet finetune ... -q`` works as ``lancet -q finetune ...`` does. Their default is SUPPRESS: a command that
    does not repeat a flag leaves the value given before the command (or its False default) as it is."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _add_global_options(self, default=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lancet", description=__doc__, epilog=PIPELINE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_global_options(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser)

    p = sub.add_parser("finetune", help="supervised fine-tuning (full or LoRA) with checkpoint/resume")
    p.add_argument("model", help=f"HF id or dir, .gguf file, PEFT adapter dir, or '{DEFAULT_MODEL}'")
    p.add_argument("--train", required=True, help="training data (jsonl/json/csv/parquet/HF dataset dir)")
    p.add_argument("--out", required=True, help="output directory (HF model, safetensors)")
    p.add_argument("--keep-checkpoints", type=int, default=None, metavar="K",
                   help="also keep K models evenly spaced over training in OUT/checkpoints/step-S (each loadable, with "
                   "Adam's second moment) for `lancet attribute --checkpoints OUT`")
    _add_train_options(p)
    _add_hardware_options(p)

    p = sub.add_parser("attribute", help="rank training rows by influence on the influence queries (IQs)")
    p.add_argument("model")
    p.add_argument("--train", required=True)
    p.add_argument("--queries", required=True, help="IQs: prompt + undesirable response rows")
    p.add_argument("--method", default=None, help=f"default {DEFAULT_METHOD} (what won the contamination suite's "
                   "validation seeds: docs/method.md 5.6), or the index's with --index, or linfac with an option "
                   "only gradients have (--measurement, --contrast-response, --aggregate-first, --checkpoints); "
                   "linfac, ekfac, kfac, kfac_reduce, diagonal, identity, cosine, repsim, repsim_anchored (needs "
                   "--anchors), bm25, probe (needs --counter); several, comma-separated, share one scoring pass")
    p.add_argument("--out", required=True, help="run directory (curvature and scores are stored and reused)")
    p.add_argument("--damping", type=float, default=None, help="default: 0.1 x mean eigenvalue per layer")
    p.add_argument("--fisher", default="sampled", choices=["sampled", "empirical"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--query-rank", type=int, default=None, help="low-rank preconditioned query gradients")
    p.add_argument("--chunk-rows", type=int, default=None, help="rows per saved chunk (the resume granularity)")
    p.add_argument("--covariance-max-rows", type=int, default=None, metavar="N",
                   help="fit the covariance pass on a seeded subset of N rows (every row is still scored)")
    p.add_argument("--lambda-max-rows", type=int, default=None, metavar="N",
                   help="fit the eigenvalue correction (linfac, ekfac) on a seeded subset of N rows")
    _add_hardware_options(p)
    p.add_argument("--modules", default="blocks", help="'blocks', 'blocks+lm_head' or a regex over module names")
    p.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--labels", default=None, help="JSON with 'culprit_ids' to score recall (e.g. the demo's)")
    p.add_argument("--measurement", default="answer", metavar="M",
                   help="what each IQ's gradient differentiates: 'answer' (summed cross-entropy of the answer), "
                   "'first_tokens:K' (its first K tokens: whether the model complies is decided there) or 'spans' "
                   "(the tokens in each IQ's meta.behaviour_spans, which IQs taken with a rules: judge carry) or "
                   "'behaviour' (minus the IQs' activation along the direction IQs - --counter rows at --layer, "
                   "scored as one query: docs/method.md 2.10)")
    p.add_argument("--counter", default=None, metavar="FILE",
                   help="counter-answer rows (the model's own refusals or current answers, rows marked good): the "
                   "behaviour direction is mean(IQs) - mean(these) at --layer (for --measurement behaviour and "
                   "--method probe)")
    p.add_argument("--layer", type=int, default=None, metavar="L",
                   help="decoder block whose output holds the behaviour direction (negative: from the end; default: "
                   "the middle block)")
    p.add_argument("--position", default="response", choices=["response", "last_prompt"],
                   help="a row's activation: the mean over its response tokens, or its last prompt token")
    p.add_argument("--contrast-response", default=None, metavar="TEXT",
                   help="rank by influence on log p(IQ answer) - log p(TEXT), e.g. a generic refusal")
    p.add_argument("--aggregate-first", action="store_true",
                   help="score the normalised mean over all IQs as one full-rank query (its weights estimated on 32 "
                   "rows): the cost of one IQ however many there are; no per-IQ scores (docs/method.md 2.5)")

    p.add_argument("--index", default=None, metavar="DIR",
                   help="score the IQs from a gradient index built by `lancet index` (no pass over the training "
                   "rows; --method must be the index's)")
    p.add_argument("--anchors", default=None, metavar="FILE", help="repsim_anchored's anchor rows (e.g. the model's "
                   "own answers to ordinary prompts): each IQ's RepSim minus theirs (docs/method.md 2.12)")
    p.add_argument("--checkpoints", default=None, metavar="DIRS",
                   help="average the scores over checkpoints (TracIn): `lancet finetune --keep-checkpoints K`'s --out, "
                   "or kept directories, comma-separated; MODEL gives the tokenizer; rankings <method>_ckpt (2.11)")
    p.add_argument("--checkpoint-weights", default="lr_sum", choices=["lr_sum", "lr", "uniform"],
                   help="a checkpoint's weight: the learning rates of the steps it stands for, summed; its own; equal")
    p.add_argument("--adam", action="store_true", help="with --checkpoints: every gradient divided by the "
                   "checkpoint's Adam sqrt(v_hat) + eps (identity, cosine); rankings <method>_adam_ckpt")

    p = sub.add_parser("index", help="store every training row's projected gradient once, so that new IQs are "
                       "answered from it in seconds (`lancet attribute --index`)")
    p.add_argument("model")
    p.add_argument("--train", required=True)
    p.add_argument("--out", required=True, help="index directory (resumed after a kill; rerun with more rows to "
                   "append them)")
    p.add_argument("--method", default="linfac", help="the curvature: linfac, ekfac, kfac, kfac_reduce, diagonal, "
                   "identity, cosine (eigen projection: a Kronecker method)")
    p.add_argument("--rank", type=int, default=16, help="r: each layer's gradient is kept as r x r")
    p.add_argument("--projection", default="eigen", choices=["eigen", "random"])
    p.add_argument("--rank-by", default="factor", choices=["factor", "corrected"],
                   help="eigen: keep the directions with the largest factor eigenvalues, or corrected-eigenvalue "
                   "marginals (ekfac, linfac)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--shard-rows", type=int, default=256, help="rows per shard (the resume granularity)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--covariance-max-rows", type=int, default=None, metavar="N")
    p.add_argument("--lambda-max-rows", type=int, default=None, metavar="N")
    p.add_argument("--modules", default="blocks")
    p.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH)
    _add_hardware_options(p)

    p = sub.add_parser("correct", help="post-train with IBO (or a baseline) from influence scores")
    p.add_argument("model", help="the model to correct (the contaminated one the scores were computed on)")
    p.add_argument("--train", required=True, help="the training data given to `lancet attribute`")
    p.add_argument("--scores", required=True, help="run directory written by `lancet attribute`")
    p.add_argument("--scores-method", default=None, help="which ranking-<method> to use when the run has several")
    p.add_argument("--method", default="ibo", choices=CORRECTION_METHODS + CORRECTION_ALIASES,
                   help="ibo_random and ibo_oracle are ibo with --ranking random --preferred random --weighting "
                   "uniform, and with --ranking oracle")
    p.add_argument("--out", required=True, help="output directory (HF model, train_log.jsonl)")
    p.add_argument("--iqs", default=None, help="IQs (prompt + undesirable answer): dispreferred / forgotten too")
    p.add_argument("--no-iqs", action="store_true", help="do not add the IQs to the dispreferred / forget rows")
    p.add_argument("--safe", default=None, help="safe rows: the data of sft, the retain rows of ga_retain / npo")
    p.add_argument("--pairs", default=None, help="dpo pairs: HH-RLHF file or prompt/chosen/rejected rows")
    p.add_argument("--labels", default=None, help="JSON with 'culprit_ids' (needed by --ranking oracle)")
    p.add_argument("--preferred-ids", default=None, help="JSON with 'ids': the rows --preferred marked prefers")
    p.add_argument("--row-judge", default=None, help="a judge (rules:FILE, marker:PHRASE, ...) run over the training "
                   "answers: dispreferred rows are taken among those it flags, preferred among the others (a judge "
                   "that reads the behaviour whatever the prompt; not the refusal matcher)")
    g = p.add_argument_group("correction")
    g.add_argument("--ranking", default=None, choices=RANKINGS,
                   help="dispreferred rows: the top of the scores (influence), random rows, or the true culprits")
    g.add_argument("--preferred", default=None, choices=PREFERRED_ROWS,
                   help="ibo's preferred rows: the bottom of the scores, random rows, --preferred-ids' rows, or "
                   "near (with --row-judge: the top of the rows the judge passes)")
    g.add_argument("--weighting", default=None, choices=PAIR_WEIGHTINGS,
                   help="ibo's pair weights: the score gap, or uniform")
    g.add_argument("--beta", type=float, default=0.1, help="IBO/DPO/NPO inverse temperature")
    g.add_argument("--generator", default="logistic", choices=["logistic", "squared", "basu"],
                   help="Bregman generator of IBO (logistic = KL, DPO-like)")
    g.add_argument("--alpha", type=float, default=0.5, help="Basu power (basu generator)")
    g.add_argument("--top-k", type=int, default=50, help="rows taken from each end of the influence ranking")
    g.add_argument("--pairing", default="rank", choices=PAIRINGS)
    g.add_argument("--max-pairs", type=int, default=None, help="cap on the IBO pairs (seeded subsample)")
    g.add_argument("--target-temperature", type=float, default=0.0, help="0: hard targets p*=1; T>0: sigma(gap/T)")
    g.add_argument("--retain-weight", type=float, default=1.0,
                   help="weight of the retain term: ga_retain, npo with --safe, ibo and dpo with --retain")
    g.add_argument("--retain", default="none", choices=["none", "nll", "kl"],
                   help="ibo: keep the rows the ranking calls uninvolved (or --retain-data's rows; dpo and npo: "
                   "those only) as they were (their NLL, or the KL from the model's own next-token distributions)")
    g.add_argument("--retain-rows", type=int, default=None, help="ibo: how many uninvolved rows (default --top-k)")
    g.add_argument("--retain-normalize", default="tokens", choices=["tokens", "rows"],
                   help="ibo, dpo: the retain term's mean over tokens, or its per-row sum averaged over rows (a "
                   "sequence-level KL, where an answer's opening weighs fully)")
    g.add_argument("--retain-data", default=None,
                   help="ibo, dpo or npo with --retain: these rows instead of the uninvolved training rows (e.g. "
                   "the model's own answers to ordinary prompts; npo: instead of --safe's NLL)")
    g.add_argument("--chosen-nll-weight", type=float, default=0.0,
                   help="ibo, dpo: add this x the preferred rows' mean token NLL (RPO), so pairs cannot part by both "
                   "falling")
    g.add_argument("--no-same-prompt", action="store_true",
                   help="ibo: never pair a dispreferred row with another answer to its own prompt")
    _add_train_options(p)
    _add_hardware_options(p)
    p.set_defaults(max_steps=100)

    p = sub.add_parser("evaluate", help="harm, utility and over-refusal metrics with judge accuracy")
    p.add_argument("model")
    p.add_argument("--suite", default="small", help="'small', 'default' or a suite JSON file")
    p.add_argument("--out", required=True, help="metrics JSON file")
    p.add_argument("--shared", default=None, help="data directory for {shared} in suite paths (default ../shared/data)")
    _add_hardware_options(p)

    p = sub.add_parser("report", help="write report.html and report.json for a run directory")
    p.add_argument("run_dir")

    p = sub.add_parser("demo", help="the pipeline on the embedded model and the built-in demo dataset")
    p.add_argument("--out", default="demo_out", help="run directory (reused: finished stages are skipped)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: the demo's preset)")
    p.add_argument("--seed", type=int, default=0, help="the fine-tune's seed (its data order; the data do not change)")
    _add_hardware_options(p, precision="auto")

    p = sub.add_parser("run", help="the whole pipeline from a JSON config (model, data, IQs, options)")
    p.add_argument("config", help="run config JSON (keys: see lancet.pipeline.RunConfig; the demo writes one)")
    p.add_argument("--out", default=None, help="run directory (default: the config's 'out')")
    p.add_argument("--device", default=None, help="overrides the config's 'device' (auto, cpu, cuda, cuda:N)")
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16"],
                   help="overrides the config's 'precision'")

    p = sub.add_parser("data", help="inspect data files and write the demo dataset")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    d = dsub.add_parser("check", help="validate a data file: rows, token lengths, truncation")
    d.add_argument("file")
    d.add_argument("--model", default=DEFAULT_MODEL, help="whose tokenizer to count tokens with")
    d.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH)
    d = dsub.add_parser("demo", help="write the built-in demo dataset (train, IQs, held-out sets, culprit labels)")
    d.add_argument("out")
    d.add_argument("--seed", type=int, default=0)
    return parser


def cmd_finetune(ns: argparse.Namespace) -> int:
    from lancet.data import load_dataset_spec
    from lancet.finetune import finetune

    out = finetune(
        ns.model,
        load_dataset_spec(ns.train),  # the same data specs as every other verb (FORMAT:PATH, hh-rlhf:PATH, ...)
        _train_args(ns, ns.out),
        max_length=ns.max_length,
        trust_remote_code=ns.trust_remote_code,
        keep_checkpoints=ns.keep_checkpoints,
    )
    print(f"model saved to {out}")
    return 0


def cmd_data(ns: argparse.Namespace) -> int:
    if ns.data_command == "demo":
        from lancet.data.demo import write_demo_dataset

        for name, path in write_demo_dataset(ns.out, seed=ns.seed).items():
            print(f"{name}: {path}")
        return 0
    from lancet.data import encode_records, length_stats, load_dataset_spec
    from lancet.models.loading import load_tokenizer

    records = load_dataset_spec(ns.file)
    tokenizer = load_tokenizer(ns.model, trust_remote_code=ns.trust_remote_code)
    stats = length_stats(encode_records(records, tokenizer, ns.max_length, progress=not ns.quiet))
    print(json.dumps({"file": ns.file, "rows": len(records), "max_length": ns.max_length, **stats}, indent=2))
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from lancet.demo import run_demo

    run_demo(Path(ns.out), model_spec=ns.model, steps=ns.steps, progress=not ns.quiet, device=ns.device,
             precision=ns.precision, seed=ns.seed)
    return 0


def cmd_run(ns: argparse.Namespace) -> int:
    from lancet.pipeline import run_config

    summary = run_config(ns.config, progress=not ns.quiet, out=ns.out, device=ns.device, precision=ns.precision)
    print(json.dumps({k: summary[k] for k in ("corrected_model", "n_iqs", "metrics", "seconds")}, indent=2))
    print(f"report written to {summary['report']}")
    return 0


def _default_attribute_method(ns: argparse.Namespace) -> str:
    """``lancet attribute`` without --method: the index's curvature with --index, else ``default_method``."""
    from lancet.influence.arguments import default_method

    if ns.index is not None:
        from lancet.influence.index import read_meta

        return read_meta(ns.index)["curvature"]
    return default_method(ns.measurement, ns.contrast_response is not None or ns.aggregate_first
                          or ns.checkpoints is not None or ns.adam)


def cmd_attribute(ns: argparse.Namespace) -> int:
    from lancet.influence import InfluenceArgs
    from lancet.influence.attribute import attribute, attribute_methods, print_summary
    from lancet.influence.memory import estimate_memory
    from lancet.models.loading import load_model

    if ns.method is None:
        ns.method = _default_attribute_method(ns)
    methods = list(dict.fromkeys(m.strip() for m in ns.method.split(",") if m.strip()))
    if not methods:
        raise LancetError(f"--method {ns.method!r}: name at least one method")
    chunk = {"chunk_rows": ns.chunk_rows} if ns.chunk_rows is not None else {}
    device, precision = _hardware(ns)
    every = [InfluenceArgs(method=m, damping=ns.damping, fisher=ns.fisher, batch_size=ns.batch_size,
                           query_rank=ns.query_rank, bf16=precision.bf16, modules=ns.modules, progress=not ns.quiet,
                           measurement=ns.measurement, covariance_max_rows=ns.covariance_max_rows,
                           lambda_max_rows=ns.lambda_max_rows, **chunk)
             for m in methods]  # each method's options are validated before the model is loaded
    if len(methods) > 1 and (ns.contrast_response is not None or ns.aggregate_first or ns.index):
        raise LancetError("--contrast-response, --aggregate-first and --index take one --method")
    anchors = _anchor_records(ns, methods)
    if ns.checkpoints is not None or ns.adam:
        return _attribute_checkpoints(ns, every, methods, device, anchors)
    behaviour = _behaviour_args(ns, methods)
    model, tokenizer = load_model(ns.model, trust_remote_code=ns.trust_remote_code, device=device)
    for args in every:
        logging.getLogger("lancet").info(estimate_memory(model, args).describe())
    if len(methods) == 1:
        summaries = [attribute(model, tokenizer, ns.train, ns.queries, ns.out, every[0], max_length=ns.max_length,
                               labels=ns.labels, k=ns.top_k, contrast_response=ns.contrast_response,
                               aggregate_first=ns.aggregate_first, index=ns.index, behaviour=behaviour,
                               anchors=anchors)]
    else:
        summaries = list(attribute_methods(model, tokenizer, ns.train, ns.queries, ns.out, every[0], methods,
                                           max_length=ns.max_length, labels=ns.labels, k=ns.top_k,
                                           behaviour=behaviour, anchors=anchors).values())
    for summary in summaries:
        print_summary(summary)
    return 0


def _behaviour_args(ns: argparse.Namespace, methods: list[str]):
    """--counter/--layer/--position as ``BehaviourArgs`` when the measurement or a method uses them; refused when
    given for nothing (a direction that changes no score would be a silent typo)."""
    from lancet.curvature.estimators import BEHAVIOUR_METHODS
    from lancet.influence.behaviour import BehaviourArgs

    needed = ns.measurement == "behaviour" or any(m in BEHAVIOUR_METHODS for m in methods)
    if not needed:
        if ns.counter is not None or ns.layer is not None or ns.position != "response":
            raise LancetError("--counter, --layer and --position are for --measurement behaviour and --method probe")
        return None
    if ns.counter is None:
        raise LancetError("--measurement behaviour and --method probe need --counter FILE (counter-answer rows: the "
                          "model's own refusals or current answers, or rows marked good)")
    return BehaviourArgs(counter=ns.counter, layer=ns.layer, position=ns.position)


def _anchor_records(ns: argparse.Namespace, methods: list[str]):
    """--anchors' Records for repsim_anchored; either one without the other is refused before the model loads."""
    wanted = "repsim_anchored" in methods
    if ns.anchors is None:
        if wanted:
            raise LancetError("--method repsim_anchored needs --anchors FILE (e.g. the model's own answers to ordinary "
                              "prompts)")
        return None
    if not wanted:
        raise LancetError("--anchors is for --method repsim_anchored")
    from lancet.data import load_dataset_spec

    return load_dataset_spec(ns.anchors)


def _attribute_checkpoints(ns: argparse.Namespace, every, methods: list[str], device, anchors) -> int:
    """`lancet attribute --checkpoints`: each method's scores averaged over the checkpoints
    (lancet.influence.checkpoints.attribute_checkpoints)."""
    from lancet.influence.attribute import print_summary
    from lancet.influence.checkpoints import attribute_checkpoints
    from lancet.models.loading import load_tokenizer

    if ns.checkpoints is None:
        raise LancetError("--adam needs --checkpoints (the Adam state is kept with each checkpoint)")
    if ns.contrast_response is not None or ns.aggregate_first or ns.index or "probe" in methods:
        raise LancetError("--checkpoints takes neither --contrast-response, --aggregate-first, --index nor probe yet")
    behaviour = _behaviour_args(ns, methods)  # the behaviour measurement: a direction fitted at each checkpoint
    tokenizer = load_tokenizer(ns.model, trust_remote_code=ns.trust_remote_code)
    summaries = attribute_checkpoints(tokenizer, ns.train, ns.queries, ns.out, every[0], methods, ns.checkpoints,
                                      weights=ns.checkpoint_weights, adam=ns.adam, device=device,
                                      max_length=ns.max_length, labels=ns.labels, k=ns.top_k, anchors=anchors,
                                      behaviour=behaviour)
    for summary in summaries.values():
        print_summary(summary)
    return 0


def cmd_index(ns: argparse.Namespace) -> int:
    import time

    from lancet.data import encode_records, load_dataset_spec
    from lancet.influence import IndexArgs, Influence, InfluenceArgs
    from lancet.influence.index import bytes_per_row, load_projections
    from lancet.models.loading import load_model

    device, precision = _hardware(ns)
    args = InfluenceArgs(method=ns.method, batch_size=ns.batch_size, bf16=precision.bf16, modules=ns.modules,
                         covariance_max_rows=ns.covariance_max_rows, lambda_max_rows=ns.lambda_max_rows,
                         progress=not ns.quiet)
    index_args = IndexArgs(rank=ns.rank, projection=ns.projection, rank_by=ns.rank_by, dtype=ns.dtype,
                           shard_rows=ns.shard_rows, batch_size=ns.batch_size, bf16=precision.bf16,
                           progress=not ns.quiet)  # both validated before the model is loaded
    model, tokenizer = load_model(ns.model, trust_remote_code=ns.trust_remote_code, device=device)
    train = encode_records(load_dataset_spec(ns.train), tokenizer, ns.max_length, progress=not ns.quiet)
    t0 = time.perf_counter()
    meta = Influence(model, args, out_dir=ns.out).build_index(train, ns.out, index_args)
    per_row = bytes_per_row(meta, load_projections(ns.out))
    print(json.dumps({"index": ns.out, "rows": meta["n_rows"], "shards": len(meta["shards"]),
                      "bytes_per_row": per_row, "mib": round(per_row * meta["n_rows"] / 2**20, 2),
                      "seconds": round(time.perf_counter() - t0, 1)}, indent=2))
    return 0


def cmd_correct(ns: argparse.Namespace) -> int:
    from lancet.correct import Correction, CorrectionArgs, CorrectionData, check_inputs, load_run_scores
    from lancet.data import load_dataset_spec
    from lancet.models.loading import load_model

    options = {"ranking": ns.ranking, "preferred": ns.preferred, "weighting": ns.weighting}
    cargs = CorrectionArgs(method=ns.method, beta=ns.beta, generator=ns.generator, alpha=ns.alpha, top_k=ns.top_k,
                           pairing=ns.pairing, target_temperature=ns.target_temperature, include_iqs=not ns.no_iqs,
                           retain_weight=ns.retain_weight, max_pairs=ns.max_pairs, seed=ns.seed, retain=ns.retain,
                           retain_rows=ns.retain_rows, retain_normalize=ns.retain_normalize,
                           chosen_nll_weight=ns.chosen_nll_weight, same_prompt=not ns.no_same_prompt,
                           judged_rows=ns.row_judge is not None, **{k: v for k, v in options.items() if v is not None})
    train = load_dataset_spec(ns.train)
    ids = [r.id for r in train]
    scores, scores_method = load_run_scores(ns.scores, ids, ns.scores_method)
    from lancet.influence.attribute import read_culprit_labels

    data = CorrectionData(
        train=train, scores=scores,
        iqs=load_dataset_spec(ns.iqs) if ns.iqs else (),
        safe=load_dataset_spec(ns.safe) if ns.safe else (),
        culprit_mask=read_culprit_labels(ns.labels, ids) if ns.labels else None,
        preferred_mask=read_culprit_labels(ns.preferred_ids, ids, key="ids") if ns.preferred_ids else None,
        retain=load_dataset_spec(ns.retain_data) if ns.retain_data else ())
    if ns.row_judge:
        from lancet.evaluate.judges import flagged_rows, make_judge

        data.flagged_mask = flagged_rows(make_judge(ns.row_judge), train, ns.train)
    if ns.pairs:
        from lancet.correct.pairs import read_preference_pairs

        data.pairs = read_preference_pairs(ns.pairs)
    train_args = _train_args(ns, ns.out)
    check_inputs(cargs, data)  # a missing input is one line before the model loads
    model, tokenizer = load_model(ns.model, trust_remote_code=ns.trust_remote_code, device=train_args.load_device)
    out = Correction(model, tokenizer, cargs, train_args, max_length=ns.max_length, base_spec=ns.model).run(data)
    print(f"{ns.method} (scores: {scores_method}): model saved to {out}")
    return 0


def cmd_evaluate(ns: argparse.Namespace) -> int:
    from lancet.evaluate import format_table, load_suite
    from lancet.evaluate.suite import evaluate_or_reuse
    from lancet.models.loading import load_model

    suite = load_suite(ns.suite, ns.shared)  # checks every path before the model is loaded
    device, precision = _hardware(ns)
    model, tokenizer = load_model(ns.model, trust_remote_code=ns.trust_remote_code, device=device)
    # resumes set by set after a kill, and reuses a complete metrics file of the same weights and suite
    print(format_table(evaluate_or_reuse(model, tokenizer, suite, ns.out, progress=not ns.quiet,
                                         bf16=precision.bf16)))
    print(f"metrics written to {ns.out}")
    return 0


def cmd_report(ns: argparse.Namespace) -> int:
    from lancet.report import write_report

    html_path, json_path = write_report(ns.run_dir)
    print(f"report written to {html_path} and {json_path}")
    return 0


COMMANDS = {
    "finetune": cmd_finetune,
    "data": cmd_data,
    "demo": cmd_demo,
    "run": cmd_run,
    "attribute": cmd_attribute,
    "index": cmd_index,
    "correct": cmd_correct,
    "evaluate": cmd_evaluate,
    "report": cmd_report,
}


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text
            or "can't allocate memory" in text)


def main(argv: list[str] | None = None) -> int:
    import contextlib
    import os

    from lancet import distributed as dist

    ns = build_parser().parse_args(argv)
    import warnings

    # one line per warning ("lancet: warning: 3 of 304 rows truncated ..."), not the source line under it
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"lancet: warning: {message}\n"
    # under torchrun (docs/scaling.md) every rank runs the same command; only rank 0 logs, shows progress and prints
    main_rank = dist.is_main()
    ns.quiet = ns.quiet or not main_rank
    logging.basicConfig(level=logging.WARNING if ns.quiet else logging.INFO, format="%(levelname)s %(message)s")
    if ns.quiet:
        from transformers.utils import logging as hf_logging

        logging.getLogger("transformers").setLevel(logging.ERROR)
        hf_logging.disable_progress_bar()  # "Loading weights" bars on stderr would bury the one-line error
    if not main_rank:  # the other ranks' warnings and progress bars would repeat rank 0's
        from transformers.utils import logging as hf_logging

        warnings.simplefilter("ignore")
        logging.getLogger().setLevel(logging.ERROR)
        hf_logging.disable_progress_bar()
    try:
        dist.init_from_env()
        with contextlib.ExitStack() as stack:
            if not main_rank:
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            return COMMANDS[ns.command](ns)
    except LancetError as exc:
        if ns.debug:
            raise
        print(f"lancet: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # unwritable directory, full disk, vanished file: name the path, keep it one line
        if ns.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"lancet: error: {where}{exc.strerror or exc} (nothing partial was kept; rerun to resume)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lancet: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    except (RuntimeError, MemoryError) as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
        if ns.debug or not _out_of_memory(exc):
            raise
        where = "GPU" if "cuda" in str(exc).lower() else "host"
        print(f"lancet: error: out of {where} memory ({str(exc).splitlines()[0][:120]}); lower --batch-size, "
              "use --query-rank R (low-rank queries) or fewer --modules, or --precision bf16; finished chunks are "
              "kept, so the rerun resumes", file=sys.stderr)
        return 2
    finally:
        dist.shutdown()


if __name__ == "__main__":
    sys.exit(main())
