"""Causal-LM choice scoring: sorted batches with each distinct context computed once (its
continuations packed after it, under a 4-D mask) give the log-likelihoods of scoring each
(context, continuation) alone."""

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


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_batched_scoring_equals_scoring_each_request_alone(attention: str) -> None:
    cfg = compose(["model=tiny-causal"])
    tokenizer = load_tokenizer(cfg.model)
    torch.manual_seed(0)
    model = load_model(cfg.model, 1, "causal_lm").eval()
    model.config._attn_implementation = attention
    gen = torch.Generator().manual_seed(1)
    requests = []
    for _ in range(7):
        context = torch.randint(1000, 2000, (int(torch.randint(3, 40, (1,), generator=gen)),), generator=gen).tolist()
        for k in range(3):
            requests.append((context, torch.randint(1000, 2000, (k + 1,), generator=gen).tolist()))
    requests.append((requests[1][0], requests[1][1][:1]))  # a continuation that is a prefix of another
    requests += requests[:4]  # repeated requests are scored once
    shapes = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: shapes.append(kw["input_ids"].shape), with_kwargs=True)
    batched = continuation_loglikelihoods(model, tokenizer.pad_token_id, requests, batch_size=4)
    hook.remove()
    distinct = {tuple(c): {tuple(x) for c2, x in requests if c2 == c} for c, _ in requests}
    assert [rows for rows, _ in shapes] == [4, 3]  # one row per distinct context
    longest = sorted((len(c) + sum(map(len, xs)) for c, xs in distinct.items()), reverse=True)
    assert [width for _, width in shapes] == [longest[0], longest[4]]  # each batch padded to its own longest
    with torch.no_grad():
        reference = [alone(model, c, x) for c, x in requests]
    assert batched == pytest.approx(reference, abs=1e-5)


def test_an_empty_context_is_refused() -> None:
    with pytest.raises(ValueError, match="non-empty context"):
        continuation_loglikelihoods(torch.nn.Linear(1, 1), 0, [([], [5])], 4)
