"""Causal-LM choice scoring: sorted, deduplicated batches give the log-likelihoods of scoring
each (context, continuation) alone, one forward row per distinct sequence."""

from __future__ import annotations

import pytest
import torch

from experiments.causal import continuation_loglikelihoods
from experiments.config import compose
from experiments.models import load_model, load_tokenizer


def alone(model: torch.nn.Module, context: list[int], continuation: list[int]) -> float:
    """One unpadded forward over context + continuation, full logits (a batch of one)."""
    ids = torch.tensor([context + continuation])
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return sum(logprobs[len(context) + t - 1, token].item() for t, token in enumerate(continuation))


def test_batched_scoring_equals_scoring_each_request_alone() -> None:
    cfg = compose(["model=tiny-causal"])
    tokenizer = load_tokenizer(cfg.model)
    torch.manual_seed(0)
    model = load_model(cfg.model, 1, "causal_lm").eval()
    gen = torch.Generator().manual_seed(1)
    requests = []
    for _ in range(7):
        context = torch.randint(1000, 2000, (int(torch.randint(3, 40, (1,), generator=gen)),), generator=gen).tolist()
        for k in range(3):
            requests.append((context, torch.randint(1000, 2000, (k + 1,), generator=gen).tolist()))
    requests += requests[:4]  # repeated requests are scored once
    rows = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    batched = continuation_loglikelihoods(model, tokenizer.pad_token_id, requests, batch_size=4)
    hook.remove()
    assert sum(rows) == len(requests) - 4 and max(rows) == 4
    with torch.no_grad():
        reference = [alone(model, c, x) for c, x in requests]
    assert batched == pytest.approx(reference, abs=1e-5)


def test_an_empty_context_is_refused() -> None:
    with pytest.raises(ValueError, match="non-empty context"):
        continuation_loglikelihoods(torch.nn.Linear(1, 1), 0, [([], [5])], 4)
