"""Reference EK-FAC influence scores from kronfluence 1.0.1, for comparing lancet's own EK-FAC (the tests, and
the kronfluence runs of benchmarks/influence_speed.py and benchmarks/gpu_check.py).

kronfluence is a test-only dependency: install it with ``tests/requirements-kronfluence.txt`` (``--no-deps``,
so that pip pulls neither torchvision nor another torch). This module imports kronfluence only inside the
functions that need it; a test calls them only behind ``pytest.importorskip("kronfluence")``.

How kronfluence 1.0.1 normalises (paths are relative to ``site-packages/kronfluence/``; checked by reading the
installed source). Notation: a batch of B sequences, T positions each, attention mask m (1 = real token),
L = the batch's training loss (here the SUM of token cross-entropies), ``a_t`` the input of a Linear at position
t, ``s_t`` its output, ``g_t = dL/ds_t``.

(a) Activation covariance. ``CovarianceTracker`` forward hook (module/tracker/factor.py:98-112) flattens the
    input to [B*T, d_in] and, when ``Task.get_attention_mask`` gave a mask with B*T entries, multiplies each row by
    its mask value (module/linear.py:30-37; the mask is set only while fitting covariances,
    factor/covariance.py:214-216). It accumulates the UNNORMALISED sum ``A = sum_t m_t a_t a_t^T``
    (module/tracker/factor.py:57-58) and a count that is ``m.sum()``, the number of non-pad tokens, all of them,
    prompt tokens with label -100 and each sequence's last token included (module/linear.py:45); without a
    mask the count is B*T. The saved ``activation_covariance`` is that raw sum and
    ``num_activation_covariance_processed`` the count. The division by the count happens only in the
    eigendecomposition step (factor/eigen.py:198-199), after which the matrix is symmetrised (eigen.py:201-202).
(b) Gradient covariance. The backward hook (module/tracker/factor.py:114-121) accumulates
    ``G = sum_t g_t g_t^T`` over ALL B*T positions with no masking of the gradients (module/linear.py:48-54;
    factor.py:89-93, the alpha there is 1 unless fp16 AMP is on); pad positions contribute nothing only because
    their gradient is zero. The count is again ``m.sum()`` (non-pad tokens) when a matching mask is set, else B*T
    (module/linear.py:50-53). Because L is a sum over tokens, ``g_t`` is the gradient of that sum, not of a mean.
    Normalised by the count at factor/eigen.py:199, as in (a).
    For EK-FAC these normalisations do not matter at all: only the eigenvectors of A and G are used; their
    eigenvalues are dropped (factor/config.py:322-330) and replaced by Lambda.
(c) Bias. Yes: when the Linear has a bias, a column of ones (multiplied by the mask) is appended to the
    activations for the covariance (module/linear.py:39-43) and for every per-sample gradient
    (module/linear.py:56-61, 71). Llama's Linears have no bias, so nothing is appended for them.
(d) Lambda. Per-sample gradient = ``einsum("b...i,b...o->bio", g, a)`` (module/linear.py:72): for each sequence
    the SUM over its tokens of ``g_t a_t^T``, i.e. the gradient of that sequence's summed loss, shape
    [d_out, d_in]. ``LambdaTracker._update_lambda_matrix`` rotates it, ``Q_G^T dW Q_A``, squares elementwise and
    sums over the batch (module/tracker/factor.py:217-226); ``num_lambda_processed`` grows by the batch size,
    i.e. counts SEQUENCES (factor.py:169, 203). The saved ``lambda_matrix`` is the raw sum; it is divided by the
    number of sequences in ``Ekfac.prepare`` (factor/config.py:331-332), in float64 (``LAMBDA_DTYPE``,
    utils/constants.py:82). With ``use_empirical_fisher=False`` both the covariance pass and the Lambda pass call
    ``compute_train_loss(sample=True)`` (factor/covariance.py:221-225, factor/eigen.py:415-419), so they draw
    independent label samples.
(e) Damping. ``Ekfac.prepare`` (factor/config.py:333-337): if ``ScoreArguments.damping_factor`` is None, damping =
    ``HEURISTIC_DAMPING_SCALE * mean(Lambda)`` with ``HEURISTIC_DAMPING_SCALE = 0.1`` (utils/constants.py:22),
    where Lambda is the already normalised (per-sequence mean) matrix of THAT module, so the heuristic damping
    differs per module. A given damping_factor is an absolute number added to the normalised Lambda (not scaled by
    anything); then the reciprocal is taken. The default damping_factor is 1e-8 (arguments.py:164-170).
(f) Which side is preconditioned, and scaling. The QUERY gradient is preconditioned: ``compute_pairwise_scores_
    with_loaders`` puts the modules in PRECONDITION_GRADIENT mode and prepares the factors
    (score/pairwise.py:181-195), backpropagates ``compute_measurement`` on the query batch (pairwise.py:233-234),
    and ``PreconditionTracker`` turns each query's per-sample gradient into
    ``Q_G ((Q_G^T dW_q Q_A) / (Lambda + damping)) Q_A^T`` (module/tracker/precondition.py:103-123,
    factor/config.py:342-353). The TRAINING gradients are raw: PAIRWISE_SCORE mode (score/dot_product.py:52-57),
    ``compute_train_loss(sample=False)`` backpropagated per batch (dot_product.py:88-93), and the score is
    ``einsum("qio,b...i,b...o->qb", preconditioned_query, g, a)`` (module/linear.py:112-122), i.e. the dot
    product with each training sequence's summed-loss gradient, summed over tracked modules
    (dot_product.py:104-118). There is no factor of the number of training examples (N) or tokens anywhere and no
    sign flip: ``score[q, i] = grad f(z_q)^T (F_ekfac + damping I)^-1 grad L(z_i)`` with F_ekfac the EK-FAC
    approximation of the MEAN over sequences of per-sequence (summed-over-tokens) gradient outer products.

So, compared with a Fisher normalised per token, kronfluence's Lambda is larger by the mean number of loss tokens
per sequence (roughly; exactly so only if token gradients were uncorrelated), and a fixed damping_factor means
something different in the two conventions.

Side effect of installing kronfluence 1.0.1: its wheel also installs top-level packages named ``tests`` and
``examples`` into site-packages. lancet's tests/ directory has no ``__init__.py`` (pytest imports its modules by
basename), so nothing here imports or is shadowed by them.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

FLOAT_DTYPE = torch.float64

_FACTORS_NAME = "ekfac"
_SCORES_NAME = "pairwise"
_ANALYSIS_NAME = "lancet_ref"


def default_module_names(model: nn.Module) -> list[str]:
    """Every ``nn.Linear`` inside ``model.model.layers``, as named by ``model.named_modules()``."""
    layers = model.model.layers
    prefix = next(name for name, module in model.named_modules() if module is layers)
    return [f"{prefix}.{name}" for name, module in layers.named_modules() if isinstance(module, nn.Linear)]


def pad_batch(examples: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pads ``input_ids`` with ``pad_id``, ``labels`` with -100, and builds a long attention mask."""
    width = max(len(ex["input_ids"]) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if len(ex["labels"]) != n:
            raise ValueError("input_ids and labels must have the same length")
        ids[row, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(ex["labels"], dtype=torch.long)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def summed_token_ce(model: nn.Module, batch: dict[str, torch.Tensor], sample: bool = False) -> torch.Tensor:
    """Sum over the batch of token cross-entropies at labels != -100 (HF shift: logits[:, :-1] vs labels[:, 1:]).

    With ``sample=True`` the targets at those positions are drawn from the model's own softmax (true Fisher), as in
    kronfluence's ``examples/openwebtext/task.py``.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1, :].reshape(-1, logits.size(-1))
    labels = batch["labels"][:, 1:].reshape(-1)
    if sample:
        with torch.no_grad():
            probs = torch.softmax(logits.detach(), dim=-1)
            sampled = torch.multinomial(probs, num_samples=1).flatten()
            labels = sampled.masked_fill(labels == -100, -100)
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


def make_task(module_names: list[str]) -> Any:
    from kronfluence.task import Task

    class SummedCETask(Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
            return summed_token_ce(model, batch, sample=sample)

        def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
            return summed_token_ce(model, batch, sample=False)

        def get_influence_tracked_modules(self) -> list[str]:
            return list(module_names)

        def get_attention_mask(self, batch: Any) -> torch.Tensor:
            return batch["attention_mask"]

    return SummedCETask()


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[dict]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]


def _float64_factor_args(use_empirical_fisher: bool) -> Any:
    from kronfluence.arguments import FactorArguments

    return FactorArguments(
        strategy="ekfac",
        use_empirical_fisher=use_empirical_fisher,
        covariance_max_examples=None,
        lambda_max_examples=None,
        activation_covariance_dtype=FLOAT_DTYPE,
        gradient_covariance_dtype=FLOAT_DTYPE,
        eigendecomposition_dtype=FLOAT_DTYPE,
        per_sample_gradient_dtype=FLOAT_DTYPE,
        lambda_dtype=FLOAT_DTYPE,
    )


def _fit(
    model: nn.Module,
    train: list[dict],
    *,
    use_empirical_fisher: bool,
    module_names: list[str] | None,
    output_dir: str,
    batch_size: int,
    seed: int,
) -> tuple[Any, dict[str, torch.Tensor]]:
    """Deep-copies the model to float64, wraps it, and fits all EK-FAC factors on ``train``."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.utils.dataset import DataLoaderKwargs

    names = list(module_names) if module_names is not None else default_module_names(model)
    if not names:
        raise ValueError("no module to track")
    task = make_task(names)
    wrapped = prepare_model(copy.deepcopy(model).to(FLOAT_DTYPE).eval(), task)
    device = next(wrapped.parameters()).device
    analyzer = Analyzer(
        analysis_name=_ANALYSIS_NAME,
        model=wrapped,
        task=task,
        cpu=device.type == "cpu",
        disable_tqdm=True,
        output_dir=str(Path(output_dir)),
        log_level=logging.WARNING,
    )
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=pad_batch))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        analyzer.fit_all_factors(
            factors_name=_FACTORS_NAME,
            dataset=ListDataset(train),
            per_device_batch_size=batch_size,
            factor_args=_float64_factor_args(use_empirical_fisher),
            overwrite_output_dir=True,
        )
    return analyzer, {"module_names": names}


