"""Which layers influence is computed over, and hooks that capture their inputs and output gradients.

For a tracked linear layer y_t = W a_t (+ b), the gradient of a sequence's loss is G = sum_t g_t a_t^T, with a_t
the layer input at token t and g_t = dL/dy_t. Every estimator works from (a, g) pairs, never from parameter
.grad, so the backward pass can skip the weight-gradient products entirely.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lancet.errors import LancetError

BLOCK_PATTERN = re.compile(r"(^|\.)(layers|h|blocks|block|decoder\.layers)\.\d+\.")


@dataclass
class TrackedLayer:
    name: str
    module: nn.Module
    in_features: int  # including the appended 1 for a bias
    out_features: int
    has_bias: bool
    transposed: bool  # GPT-2 Conv1D stores its weight as [in, out]

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _describe(name: str, module: nn.Module) -> TrackedLayer | None:
    if isinstance(module, nn.Linear):
        bias = module.bias is not None
        return TrackedLayer(name, module, module.in_features + bias, module.out_features, bias, False)
    if _is_conv1d(module):
        n_in, n_out = module.weight.shape
        bias = module.bias is not None
        return TrackedLayer(name, module, n_in + bias, n_out, bias, True)
    return None


def find_tracked_layers(model: nn.Module, modules: str | Sequence[str] = "blocks") -> list[TrackedLayer]:
    """``"blocks"``: every Linear/Conv1D inside the transformer blocks (the default). ``"blocks+lm_head"`` adds
    the output layer. Otherwise a list of regular expressions matched against module names."""
    base = getattr(model, "get_base_model", lambda: model)()  # a PEFT model tracks its base layers
    found = []
    for name, module in base.named_modules():
        layer = _describe(name, module)
        if layer is None or "lora_" in name:
            continue
        if isinstance(modules, str) and modules in ("blocks", "blocks+lm_head"):
            keep = bool(BLOCK_PATTERN.search(name)) or (modules == "blocks+lm_head" and name.endswith("lm_head"))
        else:
            patterns = [modules] if isinstance(modules, str) else list(modules)
            keep = any(re.fullmatch(p, name) or re.search(p, name) for p in patterns)
        if keep:
            found.append(layer)
    if not found:
        raise LancetError(f"no linear layers matched modules={modules!r} in {type(base).__name__}")
    return found


GradCallback = Callable[[TrackedLayer, torch.Tensor, torch.Tensor], None]


class Capture:
    """Context manager: on every backward through a tracked layer, calls ``on_grad(layer, a, g)`` with
    a: [B, T, in] (bias-augmented with a column of ones) and g: [B, T, out], both detached.

    With several backward passes over one forward (``retain_graph``), the callback fires once per pass with the
    same ``a``. Parameters are frozen while capturing and the graph is started at the input embeddings instead,
    so autograd computes no weight gradients (lancet contracts (a, g) itself).
    """

    def __init__(self, model: nn.Module, layers: Sequence[TrackedLayer], on_grad: GradCallback):
        self.model, self.layers, self.on_grad = model, list(layers), on_grad
        self._handles: list = []
        self._flags: list[tuple[nn.Parameter, bool]] = []

    def _forward_hook(self, layer: TrackedLayer):
        def hook(module, inputs, output):
            a = inputs[0].detach()
            if layer.has_bias:
                a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
            if output.requires_grad:
                output.register_hook(lambda g: self.on_grad(layer, a, g.detach()))

        return hook

    @staticmethod
    def _start_graph(module, inputs, output):
        return output.detach().requires_grad_(True)

    def __enter__(self) -> Capture:
        for p in self.model.parameters():
            self._flags.append((p, p.requires_grad))
            p.requires_grad_(False)
        emb = self.model.get_input_embeddings()
        self._handles.append(emb.register_forward_hook(self._start_graph))
        for layer in self.layers:
            self._handles.append(layer.module.register_forward_hook(self._forward_hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for p, flag in self._flags:
            p.requires_grad_(flag)
        self._handles, self._flags = [], []
