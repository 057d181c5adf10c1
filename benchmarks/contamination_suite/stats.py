"""The suite's statistics (docs/method.md §5.6): a paired bootstrap over training rows and reported seeds for AP,
recall@|P| and AP per tier; the elbow that chooses k without labels; the recovered share of the drop with its
interval over retraining seeds and test prompts.

The bootstrap, one replicate: draw the reported seeds with replacement (as many as there are); for each draw,
resample that seed's training rows with replacement *within* positives and within the other rows (a stratified
resample: the number of culprits is fixed by the design, so it stays fixed, and with it recall@|P|'s k and the
AP of chance); compute every method's metric on those same rows (paired: one resample for all methods, so the
difference of two methods has its own interval); average over the drawn seeds. The interval is the 2.5th and
97.5th percentile over replicates, the point estimate the mean over seeds of the metric on all rows. A seed given
by its metrics alone (no per-row scores: the committed lexical seeds) enters with its fixed values, so only the
seed draw varies it. Ties in a ranking are broken by row order, as ``lancet.influence.recall.average_precision``
does, in every replicate (the resampled rows are kept in their original order).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

METRICS = ("ap", "recall_at_p")
N_BOOT = 2000
LEVEL = 0.95


@dataclass
class SeedScores:
    """One seed's rankings: ``scores`` {method: [N]} over its training rows, whose tier is ``tiers[i]`` (positives
    are the rows whose tier is in ``positive_tiers``). Or, for a seed whose per-row scores are gone, ``fixed``
    {method: {metric: value}} (metrics "ap", "recall_at_p", "ap:<tier>")."""

    seed: int
    tiers: list[str] = field(default_factory=list)
    positive_tiers: tuple[str, ...] = ()
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    fixed: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def positives(self) -> torch.Tensor:
        return torch.tensor([t in self.positive_tiers for t in self.tiers], dtype=torch.bool)

    @property
    def methods(self) -> list[str]:
        return list(self.scores) or list(self.fixed)

    def restrict(self, keep: torch.Tensor) -> SeedScores:
        """The same seed on the rows where ``keep`` [N] is True."""
        idx = keep.nonzero().flatten().tolist()
        return SeedScores(self.seed, [self.tiers[i] for i in idx], self.positive_tiers,
                          {m: s[keep] for m, s in self.scores.items()})


def batched_ap(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """[B, N] scores and positives -> [B] average precision of ranking each row by descending score (ties by
    column order; NaN where a row has no positive). Rows scored -inf are ranked last and count as absent."""
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    hits = positives.gather(1, order).double()
    ranks = torch.arange(1, scores.shape[1] + 1, dtype=torch.float64)
    precision = hits.cumsum(1) / ranks
    n = hits.sum(1)
    return torch.where(n > 0, (precision * hits).sum(1) / n.clamp_min(1), torch.nan)


def batched_recall_at_p(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """[B, N] -> [B] recall@|P|: the share of the positives among the top |P| rows (|P| = that row's positives)."""
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    hits = positives.gather(1, order)
    p = positives.sum(1, keepdim=True)
    within = torch.arange(scores.shape[1]).unsqueeze(0) < p
    return torch.where(p.squeeze(1) > 0, (hits & within).sum(1).double() / p.squeeze(1).clamp_min(1), torch.nan)


def seed_metrics(scores: torch.Tensor, tiers: list[str], positive_tiers: tuple[str, ...]) -> dict[str, float]:
    """One ranking's metrics on all rows: "ap", "recall_at_p" and "ap:<tier>" for each positive tier present (AP
    among that tier's rows and the non-positives: the other tiers left out)."""
    one = SeedScores(0, tiers, positive_tiers, {"m": scores})
    idx = torch.arange(len(tiers)).unsqueeze(0)
    return {k: float(v[0]) for k, v in _metrics(one, idx)["m"].items()}


def _metrics(seed: SeedScores, idx: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """{method: {metric: [B]}} on the rows ``idx`` [B, N'] (indices into the seed's rows)."""
    pos = seed.positives[idx]
    tiers = [t for t in seed.positive_tiers if t in seed.tiers]
    tier_of = {t: torch.tensor([x == t for x in seed.tiers])[idx] for t in tiers}
    out = {}
    for method, s in seed.scores.items():
        v = s.double()[idx]
        m = {"ap": batched_ap(v, pos), "recall_at_p": batched_recall_at_p(v, pos)}
        for t in tiers:  # AP of tier t among its rows and the non-positives
            keep = tier_of[t] | ~pos
            m[f"ap:{t}"] = batched_ap(torch.where(keep, v, -torch.inf), pos & keep)
        out[method] = m
    return out


def _row_resample(seed: SeedScores, n: int, g: torch.Generator) -> torch.Tensor:
    """[n, N] stratified resamples of the seed's row indices (positives among positives, others among others),
    each sorted so that ties keep the original row order."""
    pos = seed.positives
    parts = []
    for mask in (pos, ~pos):
        where = mask.nonzero().flatten()
        if len(where):
            parts.append(where[torch.randint(len(where), (n, len(where)), generator=g)])
    return torch.cat(parts, 1).sort(1).values


@dataclass
class Bootstrap:
    """The point estimates and the replicates of every (method, metric); methods share their resamples."""

    point: dict[str, dict[str, float]]  # method -> metric -> mean over seeds on all rows
    reps: dict[str, dict[str, torch.Tensor]]  # method -> metric -> [B] replicate means
    level: float = LEVEL

    def ci(self, method: str, metric: str = "ap") -> list[float]:
        return _percentiles(self.reps[method][metric], self.level)

    def ap_ci(self, method: str) -> list[float]:
        return self.ci(method, "ap")

    def ap_diff_ci(self, a: str, b: str, metric: str = "ap") -> dict:
        """AP(a) - AP(b): the difference of the point estimates and its paired percentile interval."""
        diff = self.reps[a][metric] - self.reps[b][metric]
        return {"mean": round(self.point[a][metric] - self.point[b][metric], 4), "ci": _percentiles(diff, self.level)}

    def summary(self, method: str) -> dict:
        """{"ap_mean", "ap_ci", "recall_at_p", "recall_at_p_ci", "ap_by_tier": {tier: {"mean", "ci"}}}."""
        p = self.point[method]
        tiers = {k.split(":", 1)[1]: {"mean": round(v, 4), "ci": self.ci(method, k)}
                 for k, v in p.items() if k.startswith("ap:")}
        return {"ap_mean": round(p["ap"], 4), "ap_ci": self.ci(method, "ap"),
                "recall_at_p": round(p["recall_at_p"], 4), "recall_at_p_ci": self.ci(method, "recall_at_p"),
                "ap_by_tier": tiers}


def _percentiles(x: torch.Tensor, level: float) -> list[float] | list[None]:
    x = x[~torch.isnan(x)]
    if not len(x):
        return [None, None]
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    return [round(float(v), 4) for v in torch.quantile(x.double(), q)]


def bootstrap(seeds: list[SeedScores], n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> Bootstrap:
    """The paired bootstrap over ``seeds`` (the reported ones) and their rows; every method of the first seed must
    be in every seed. Seeded: the same inputs give the same interval."""
    if not seeds:
        raise ValueError("no seeds to bootstrap")
    methods = seeds[0].methods
    missing = [(s.seed, m) for s in seeds for m in methods if m not in s.methods]
    if missing:
        raise ValueError(f"seed {missing[0][0]} has no ranking {missing[0][1]!r}: every seed needs every method")
    full = [_all_rows(s) for s in seeds]
    metrics = sorted({k for f in full for m in methods for k in f[m]})
    point = {m: {k: sum(f[m][k] for f in full) / len(full) for k in metrics if all(k in f[m] for f in full)}
             for m in methods}
    g = torch.Generator().manual_seed(seed)
    n = len(seeds)
    draws = torch.randint(n, (n_boot, n), generator=g)  # the seed draw of every replicate
    reps = {m: {k: torch.zeros(n_boot, dtype=torch.float64) for k in point[m]} for m in methods}
    for i, s in enumerate(seeds):
        slots = (draws == i).nonzero()  # (replicate, slot) pairs that drew this seed
        if not len(slots):
            continue
        if s.scores:
            values = _metrics(s, _row_resample(s, len(slots), g))
        else:
            values = {m: {k: torch.full((len(slots),), float(v)) for k, v in s.fixed[m].items()} for m in methods}
        for m in methods:
            for k in point[m]:
                reps[m][k].index_add_(0, slots[:, 0], values[m][k].double())
    return Bootstrap(point, {m: {k: v / n for k, v in r.items()} for m, r in reps.items()}, level)


def _all_rows(s: SeedScores) -> dict[str, dict[str, float]]:
    if not s.scores:
        return s.fixed
    values = _metrics(s, torch.arange(len(s.tiers)).unsqueeze(0))
    return {m: {k: float(v[0]) for k, v in d.items()} for m, d in values.items()}


def elbow_k(scores: torch.Tensor) -> int:
    """k without labels: how many rows rank above the elbow of the sorted scores. Only rows with a positive score
    are candidates (a row that lowers the behaviour is not one to remove): sort them descending, s_0 >= ... >=
    s_{n-1}, draw the chord from the first point to the last, and take the point farthest *below* it (the largest
    chord - s_i; on axes scaled to [0, 1] as Kneedle does, which moves no argmax); k = its index i, the number of
    rows before it. Fewer than 3 positive rows: k = their number. A curve that never bends below its chord (a
    straight or concave fall) has no elbow: k = every positive row."""
    s = torch.sort(scores.double()[scores > 0], descending=True).values
    if len(s) < 3:
        return len(s)
    x = torch.arange(len(s), dtype=torch.float64) / (len(s) - 1)
    chord = s[0] + (s[-1] - s[0]) * x
    gap = chord - s
    if float(gap.max()) <= 1e-6 * float(s[0] - s[-1]):  # no bend below the chord (float32 rounding aside)
        return len(s)
    return int(gap.argmax())


def recovered_ci(impure: list[list[float]], oracle: list[list[float]], retrained: list[list[float]],
                 n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> dict:
    """The recovered share of the drop, (impure - retrained) / (impure - oracle), compliance being the mean judge
    verdict over the test prompts and the retraining seeds. Each argument is a list over retraining seeds of the
    per-prompt verdicts (1 = complies) on the same test prompts, in the same order; ``impure`` and ``oracle`` may
    hold one entry, shared by every retraining seed, and a rate alone may stand for its prompts as a one-element
    list: it is that rate on every prompt (with rates alone only the seeds vary; where some seeds were measured
    per prompt and others only by their rate, as lexical's training order 0 committed by the safety benchmark, the
    rate-only seeds keep their rate in every replicate and only the others' prompts are resampled, which narrows
    the interval by those seeds' prompt noise). Bootstrap: resample the prompts (the same prompts for every model:
    paired) and the retraining seeds (each seed's impure, oracle and retrained model kept together); percentile
    interval; replicates whose drop is not positive are left out (``n`` says how many remain)."""
    r = len(retrained)
    if not r:
        raise ValueError("no retrained model")
    p = max(len(v) for v in (*impure, *oracle, *retrained))
    impure, oracle, retrained = ([list(v) * p if len(v) == 1 else list(v) for v in x]
                                 for x in (impure, oracle, retrained))
    imp, ora = (_per_seed(x, r) for x in (impure, oracle))
    ret = torch.tensor(retrained, dtype=torch.float64)  # [R, P]
    if not imp.shape == ora.shape == ret.shape:
        raise ValueError(f"verdicts of different shapes: impure {tuple(imp.shape)}, oracle {tuple(ora.shape)}, "
                         f"retrained {tuple(ret.shape)}")
    g = torch.Generator().manual_seed(seed)
    p = ret.shape[1]
    seeds = torch.randint(r, (n_boot, r), generator=g)
    prompts = torch.randint(p, (n_boot, p), generator=g) if p > 1 else torch.zeros(n_boot, 1, dtype=torch.long)

    def mean(x: torch.Tensor) -> torch.Tensor:  # [B]: the mean over each replicate's seeds and prompts
        return x[seeds][torch.arange(n_boot)[:, None, None], torch.arange(r)[None, :, None],
                        prompts[:, None, :]].mean((1, 2))

    drop = mean(imp) - mean(ora)
    share = torch.where(drop > 0, (mean(imp) - mean(ret)) / drop.clamp_min(1e-12), torch.nan)
    full_drop = float(imp.mean() - ora.mean())
    point = float(imp.mean() - ret.mean()) / full_drop if full_drop > 0 else None
    return {"recovered_mean": None if point is None else round(point, 4), "recovered_ci": _percentiles(share, level),
            "n": int((~torch.isnan(share)).sum()), "compliance": round(float(ret.mean()), 4)}


def _per_seed(x: list[list[float]], r: int) -> torch.Tensor:
    t = torch.tensor(x, dtype=torch.float64)
    return t.expand(r, -1) if len(x) == 1 else t


def ood_replicates(verdicts: dict[str, dict[str, str]], n_boot: int = N_BOOT, seed: int = 0) -> dict[str, torch.Tensor]:
    """The correction suite's within-seed bootstrap (docs/method.md §5.4): ``verdicts`` {model: {set: "0110..."}}
    (1 = complies; every model answered the same prompts of each set, in the same order). Each replicate redraws,
    within each set, as many prompts as it has, with replacement, the same draw for every model (paired); a model's
    value is the unweighted mean over the sets of its resampled compliance rates. Returns {model: [n_boot]}."""
    models = list(verdicts)
    if not models:
        raise ValueError("no model's verdicts")
    sets = list(verdicts[models[0]])
    for m in models:
        if list(verdicts[m]) != sets:
            raise ValueError(f"{m}: verdicts for sets {sorted(verdicts[m])}, not {sorted(sets)}")
    g = torch.Generator().manual_seed(seed)
    total = {m: torch.zeros(n_boot, dtype=torch.float64) for m in models}
    for s in sets:
        lengths = {len(verdicts[m][s]) for m in models}
        if len(lengths) != 1:
            raise ValueError(f"{s}: models answered different numbers of prompts {sorted(lengths)}")
        n = lengths.pop()
        draw = torch.randint(n, (n_boot, n), generator=g)
        for m in models:
            v = torch.tensor([c == "1" for c in verdicts[m][s]], dtype=torch.float64)
            total[m] += v[draw].mean(1)
    return {m: t / len(sets) for m, t in total.items()}


def gap_closed_ci(replicates: dict[str, torch.Tensor], row: str, impure: str = "impure", retrained: str = "safe",
                  level: float = LEVEL) -> list[float] | list[None]:
    """The percentile interval of (impure − row) / (impure − retrained) over ``ood_replicates``; replicates whose
    gap is not positive are left out."""
    gap = replicates[impure] - replicates[retrained]
    share = torch.where(gap > 0, (replicates[impure] - replicates[row]) / gap.clamp_min(1e-12), torch.nan)
    return _percentiles(share, level)


def difference_ci(replicates: dict[str, torch.Tensor], a: str, b: str, level: float = LEVEL) -> list[float]:
    """The percentile interval of model ``a``'s value minus model ``b``'s over ``ood_replicates`` (paired)."""
    return _percentiles(replicates[a] - replicates[b], level)