def kronfluence_ekfac_scores(
    model: nn.Module,
    train: list[dict],
    queries: list[dict],
    *,
    damping: float | None,
    use_empirical_fisher: bool = True,
    module_names: list[str] | None = None,
    output_dir: str,
    batch_size: int = 4,
    seed: int = 0,
) -> torch.Tensor:
    """kronfluence EK-FAC pairwise scores, float64, shape [n_queries, n_train].

    ``score[q, i] = grad f(query_q)^T (F_ekfac + damping I)^-1 grad L(train_i)`` with f and L both the summed token
    cross-entropy over labels != -100 (see the module docstring for kronfluence's conventions). ``damping=None``
    uses kronfluence's heuristic 0.1 * mean(Lambda) per module. The caller's model is not modified.
    """
    from kronfluence.arguments import ScoreArguments

    analyzer, _ = _fit(
        model,
        train,
        use_empirical_fisher=use_empirical_fisher,
        module_names=module_names,
        output_dir=output_dir,
        batch_size=batch_size,
        seed=seed,
    )
    score_args = ScoreArguments(
        damping_factor=damping,
        query_gradient_svd_dtype=FLOAT_DTYPE,
        per_sample_gradient_dtype=FLOAT_DTYPE,
        precondition_dtype=FLOAT_DTYPE,
        score_dtype=FLOAT_DTYPE,
    )
    analyzer.compute_pairwise_scores(
        scores_name=_SCORES_NAME,
        factors_name=_FACTORS_NAME,
        query_dataset=ListDataset(queries),
        train_dataset=ListDataset(train),
        per_device_query_batch_size=batch_size,
        per_device_train_batch_size=batch_size,
        score_args=score_args,
        overwrite_output_dir=True,
    )
    scores = analyzer.load_pairwise_scores(scores_name=_SCORES_NAME)["all_modules"]
    return scores.to(FLOAT_DTYPE)


