"""A sparse mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE), its experts split over the TP ranks or placed whole.

A token x (hidden h) meets E experts, each a SwiGLU MLP of width I_e. The router R (E x h) scores them:

    p = softmax(x R^T)  (float32),   T = the k experts of largest p,   w_e = p_e (/ sum_{j in T} p_j when normalised)
    y = sum_{e in T} w_e · down_e(silu(gate_e(x)) * up_e(x))  [+ sigmoid(x g) · shared(x), Qwen2-MoE's shared expert]

Mixtral always normalises (its softmax over the top-k logits is the same thing); Qwen does when ``norm_topk_prob``.
No token is dropped (no capacity limit), so the result is exactly Hugging Face's. Three ways to place the experts
on the tp ranks of a stage (``launch(..., ep=E)`` and the ``dispatch`` chosen at load):

* **TP of the experts** (ep = 1): rank r holds rows [r I_e/tp, (r+1) I_e/tp) of every expert's gate and up and
  the matching columns of its down. Each rank adds w_e · down_{e,r}(...) over its tokens' experts, a partial sum
  (:meth:`tplab.layers.linear.RowParallelLinear.partial`), and one all-reduce per layer completes it: the same
  2 · layers + 1 all-reduces per forward pass as a dense model, whatever the routing.
* **EP, tokens replicated** (ep = tp, dispatch "all-reduce"): rank r holds experts [r E/ep, (r+1) E/ep) whole.
  After attention's all-reduce every rank has every token, so each adds w_e · expert_e(x) for the tokens routed
  to its own experts and the same one all-reduce sums the ranks' shares: as many bytes as TP of the experts, but
  each rank's work is what the router sent to its experts (the load imbalance).
* **EP, tokens partitioned** (ep = tp, dispatch "all-to-all"): rank r takes its own contiguous ⌈N/ep⌉ of the N
  tokens, routes them, and sends each (token, expert) pair to the rank that holds the expert: one ``all_to_all``
  of expert ids, one of hidden vectors (dispatch); the experts' outputs come back by a third (combine), are
  weighted and summed at the token's rank, and one all-gather gives every rank every token again for the next
  attention. Per layer and rank that is about 2 k N h / ep elements of all-to-all plus N h of all-gather, against
  N h for one all-reduce: it pays where attention is data parallel (tokens already partitioned, no all-gather).
  A shared expert is then held whole on every rank and run on the rank's own tokens.

The router is small and replicated, so every rank routes a token alike. ``tokens_per_expert`` counts the
(token, expert) pairs this rank's experts computed (what :mod:`tplab.engine.generate` reports per step).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tplab.checkpoint.sources import TensorSource
from tplab.comm.group import Dist
from tplab.comm.transports import SoloTransport
from tplab.layers.linear import MergedColumnParallelLinear, RowParallelLinear, load_row_parallel
from tplab.specs.model import ModelConfig
from tplab.specs.sharding import check_dispatch

# (the block's name under model.layers.{i}, each expert's gate, up and down) as each family's files spell them
CHECKPOINT_NAMES = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
                    "qwen": ("mlp", ("gate_proj", "up_proj", "down_proj"))}


def checkpoint_names(model_type: str) -> tuple[str, tuple[str, str, str]]:
    """(block name, (gate, up, down) names) of a mixture's files: Mixtral's, or the Qwen families'."""
    return CHECKPOINT_NAMES["mixtral" if model_type == "mixtral" else "qwen"]


def whole(dist: Dist) -> Dist:
    """A group of one on ``dist``'s device: layers built on it hold whole matrices (an expert placed whole)."""
    return Dist(0, 1, dist.device, SoloTransport(), dist.time_collectives, group="expert")


