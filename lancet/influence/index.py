"""A compressed gradient index of the training set (``lancet index``): each row's gradient is projected once and
stored, so that a new set of IQs is answered from the index without another pass over the training data.

Per tracked layer, two projections with orthonormal columns, P_S [out, r] and P_A [in, r], and per training row
the r x r matrix G~_n = P_S^T G_n P_A, computed from the row's (a, g) pairs as sum_t (P_S^T g_t)(P_A^T a_t)^T
without forming G_n. A query's preconditioned gradient P_q = (F + damping I)^-1 G_q (full space, the fitted
curvature) is projected the same way, and

    score(q, n) ~ sum over layers <P_S^T P_q P_A, G~_n>,

exact when P_S P_S^T = I and P_A P_A^T = I (r equal to the layer's widths). For the eigen projection of K-FAC/EK-FAC
(and of LinFAC's ranges) the kept directions are eigendirections of the preconditioner, so preconditioning and
projecting commute: the query's (a, g) pairs are projected first, like a stored row's, and divided by the kept
eigenvalues + damping (``eigen_denominators``). For a random projection, or random directions completing a side, the
query is preconditioned at full size first, which keeps the full curvature instead of an approximation of it inside
the projected space.

Projections (``IndexArgs.projection``):
- ``eigen``: the r eigenvectors of each Kronecker factor of the fitted curvature (A and S; for LinFAC their ranges)
  with the largest *factor* eigenvalues (``rank_by="factor"``), or with the largest marginals of the corrected
  eigenvalues (``rank_by="corrected"``, EK-FAC and LinFAC: the row and column sums of lambda, i.e. the mean squared
  per-sequence gradient along that direction). Where a factor has fewer than r directions (LinFAC's range with few
  rows), seeded random orthonormal directions of its complement fill the rest, so that r = width is complete.
- ``random``: seeded Gaussian matrices, orthonormalised (LoGra-style); no curvature needed to build.

The index keeps the curvature it was built with (``curvature.safetensors``), so new queries need neither the
training rows nor a refit; rows appended later are projected and preconditioned with that curvature.

Storage: shards of ``shard_rows`` rows in safetensors (memory-mapped when read): per layer [n, r, r] in fp16 or
bf16, each (row, layer) block divided by its largest magnitude first (kept in float32 beside it), so neither
overflow nor underflow of the half-precision format can occur; a non-finite gradient stops the build naming the
row. Each shard has a JSON sidecar, written after its tensors, with the fingerprint of its rows: a rerun reuses the
shards whose rows are unchanged (resume), computes the rows in the gaps and after them (append), and refuses an
index whose rows or model differ. Under torchrun the shards still to do are dealt to the ranks in turn. Size per row:
layers x (r^2 x 2 + 4) bytes (+ 8 for the cosine curvature's row norm).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from lancet import distributed as dist
from lancet.artifacts import atomic_save_tensors, atomic_write_json, load_tensors, model_fingerprint
from lancet.constants import INDEX_FORMAT
from lancet.curvature.estimators import per_sequence_grads
from lancet.curvature.fit import Curvature, batches, data_fingerprint
from lancet.curvature.modules import Capture, TrackedLayer
from lancet.curvature.task import data_cotangent, forward_logits
from lancet.errors import LancetError
from lancet.hardware import autocast, model_device
from lancet.influence.scoring import row_sq_norms
from lancet.options import check_option_types

PROJECTIONS = ("eigen", "random")
RANK_BY = ("factor", "corrected")
# half precision for size; float32/float64 for exactness checks (a float64 tiny model at full rank is exact)
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "float64": torch.float64}


@dataclass
class IndexArgs:
    rank: int = 16
    projection: str = "eigen"
    rank_by: str = "factor"  # eigen projection: which eigendirections are kept (see the module docstring)
    dtype: str = "float16"  # storage dtype of the projected gradients
    shard_rows: int = 256
    batch_size: int = 8
    bf16: bool = False  # bf16 autocast for the forward/backward
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        check_option_types(self, "index")  # before the range checks: "4" < 1 is a TypeError
        if self.rank < 1:
            raise LancetError(f"invalid rank={self.rank!r}: must be >= 1")
        if self.projection not in PROJECTIONS:
            raise LancetError(f"invalid projection={self.projection!r}; choose from {', '.join(PROJECTIONS)}")
        if self.rank_by not in RANK_BY:
            raise LancetError(f"invalid rank_by={self.rank_by!r}; choose from {', '.join(RANK_BY)}")
        if self.dtype not in STORE_DTYPES:
            raise LancetError(f"invalid dtype={self.dtype!r}; choose from {', '.join(STORE_DTYPES)}")
        for key in ("shard_rows", "batch_size"):
            if getattr(self, key) < 1:
                raise LancetError(f"invalid {key}={getattr(self, key)!r}: must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexArgs:
        return cls(**d)

    def fingerprint_dict(self) -> dict[str, Any]:
        """What the stored numbers depend on (not batching or progress bars)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("shard_rows", "batch_size", "progress")}


