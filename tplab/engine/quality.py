"""Quality of a quantized model against the unquantized one, on golden prompts and held-out text.

Run on every rank (``launch(quality_rank_program, tp, ...)``); each rank loads
the checkpoint twice, once as it is and once quantized (:meth:`~tplab.model.TPCausalLM.quantize_`),
and measures:

* **token agreement**: the share of golden prompts whose greedy continuations
  are identical, and the mean index of the first differing new token (the
  continuation's length when none differs);
* **perplexity** on held-out text, exp(mean next-token negative log-likelihood),
  for both models;
* **KL**: the mean over every held-out position of KL(p_ref ‖ p_quant) of the
  next-token distributions, in nats.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from tplab.comm.group import Dist
from tplab.engine.generate import generate
from tplab.model.loading import from_pretrained
from tplab.specs.model import ModelConfig


def token_windows(ids: list[int], length: int) -> list[list[int]]:
    """Consecutive windows of ``length`` tokens (the last, shorter one dropped when under 2 tokens)."""
    return [ids[i:i + length] for i in range(0, len(ids), length) if len(ids[i:i + length]) >= 2]


def first_divergence(a: list[int], b: list[int]) -> int:
    """Index of the first differing token; the shorter length when one is a prefix of the other."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@torch.no_grad()
def _scores(model, windows: list[list[int]]) -> list[torch.Tensor]:
    """Log-probabilities (T-1, V) of each window's next tokens, in float32."""
    return [F.log_softmax(model.score(torch.tensor([w], device=model.device))[0, :-1].float(), dim=-1).cpu()
            for w in windows]


def quality_rank_program(dist: Dist, model: str | Path | ModelConfig, quant: str, prompts: list[list[int]],
                         max_new_tokens: int, windows: list[list[int]], dtype: torch.dtype | str | None = None,
                         expert_dispatch: str = "all-reduce") -> dict:
    """The quantized model against the unquantized one (see the module docstring); the same dict on every rank.
    ``expert_dispatch``: a mixture's, with whole experts (``launch(..., ep=tp)``)."""
    reference = from_pretrained(model, dist, dtype=dtype, expert_dispatch=expert_dispatch)
    quantized = from_pretrained(model, dist, dtype=dtype, quant=quant, expert_dispatch=expert_dispatch)
    ref_tokens = generate(reference, prompts, max_new_tokens, eos_token_ids=()).tokens
    q_tokens = generate(quantized, prompts, max_new_tokens, eos_token_ids=()).tokens
    divergence = [first_divergence(a, b) for a, b in zip(ref_tokens, q_tokens)]
    nll_ref = nll_q = kl = 0.0
    positions = 0
    for window, ref_logp, q_logp in zip(windows, _scores(reference, windows), _scores(quantized, windows)):
        targets = torch.tensor(window[1:])
        nll_ref -= ref_logp.gather(1, targets[:, None]).sum().item()
        nll_q -= q_logp.gather(1, targets[:, None]).sum().item()
        kl += (ref_logp.exp() * (ref_logp - q_logp)).sum().item()
        positions += len(window) - 1
    return {
        "quant": quant, "tp": dist.world_size, "prompts": len(prompts), "max_new_tokens": max_new_tokens,
        "token_agreement": sum(a == b for a, b in zip(ref_tokens, q_tokens)) / len(prompts),
        "mean_first_divergence": sum(divergence) / len(divergence),
        "perplexity": float(torch.tensor(nll_q / positions).exp()),
        "perplexity_reference": float(torch.tensor(nll_ref / positions).exp()),
        "kl_mean": kl / positions, "positions": positions,
        "weight_bytes": quantized.parameter_bytes(), "weight_bytes_reference": reference.parameter_bytes(),
        "tokens": q_tokens, "tokens_reference": ref_tokens,
    }