class TPExpert(nn.Module):
    """One SwiGLU expert's shard: gate/up column parallel (merged), down row parallel, reduced by the caller."""

    def __init__(self, hidden: int, width: int, dist: Dist, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.gate_up = MergedColumnParallelLinear(hidden, width, dist, dtype=dtype)
        self.down = RowParallelLinear(width, hidden, dist, bias=False, dtype=dtype)

    def load(self, source: TensorSource, prefix: str, names: tuple[str, str, str]) -> None:
        gate, up, down = names
        self.gate_up.load(source, f"{prefix}.{gate}", f"{prefix}.{up}")
        load_row_parallel(self.down, source, f"{prefix}.{down}")

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """down_r(silu(gate_r(x)) * up_r(x)): this rank's term of the expert's output (all of it when whole)."""
        gate, up = self.gate_up(x)
        return self.down.partial(F.silu(gate) * up)


class TPMoE(nn.Module):
    """The sparse MoE block (see the module docstring): a replicated router, E experts split over the TP ranks or
    E/ep whole ones on each, and one all-reduce (or, dispatched, three all-to-alls and an all-gather)."""

    def __init__(self, config: ModelConfig, dist: Dist, dtype: torch.dtype | None,
                 dispatch: str = "all-reduce") -> None:
        super().__init__()
        self.ep = dist.grid.ep if dist.grid is not None else whole(dist)
        check_dispatch(dispatch, dist.world_size, self.ep.world_size)
        self.dist, self.dispatch, self.top_k = dist, dispatch, config.experts_per_token
        self.normalize = config.normalize_expert_weights
        self.checkpoint_name, self.expert_names = checkpoint_names(config.model_type)
        hidden, num = config.hidden_size, config.num_experts
        per_rank = num // self.ep.world_size
        self.first_expert = self.ep.rank * per_rank
        self.router = nn.Parameter(torch.empty(num, hidden, dtype=dtype, device=dist.device), requires_grad=False)
        expert_dist = dist if self.ep.world_size == 1 else whole(dist)
        self.experts = nn.ModuleList(TPExpert(hidden, config.expert_intermediate_size, expert_dist, dtype)
                                     for _ in range(per_rank))
        self.shared = self.shared_gate = None
        if config.shared_expert_intermediate_size:
            self.shared = TPExpert(hidden, config.shared_expert_intermediate_size,
                                   whole(dist) if dispatch == "all-to-all" else dist, dtype)
            self.shared_gate = nn.Parameter(torch.empty(1, hidden, dtype=dtype, device=dist.device),
                                            requires_grad=False)
        self.register_buffer("tokens_per_expert", torch.zeros(num, dtype=torch.int64, device=dist.device),
                             persistent=False)

    @property
    def local_experts(self) -> range:
        """The experts (by index) this rank computes: all of them, in slices, at ep = 1; its own E/ep otherwise."""
        return range(self.first_expert, self.first_expert + len(self.experts))

    def load(self, source: TensorSource, prefix: str) -> None:
        source.copy_into(self.router.data, f"{prefix}.gate.weight")
        for e, expert in zip(self.local_experts, self.experts):
            expert.load(source, f"{prefix}.experts.{e}", self.expert_names)
        if self.shared is not None:
            self.shared.load(source, f"{prefix}.shared_expert", CHECKPOINT_NAMES["qwen"][1])
            source.copy_into(self.shared_gate.data, f"{prefix}.shared_expert_gate.weight")

    def linears(self) -> list[nn.Module]:
        """This rank's experts' gate/up and down, and the shared expert's (what weight formats apply to; the router
        and the shared expert's gate stay as they are)."""
        experts = [*self.experts, *([self.shared] if self.shared is not None else [])]
        return [m for expert in experts for m in (expert.gate_up, expert.down)]

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights (tokens, k) in float32, expert ids (tokens, k)) for the flat tokens ``x`` (tokens, hidden)."""
        probs = F.softmax(F.linear(x, self.router).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        return (weights / weights.sum(dim=-1, keepdim=True) if self.normalize else weights), chosen

    def shared_output(self, x: torch.Tensor) -> torch.Tensor:
        """sigmoid(x g) · shared(x) (this rank's term of it when the shared expert is split), or zeros."""
        if self.shared is None:
            return torch.zeros_like(x)
        return torch.sigmoid(F.linear(x, self.shared_gate)) * self.shared.partial(x)

    def add_routed(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor | None,
                   out: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """out[r_i] += w_i · expert_{ids_i}(x[r_i]) for every pair i whose expert is this rank's, with r = ``rows``
        (None: r_i = i) and w = ``weights`` (None: 1); counted in ``tokens_per_expert``."""
        for e, expert in zip(self.local_experts, self.experts):
            (pairs,) = torch.where(expert_ids == e)
            if pairs.numel():
                at = pairs if rows is None else rows[pairs]
                y = expert.partial(x[at])
                out.index_add_(0, at, (y if weights is None else y * weights[pairs, None]).to(out.dtype))
        local = self.local_experts
        counts = torch.bincount(expert_ids, minlength=len(self.tokens_per_expert))
        self.tokens_per_expert[local.start:local.stop] += counts[local.start:local.stop]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.dispatch == "all-to-all":
            return self.exchanged(flat).reshape(x.shape)
        weights, chosen = self.route(flat)
        out = self.shared_output(flat)
        token = torch.arange(flat.shape[0], device=flat.device).repeat_interleave(self.top_k)
        self.add_routed(flat, chosen.flatten(), weights.flatten(), out, rows=token)
        return self.dist.all_reduce(out).reshape(x.shape)

    def exchanged(self, flat: torch.Tensor) -> torch.Tensor:
        """The all-to-all form: this rank's ⌈N/ep⌉ tokens routed, dispatched to their experts' ranks, computed,
        combined back and weighted here, then all-gathered (see the module docstring)."""
        ep, n = self.ep, flat.shape[0]
        per = -(-n // ep.world_size)
        mine = flat[ep.rank * per:(ep.rank + 1) * per]
        weights, chosen = self.route(mine)
        owner = chosen.flatten() // len(self.experts)  # the ep rank that holds each pair's expert
        order = torch.argsort(owner, stable=True)
        token = torch.arange(mine.shape[0], device=flat.device).repeat_interleave(self.top_k)[order]
        sizes = torch.bincount(owner, minlength=ep.world_size).tolist()
        expert_ids = torch.cat(ep.all_to_all(list(chosen.flatten()[order].split(sizes))))
        received = ep.all_to_all(list(mine[token].split(sizes)))
        arrived = torch.cat(received)
        computed = torch.zeros_like(arrived)
        self.add_routed(arrived, expert_ids, None, computed)
        back = torch.cat(ep.all_to_all(list(computed.split([len(r) for r in received]))))
        out = torch.zeros(per, flat.shape[1], dtype=flat.dtype, device=flat.device)
        out[:mine.shape[0]] = self.shared_output(mine)
        out.index_add_(0, token, (back * weights.flatten()[order, None]).to(out.dtype))
        return ep.all_gather(out, dim=0)[:n]


def unfused_experts(state: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """An in-memory state dict under the names its checkpoint has on disk. transformers 5 keeps a mixture's
    experts fused, ``mlp.experts.gate_up_proj`` (E, 2I, h: gate rows then up rows) and ``mlp.experts.down_proj``
    (E, h, I), and the router as ``mlp.gate``; the files name them per expert (:data:`CHECKPOINT_NAMES`: Mixtral's
    ``block_sparse_moe.experts.{e}.w1`` (gate), ``w3`` (up), ``w2`` (down), the Qwen families'
    ``mlp.experts.{e}.gate_proj``, ...). Dense models' names, and the shared expert's, pass unchanged."""
    block, (gate_name, up_name, down_name) = checkpoint_names(model_type)
    out = {}
    for name, tensor in state.items():
        prefix, dot, rest = name.partition(".mlp.")
        if not dot or not (rest.startswith("experts.") or rest == "gate.weight"):
            out[name] = tensor
        elif rest == "gate.weight":
            out[f"{prefix}.{block}.gate.weight"] = tensor
        elif rest == "experts.gate_up_proj":
            for e, gate_up in enumerate(tensor):
                gate, up = gate_up.chunk(2, dim=0)
                out[f"{prefix}.{block}.experts.{e}.{gate_name}.weight"] = gate
                out[f"{prefix}.{block}.experts.{e}.{up_name}.weight"] = up
        elif rest == "experts.down_proj":
            for e, down in enumerate(tensor):
                out[f"{prefix}.{block}.experts.{e}.{down_name}.weight"] = down
        else:
            raise ValueError(f"{name}: an expert tensor tplab does not know how to read")
    return out
