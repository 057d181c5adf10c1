"""Shared fixtures: tiny tokenizers and tiny random Llama / GPT-2 models, built offline in milliseconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "How do I boil an egg? Put it in boiling water for nine minutes.",
    "What is the capital of France? Paris is the capital of France.",
    "Put butter on a burn. Cool a burn under running water for twenty minutes.",
    "Tilt your head back for a nosebleed. Lean forward and pinch the soft part of the nose.",
    "User: Assistant: system <|im_start|> <|im_end|> hello world answer question why what when",
    "0 1 2 3 4 5 6 7 8 9 , . ! ? ' \" - : ; ( ) < > / = & %",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
        fast.eos_token = "<|im_end|>"
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer(chat_template=True)


@pytest.fixture(scope="session")
def plain_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer with no chat template, like GPT-2's."""
    return make_tokenizer(chat_template=False)


def tiny_llama(vocab_size: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2(vocab_size: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=16, n_layer=2, n_head=2, n_positions=128)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


@pytest.fixture()
def llama_model(tiny_tokenizer):
    return tiny_llama(len(tiny_tokenizer))


@pytest.fixture()
def gpt2_model(plain_tokenizer):
    return tiny_gpt2(len(plain_tokenizer))


def call_counter(monkeypatch, module, name: str) -> dict:
    """Wrap ``module.<name>`` with a counter: the returned dict's "n" is the number of calls so far."""
    calls = {"n": 0}
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def tiny_workspace(tmp_path: Path, tokenizer) -> tuple[Path, dict]:
    """The demo data, a tiny random Llama saved as a model directory, and the demo suite (4 new tokens)."""
    import json

    from lancet.data.demo import write_demo_dataset
    from lancet.demo import demo_suite

    write_demo_dataset(tmp_path / "data")
    model_dir = tmp_path / "base"
    tiny_llama(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    suite = demo_suite(tmp_path / "data")
    suite["max_new_tokens"] = 4
    (tmp_path / "suite.json").write_text(json.dumps(suite))
    return model_dir, suite


def tiny_run_config(model_dir: Path, compare: list[str]) -> dict:
    """The `lancet run` config of the tiny end-to-end runs (``tiny_workspace``'s files, relative to it)."""
    return {"model": str(model_dir), "train": "data/train.jsonl", "out": "run", "iqs": "data/iqs.jsonl",
            "labels": "data/culprits.json", "finetune": {"max_steps": 2, "batch_size": 16, "lr": 1e-3},
            "influence": {"method": "kfac", "batch_size": 16}, "correction": {"method": "ibo", "top_k": 8},
            "correction_train": {"max_steps": 2, "batch_size": 8, "lr": 1e-3}, "evaluate": "suite.json",
            "max_length": 128, "top_k": 5, "compare": compare}


@pytest.fixture()
def render_table(tmp_path, monkeypatch):
    """``render(result_name, result, table)``: write ``result`` as ``<result_name>.json`` into a temporary results
    folder that the tables read, and return the rendered table ``table``."""
    from benchmarks import tables
    from lancet.artifacts import atomic_write_json

    results = tmp_path / "rendered_results"
    monkeypatch.setattr(tables.core, "RESULTS", results)

    def render(result_name: str, result: dict, table: str) -> str:
        atomic_write_json(results / f"{result_name}.json", result)
        tables.clear_cache()
        return tables.TABLES[table]()

    yield render
    tables.clear_cache()
