import time

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

from lancet.constants import DEFAULT_MODEL
from lancet.data.records import Record
from lancet.errors import ModelError
from lancet.models.generate import generate
from lancet.models.loading import load_model, load_tokenizer


def _save(model, tokenizer, path):
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_load_local_dir_roundtrip(tmp_path, tiny_tokenizer, make):
    model = make(len(tiny_tokenizer))
    spec = _save(model, tiny_tokenizer, tmp_path / "m")
    loaded, tok = load_model(spec)
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert tok.pad_token is not None
    assert load_tokenizer(spec).vocab_size == tiny_tokenizer.vocab_size


def test_refuses_pickle_weights(tmp_path, tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer))
    path = tmp_path / "pickled"
    model.save_pretrained(path, safe_serialization=False)
    for f in path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelError, match="no safetensors weights"):
        load_model(str(path))


def test_bad_specs(tmp_path):
    with pytest.raises(ModelError, match="GGUF file not found"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


def test_peft_adapter_resolves_base(tmp_path, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(len(tiny_tokenizer))
    base_dir = _save(base, tiny_tokenizer, tmp_path / "base")
    peft_model = get_peft_model(tiny_llama(len(tiny_tokenizer)), LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.1)  # make the adapter change the output
    peft_model.peft_config["default"].base_model_name_or_path = base_dir
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded, _ = load_model(str(tmp_path / "adapter"))
    x = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, peft_model(x).logits, atol=1e-6)
        assert not torch.allclose(loaded(x).logits, base(x).logits, atol=1e-4)


def test_generate_batched_matches_single(tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer))
    prompts = [Record(prompt="hello"), Record(prompt="What is the capital of France? Paris"), Record(prompt="why")]
    batched = generate(model, tiny_tokenizer, prompts, max_new_tokens=5, batch_size=3, progress=False)
    single = [generate(model, tiny_tokenizer, [p], max_new_tokens=5, progress=False)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(a, str) for a in batched)


def test_smoke_embedded_default_model():
    """The real SmolLM2-135M-Instruct: converted once from GGUF, then loaded from the safetensors cache."""
    load_model(DEFAULT_MODEL)  # make sure the cache exists
    t0 = time.perf_counter()
    model, tok = load_model(DEFAULT_MODEL)
    assert time.perf_counter() - t0 < 10
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    answer = generate(model, tok, [Record(prompt="What is the capital of France?")], max_new_tokens=12, progress=False)[
        0
    ]
    assert "Paris" in answer
