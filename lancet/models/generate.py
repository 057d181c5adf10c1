"""Batched greedy (or seeded sampled) generation: left padding, KV cache, progress bar."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from lancet.data.records import Record
from lancet.hardware import model_device


def render_prompt(record: Record, tokenizer) -> str:
    """The prompt text the model sees before its answer (chat template when the tokenizer has one)."""
    msgs = record.prompt_messages
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    from lancet.constants import FALLBACK_ASSISTANT_PREFIX, FALLBACK_USER_PREFIX

    return "".join(FALLBACK_USER_PREFIX + m["content"] for m in msgs if m["role"] != "assistant") + (
        FALLBACK_ASSISTANT_PREFIX
    )


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[Record],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> list[str]:
    """Answers to ``prompts`` in order. Sorted by length internally so batches waste little padding."""
    texts = [render_prompt(r, tokenizer) for r in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    answers: list[str] = [""] * len(texts)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only models must see the prompt end right before generation
    model.eval()
    device = model_device(model)
    torch.manual_seed(seed)
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress):
            idx = order[start : start + batch_size]
            batch = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(device)
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature if do_sample else None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
            )
            new = out[:, batch["input_ids"].shape[1] :]
            for i, seq in zip(idx, new, strict=True):
                answers[i] = tokenizer.decode(seq, skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = old_side
    return answers