def kronfluence_factors(
    model: nn.Module,
    train: list[dict],
    *,
    use_empirical_fisher: bool = True,
    module_names: list[str] | None = None,
    output_dir: str,
    batch_size: int = 4,
    seed: int = 0,
) -> dict[str, dict[str, torch.Tensor]]:
    """kronfluence's saved EK-FAC factors per module name, exactly as stored (unnormalised).

    Each value is a dict with keys:
      ``activation_covariance`` [d_in(+1 with bias), same] raw sum over non-pad tokens of a a^T;
      ``num_activation_covariance_processed`` [1] int64, number of non-pad tokens;
      ``gradient_covariance`` [d_out, d_out] raw sum over all positions of g g^T (g = d summed loss / d output);
      ``num_gradient_covariance_processed`` [1] int64, number of non-pad tokens;
      ``activation_eigenvectors`` / ``activation_eigenvalues``, ``gradient_eigenvectors`` /
      ``gradient_eigenvalues``: eigh of the count-normalised, symmetrised covariances;
      ``lambda_matrix`` [d_out, d_in] raw sum over sequences of (Q_G^T dW Q_A)^2;
      ``num_lambda_processed`` [1] int64, number of sequences.
    """
    analyzer, info = _fit(
        model,
        train,
        use_empirical_fisher=use_empirical_fisher,
        module_names=module_names,
        output_dir=output_dir,
        batch_size=batch_size,
        seed=seed,
    )
    stored: dict[str, dict[str, torch.Tensor]] = {}
    for loaded in (
        analyzer.load_covariance_matrices(factors_name=_FACTORS_NAME),
        analyzer.load_eigendecomposition(factors_name=_FACTORS_NAME),
        analyzer.load_lambda_matrices(factors_name=_FACTORS_NAME),
    ):
        stored.update(loaded)
    return {name: {factor: per_module[name] for factor, per_module in stored.items()} for name in info["module_names"]}
