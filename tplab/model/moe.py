"""Mixtral's sparse mixture of experts, each expert split over the TP ranks (tensor parallelism of the experts).

A token x (hidden h) meets E experts, each a SwiGLU MLP of width I. The router R (E x h) scores them:

    p = softmax(x R^T)  (float32),   T = the k experts of largest p,   w_e = p_e / sum_{j in T} p_j
    y = sum_{e in T} w_e · down_e(silu(gate_e(x)) * up_e(x))

No token is dropped (no capacity limit), so the result is exactly Hugging Face's.

TP of the experts splits every expert like the dense MLP: rank r holds rows [r I/tp, (r+1) I/tp) of each expert's
gate and up and the matching columns of its down. Each rank adds w_e · down_{e,r}(...) over its tokens' experts, a
partial sum (:meth:`tplab.layers.linear.RowParallelLinear.partial`), and one all-reduce per layer completes it:
the same 2 · layers + 1 all-reduces per forward pass as a dense model, whatever the routing. The router is small
and replicated, so every rank routes every token alike.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tplab.checkpoint.sources import TensorSource
from tplab.comm.group import Dist
from tplab.layers.linear import MergedColumnParallelLinear, RowParallelLinear, load_row_parallel
from tplab.specs.model import ModelConfig


class TPExpert(nn.Module):
    """One expert's shard: gate/up column parallel (merged), down row parallel, reduced by the caller."""

    def __init__(self, config: ModelConfig, dist: Dist, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.gate_up = MergedColumnParallelLinear(config.hidden_size, config.intermediate_size, dist, dtype=dtype)
        self.down = RowParallelLinear(config.intermediate_size, config.hidden_size, dist, bias=False, dtype=dtype)

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """down_r(silu(gate_r(x)) * up_r(x)): this rank's term of the expert's output."""
        gate, up = self.gate_up(x)
        return self.down.partial(F.silu(gate) * up)


class TPMoE(nn.Module):
    """The sparse MoE block (see the module docstring): a replicated router, E experts split over the TP ranks,
    one all-reduce."""

    checkpoint_name = "block_sparse_moe"  # what Mixtral's checkpoints call the block, under model.layers.{i}

    def __init__(self, config: ModelConfig, dist: Dist, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.dist, self.top_k = dist, config.experts_per_token
        self.router = nn.Parameter(torch.empty(config.num_experts, config.hidden_size, dtype=dtype,
                                               device=dist.device), requires_grad=False)
        self.experts = nn.ModuleList(TPExpert(config, dist, dtype) for _ in range(config.num_experts))

    def load(self, source: TensorSource, prefix: str) -> None:
        source.copy_into(self.router.data, f"{prefix}.gate.weight")
        for e, expert in enumerate(self.experts):  # Mixtral's w1 is the gate, w3 the up, w2 the down projection
            expert.gate_up.load(source, f"{prefix}.experts.{e}.w1", f"{prefix}.experts.{e}.w3")
            load_row_parallel(expert.down, source, f"{prefix}.experts.{e}.w2")

    def linears(self) -> list[nn.Module]:
        """Every expert's gate/up and down (what weight formats apply to; the router stays as it is)."""
        return [m for expert in self.experts for m in (expert.gate_up, expert.down)]

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights (tokens, k) in float32, expert ids (tokens, k)) for the flat tokens ``x`` (tokens, hidden)."""
        probs = F.softmax(F.linear(x, self.router).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = self.route(flat)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel():
                y = expert.partial(flat[token]) * weights[token, slot, None]
                out.index_add_(0, token, y.to(out.dtype))
        return self.dist.all_reduce(out).reshape(x.shape)


def unfused_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An in-memory state dict under the names its checkpoint has on disk. transformers 5 keeps a mixture's
    experts fused, ``mlp.experts.gate_up_proj`` (E, 2I, h: gate rows then up rows) and ``mlp.experts.down_proj``
    (E, h, I), and the router as ``mlp.gate``; Mixtral's files name them ``block_sparse_moe.experts.{e}.w1`` (gate),
    ``w3`` (up), ``w2`` (down) and ``block_sparse_moe.gate``. Dense models' names pass unchanged."""
    out = {}
    for name, tensor in state.items():
        prefix, dot, rest = name.partition(".mlp.")
        if not dot or not (rest.startswith("experts.") or rest == "gate.weight"):
            out[name] = tensor
        elif rest == "gate.weight":
            out[f"{prefix}.{TPMoE.checkpoint_name}.gate.weight"] = tensor
        elif rest == "experts.gate_up_proj":
            for e, gate_up in enumerate(tensor):
                gate, up = gate_up.chunk(2, dim=0)
                out[f"{prefix}.{TPMoE.checkpoint_name}.experts.{e}.w1.weight"] = gate
                out[f"{prefix}.{TPMoE.checkpoint_name}.experts.{e}.w3.weight"] = up
        elif rest == "experts.down_proj":
            for e, down in enumerate(tensor):
                out[f"{prefix}.{TPMoE.checkpoint_name}.experts.{e}.w2.weight"] = down
        else:
            raise ValueError(f"{name}: an expert tensor tplab does not know how to read")
    return out