def _orthonormal(d: int, r: int, seed: int, against: torch.Tensor | None = None) -> torch.Tensor:
    """[d, r] seeded random orthonormal columns, orthogonal to ``against``'s columns when given."""
    x = torch.randn(d, r, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if against is not None and against.shape[1]:
        b = against.double()
        x = x - b @ (b.T @ x)
        x = x - b @ (b.T @ x)  # twice: one Gram-Schmidt step loses orthogonality to rounding
    return torch.linalg.qr(x)[0]


def _eigen_keep(score: torch.Tensor, r: int) -> torch.Tensor:
    """Indices of the (at most) r basis columns with the largest ``score``, best first."""
    return torch.argsort(score.double(), descending=True, stable=True)[: min(r, score.shape[0])]


def _eigen_scores(curvature: Curvature, name: str, rank_by: str) -> tuple[torch.Tensor, torch.Tensor]:
    state = curvature.state[name]
    if rank_by == "corrected":
        if "lambda" not in state:
            raise LancetError(f"rank_by='corrected' needs corrected eigenvalues; {curvature.estimator.name} has "
                              "none (use ekfac or linfac)")
        return state["lambda"].sum(1), state["lambda"].sum(0)
    return state["S_vals"], state["A_vals"]


def _eigen_side(vecs: torch.Tensor, score: torch.Tensor, r: int, seed: int) -> torch.Tensor:
    """The r columns of ``vecs`` with the largest ``score``, completed with random orthonormal directions of their
    complement when there are fewer than r."""
    d = vecs.shape[0]
    keep = _eigen_keep(score, r)
    chosen = vecs[:, keep].double()
    if chosen.shape[1] < min(r, d):
        chosen = torch.cat([chosen, _orthonormal(d, min(r, d) - chosen.shape[1], seed, chosen)], 1)
    return chosen


def make_projections(layers: Sequence[TrackedLayer], args: IndexArgs, curvature: Curvature | None = None
                     ) -> dict[str, dict[str, torch.Tensor]]:
    """{layer: {"S": [out, r_S], "A": [in, r_A]}} (float64; r_* = min(rank, width))."""
    out = {}
    for i, layer in enumerate(layers):
        d_out, d_in = layer.shape
        if args.projection == "random":
            out[layer.name] = {"S": _orthonormal(d_out, min(args.rank, d_out), args.seed * 100_003 + 2 * i),
                               "A": _orthonormal(d_in, min(args.rank, d_in), args.seed * 100_003 + 2 * i + 1)}
            continue
        if curvature is None:
            raise LancetError("the eigen projection needs a fitted curvature (kfac, ekfac, kfac_reduce or linfac)")
        state = curvature.state[layer.name]
        if "S_vecs" not in state:
            raise LancetError(f"the eigen projection needs Kronecker eigenbases; {curvature.estimator.name} has none "
                              "(use kfac, ekfac, kfac_reduce or linfac, or --projection random)")
        s_score, a_score = _eigen_scores(curvature, layer.name, args.rank_by)
        out[layer.name] = {"S": _eigen_side(state["S_vecs"], s_score, args.rank, args.seed),
                           "A": _eigen_side(state["A_vecs"], a_score, args.rank, args.seed + 1)}
    return {name: {k: v.double().contiguous() for k, v in sides.items()} for name, sides in out.items()}


def _meta_path(index_dir: Path) -> Path:
    return index_dir / "index.json"


def read_meta(index_dir: str | Path) -> dict[str, Any]:
    path = _meta_path(Path(index_dir))
    if not path.is_file():
        raise LancetError(f"{index_dir}: not a lancet index (no index.json); build one with `lancet index`")
    return json.loads(path.read_text())


def _sidecars(index_dir: Path, rows: Sequence[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """{start: shard info} of the finished shards (each shard's JSON sidecar is written after its tensors), each
    checked against ``rows``: a shard of other rows is a stale index, refused."""
    found = {}
    for path in sorted(index_dir.glob("shard-*.json")):
        info = json.loads(path.read_text())
        start, stop = info["start"], info["stop"]
        if not (index_dir / info["file"]).is_file():
            continue  # never happens with atomic writes in this order; a hand-deleted file is recomputed
        if stop > len(rows) or data_fingerprint(rows[start:stop]) != info["data"]:
            raise LancetError(f"{index_dir}: rows {start}-{stop - 1} differ from the rows this index was built on "
                              "(another training set); use a new --out")
        found[start] = info
    return found


def _plan(done: dict[int, dict[str, Any]], n: int, shard_rows: int) -> list[tuple[int, int]]:
    """The row ranges still to project: the gaps between finished shards and the rows after them, in shards of at
    most ``shard_rows`` (a finished shard keeps its own bounds, so an appended index keeps its short last shard)."""
    todo, pos = [], 0
    starts = sorted(done)
    while pos < n:
        if pos in done:
            pos = done[pos]["stop"]
            continue
        nxt = min((s for s in starts if s > pos), default=n)
        stop = min(pos + shard_rows, nxt)
        todo.append((pos, stop))
        pos = stop
    return todo


def build_index(model, rows: Sequence[dict[str, Any]], index_dir: str | Path, args: IndexArgs, *,
                curvature: Curvature | None = None, layers: Sequence[TrackedLayer] | None = None,
                model_fp: str | None = None) -> dict[str, Any]:
    """Project and store every row's gradient under ``index_dir``; returns the index's metadata. Finished shards
    whose rows are unchanged are kept (resume); rows past them are added (append). Under torchrun the shards still
    to do are dealt to the ranks in turn; each rank writes its own, rank 0 the metadata."""
    dist.init_from_env()
    index_dir = Path(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    layers = list(layers if layers is not None else curvature.layers if curvature is not None else [])
    if not layers:
        raise LancetError("build_index needs the tracked layers (or a fitted curvature, which holds them)")
    model_fp = model_fp or model_fingerprint(model)
    names = [layer.name for layer in layers]
    options = {"kind": "index", "format": INDEX_FORMAT, "model": model_fp, "layers": names,
               "args": args.fingerprint_dict(), "curvature": curvature.estimator.name if curvature else None}
    meta_path = _meta_path(index_dir)
    if meta_path.is_file():
        meta = read_meta(index_dir)
        if {k: meta.get(k) for k in options} != options:
            differs = [k for k in options if meta.get(k) != options[k]]
            raise LancetError(f"{index_dir}: an index of another {'/'.join(differs)} is there; use a new --out")
    elif dist.is_main():
        projections = make_projections(layers, args, curvature)
        atomic_save_tensors(index_dir / "projections.safetensors",
                            {f"{n}::{s}": t for n, sides in projections.items() for s, t in sides.items()})
        if curvature is not None:  # the index answers queries on its own: it keeps the curvature it was built with
            atomic_save_tensors(index_dir / "curvature.safetensors",
                                {k: v.contiguous() for k, v in curvature.to_tensors().items()})
        atomic_write_json(meta_path, {**options, "shards": [], "n_rows": 0})
    dist.barrier()  # rank 0 has written the projections every rank reads
    projections = load_projections(index_dir)
    done = _sidecars(index_dir, rows)
    mine = _plan(done, len(rows), args.shard_rows)[dist.rank()::dist.world_size()]
    device = model_device(model)
    work = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    proj = {n: {s: t.to(device, work) for s, t in sides.items()} for n, sides in projections.items()}
    bar = tqdm(total=sum(b - a for a, b in mine), desc="index", disable=not args.progress or not dist.is_main())
    for start, stop in mine:
        tensors = _project_rows(model, layers, rows[start:stop], proj, args, first_row=start, bar=bar,
                                norms=bool(curvature is not None and curvature.estimator.unit_gradients))
        file = f"shard-{start:09d}.safetensors"
        atomic_save_tensors(index_dir / file, tensors)
        atomic_write_json(index_dir / f"shard-{start:09d}.json",  # after the tensors: a sidecar means finished
                          {"file": file, "start": start, "stop": stop, "data": data_fingerprint(rows[start:stop])})
    bar.close()
    dist.barrier()  # every rank's shards are on disk
    if dist.is_main():
        shards = [info for _, info in sorted(_sidecars(index_dir, rows).items())]
        atomic_write_json(meta_path, {**options, "shards": shards, "n_rows": len(rows)})
    dist.barrier()
    return read_meta(index_dir)


def _project_rows(model, layers: Sequence[TrackedLayer], rows: Sequence[dict[str, Any]],
                  proj: dict[str, dict[str, torch.Tensor]], args: IndexArgs, *, first_row: int, bar,
                  norms: bool = False) -> dict[str, torch.Tensor]:
    """One shard: per layer the projected gradients scaled to unit max-magnitude in the storage dtype, the scales,
    and with ``norms`` each row's squared gradient norm over all layers (cosine estimators divide by it; it costs two
    token Gram matrices per layer and batch, so other estimators skip it)."""
    device = model_device(model)
    n = len(rows)
    work = next(iter(proj.values()))["S"].dtype
    acc = {layer.name: torch.zeros(n, proj[layer.name]["S"].shape[1], proj[layer.name]["A"].shape[1],
                                   dtype=work, device=device) for layer in layers}
    sq_norm = torch.zeros(n, dtype=torch.float64, device=device)
    where: dict[str, int] = {}

    def on_grad(layer, a, g):
        start = where["start"]
        a, g = a.to(work), g.to(work)
        acc[layer.name][start:start + a.shape[0]] += per_sequence_grads(a @ proj[layer.name]["A"],
                                                                        g @ proj[layer.name]["S"])
        if norms:
            sq_norm[start:start + a.shape[0]] += row_sq_norms(a, g).double()

    model.eval()
    with Capture(model, layers, on_grad):
        for start, batch in batches(rows, args.batch_size, device=device):
            where["start"] = start
            with autocast(device, args.bf16):
                logits = forward_logits(model, batch)
            logits.backward(data_cotangent(logits, batch["labels"]))
            bar.update(batch["input_ids"].shape[0])
    store = STORE_DTYPES[args.dtype]
    out: dict[str, torch.Tensor] = {"sq_norm": sq_norm.cpu()} if norms else {}
    for name, x in acc.items():
        x = x.cpu()
        bad = ~torch.isfinite(x).flatten(1).all(1)
        if bad.any():
            row = first_row + int(bad.nonzero()[0])
            raise LancetError(f"index: non-finite gradient in layer {name} for training row {row}")
        scale = x.abs().flatten(1).amax(1).clamp_min(torch.finfo(x.dtype).tiny)
        out[f"{name}::grad"] = (x / scale.view(-1, 1, 1)).to(store).contiguous()
        out[f"{name}::scale"] = scale.to(torch.float64 if store == torch.float64 else torch.float32).contiguous()
    return out


def index_curvature(index_dir: str | Path, model, modules="blocks") -> Curvature:
    """The curvature the index was built with (stored beside it), on ``model``'s tracked layers."""
    from lancet.curvature.estimators import get_estimator
    from lancet.curvature.fit import _unflatten
    from lancet.curvature.modules import find_tracked_layers

    meta = read_meta(index_dir)
    layers = [layer for layer in find_tracked_layers(model, modules) if layer.name in set(meta["layers"])]
    if [layer.name for layer in layers] != meta["layers"]:
        raise LancetError(f"{index_dir}: the model's tracked layers are not the index's")
    estimator = get_estimator(meta["curvature"] or "identity")
    path = Path(index_dir) / "curvature.safetensors"
    state = _unflatten(load_tensors(path), model_device(model)) if path.is_file() else {}
    return Curvature(estimator, layers, {n: state.get(n, {}) for n in meta["layers"]})  # identity: no state


def check_index(index_dir: str | Path, model_fp: str | None, rows: Sequence[dict[str, Any]] | None = None) -> dict:
    """The index's metadata, after refusing (one line) an index of another model (unless ``model_fp`` is None) or of
    other training rows."""
    meta = read_meta(index_dir)
    if model_fp is not None and meta["model"] != model_fp:
        raise LancetError(f"{index_dir}: this index was built on another model (fingerprint {meta['model']}, this one "
                          f"{model_fp}); rebuild it with `lancet index`")
    if rows is not None:
        if len(rows) != meta["n_rows"]:
            raise LancetError(f"{index_dir}: the index holds {meta['n_rows']} rows, the training data {len(rows)}; "
                              "rebuild or append with `lancet index`")
        for shard in meta["shards"]:
            if data_fingerprint(rows[shard["start"]:shard["stop"]]) != shard["data"]:
                raise LancetError(f"{index_dir}: training rows {shard['start']}-{shard['stop'] - 1} differ from the "
                                  "indexed ones; rebuild it with `lancet index`")
    return meta


def project(p: torch.Tensor, sides: dict[str, torch.Tensor]) -> torch.Tensor:
    """[Q, r_S, r_A] = P_S^T P_q P_A for preconditioned queries p [Q, out, in] of one layer."""
    return sides["S"].to(p).T @ p @ sides["A"].to(p)


def project_queries(model, curvature: Curvature, query_rows: Sequence[dict[str, Any]], index_dir: str | Path, args,
                    measurement=None, rank: int | None = None, kept: dict[str, float] | None = None
                    ) -> dict[str, torch.Tensor]:
    """{layer: [Q, r, r]}: the queries' gradients (QUERY_CHUNK at a time: a full-rank gradient of every layer is as
    large as the model), preconditioned in full space layer by layer, and projected onto the index's directions
    (their leading ``rank`` only, when given: the index then answers as one built at that rank). ``kept``, when
    given, receives the squared norm of the preconditioned queries before ("total") and after ("kept") projection:
    the share of the preconditioned query the index keeps (what it drops, LinFAC's null blocks included, is lost)."""
    from dataclasses import replace

    from lancet.constants import QUERY_CHUNK
    from lancet.influence.scoring import _preconditioned_layers, query_gradients

    projections = _leading(load_projections(index_dir), rank)
    args = replace(args, query_rank=None)
    # layers whose kept directions are all eigendirections are projected first and divided (eigen_denominators);
    # the others are preconditioned at full size, QUERY_CHUNK queries at a time
    blocks = {} if kept is not None else eigen_denominators(curvature, read_meta(index_dir), projections, args)
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in projections}
    step = QUERY_CHUNK if len(blocks) < len(projections) else max(len(query_rows), 1)
    for i in range(0, len(query_rows), step):
        grads = query_gradients(model, curvature.layers, query_rows[i:i + step], args, measurement,
                                projections={name: projections[name] for name in blocks})
        for name, denominator in blocks.items():
            small = grads.pop(name)
            parts[name].append((small / denominator.to(small)).cpu())
        for name, p in _preconditioned_layers(curvature, grads, args):
            small = project(p, projections[name])
            parts[name].append(small.cpu())
            if kept is not None:
                kept["total"] = kept.get("total", 0.0) + float(p.double().pow(2).sum())
                kept["kept"] = kept.get("kept", 0.0) + float(small.double().pow(2).sum())
    return {name: torch.cat(v) for name, v in parts.items()}


def eigen_denominators(curvature: Curvature, meta: dict[str, Any], projections: dict[str, dict[str, torch.Tensor]],
                       args) -> dict[str, torch.Tensor]:
    """{layer: [r_S, r_A] eigenvalue + damping} for the layers of an eigen index whose kept directions are all
    eigendirections of the preconditioner (no random completion). The preconditioner is diagonal in the Kronecker
    eigenbasis on the (range x range) block these directions span (K-FAC, EK-FAC, K-FAC-reduce; LinFAC's null
    blocks are orthogonal to them), so P_S^T (F + d)^-1 G P_A = (P_S^T G P_A) / (lambda_kept + d): the query is
    projected first and divided, with no full-size gradient or preconditioning (``project_queries``; tested equal).
    Empty for a random projection or an estimator without Kronecker eigenbases."""
    index_args = meta["args"]
    if index_args["projection"] != "eigen" or curvature.estimator.unit_gradients:
        return {}
    out = {}
    for name, sides in projections.items():
        state = curvature.state[name]
        vals = curvature.estimator.eigenvalues(state)
        if vals is None or vals.dim() != 2 or "S_vecs" not in state:
            continue
        s_score, a_score = _eigen_scores(curvature, name, index_args["rank_by"])
        keep_s, keep_a = _eigen_keep(s_score, index_args["rank"]), _eigen_keep(a_score, index_args["rank"])
        r_s, r_a = sides["S"].shape[1], sides["A"].shape[1]
        if keep_s.shape[0] < r_s or keep_a.shape[0] < r_a:
            continue  # completed with random directions: not eigendirections, precondition at full size
        damping = curvature.estimator.damping_for(state, args.damping)
        out[name] = vals[keep_s[:r_s]][:, keep_a[:r_a]].double() + damping
    return out


def fast_path_share(curvature: Curvature, index_dir: str | Path, args, rank: int | None = None) -> float:
    """The share of the index's layers that ``project_queries`` answers at ``rank`` by projecting first."""
    projections = _leading(load_projections(index_dir), rank)
    return len(eigen_denominators(curvature, read_meta(index_dir), projections, args)) / len(projections)


def _leading(projections: dict[str, dict[str, torch.Tensor]], rank: int | None) -> dict[str, dict[str, torch.Tensor]]:
    """The first ``rank`` directions of each side (the eigen projection's columns are sorted by the ranking rule, so
    these are its top ``rank``; a random projection's first columns are a random projection too)."""
    if rank is None:
        return projections
    return {n: {k: v[:, :rank] for k, v in sides.items()} for n, sides in projections.items()}


def query_index(model, curvature: Curvature, query_rows: Sequence[dict[str, Any]], index_dir: str | Path, args,
                measurement=None, rank: int | None = None) -> torch.Tensor:
    """[Q, N] scores of the queries against the indexed rows (``project_queries``, then ``index_scores``)."""
    queries = project_queries(model, curvature, query_rows, index_dir, args, measurement, rank)
    unit = torch.ones(len(query_rows), dtype=torch.bool) if curvature.estimator.unit_gradients else None
    return index_scores(index_dir, queries, unit_rows=unit, progress=args.progress)


def index_scores(index_dir: str | Path, queries: dict[str, torch.Tensor], *, unit_rows: torch.Tensor | None = None,
                 progress: bool = False) -> torch.Tensor:
    """[Q, N] scores of projected queries (``project_queries``) against every indexed row, shard by shard, each
    shard memory-mapped; queries projected onto fewer directions than stored read the leading block. ``unit_rows``
    [Q] bool: divide those queries' scores by each row's gradient norm (the cosine estimators; their query side is
    unit-norm already)."""
    index_dir = Path(index_dir)
    meta = read_meta(index_dir)
    names = meta["layers"]
    n_q = next(iter(queries.values())).shape[0]
    work = torch.float64 if meta["args"]["dtype"] == "float64" else torch.float32
    flat = {name: queries[name].reshape(n_q, -1).to(work) for name in names}
    scores = torch.zeros(n_q, meta["n_rows"], dtype=work)
    for shard in tqdm(meta["shards"], desc="index lookup", disable=not progress):
        with safe_open(str(index_dir / shard["file"]), framework="pt") as f:
            part = scores[:, shard["start"]:shard["stop"]]
            for name in names:
                r_s, r_a = queries[name].shape[1:]
                x = f.get_slice(f"{name}::grad")[:, :r_s, :r_a].to(work)
                x = x * f.get_tensor(f"{name}::scale").to(work).view(-1, 1, 1)
                part += flat[name] @ x.reshape(x.shape[0], -1).T
            if unit_rows is not None and bool(unit_rows.any()):
                if "sq_norm" not in f.keys():
                    raise LancetError(f"{index_dir}: built without row norms; a cosine query needs an index built "
                                      "with the cosine curvature")
                inv = f.get_tensor("sq_norm").sqrt().clamp_min(torch.finfo(torch.float64).tiny).reciprocal().to(work)
                part[unit_rows] *= inv
    return scores


def load_projections(index_dir: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    meta = read_meta(index_dir)
    saved = load_tensors(Path(index_dir) / "projections.safetensors")
    return {n: {"S": saved[f"{n}::S"], "A": saved[f"{n}::A"]} for n in meta["layers"]}


def bytes_per_row(meta: dict[str, Any], projections: dict[str, dict[str, torch.Tensor]], rank: int | None = None
                  ) -> int:
    """Storage of one row: r_S x r_A values in the storage dtype per layer, one float32 scale per layer (and one
    float64 squared norm for the cosine curvature); with ``rank``, of an index built at that lower rank."""
    item = STORE_DTYPES[meta["args"]["dtype"]].itemsize
    sides = _leading(projections, rank)
    return (sum(p["S"].shape[1] * p["A"].shape[1] * item + 4 for p in sides.values())
            + (8 if meta["curvature"] == "cosine" else 0))
