"""Rank programs (and their Hugging Face references) that notebooks 03-05 launch.

* :func:`decoder_block_rank`: one TP decoder block, built from an HF
  checkpoint's weights, on a left-padded batch. It returns the attention,
  MLP and block outputs and the block's collectives, so a notebook can check
  h = x + attn(norm(x)), out = h + mlp(norm(h)) against the HF layer and count
  exactly 2 all-reduces (one after o_proj, one after down_proj).
* :func:`hf_block_reference`: the same layer's tensors from the HF model,
  each prompt run alone.
* :func:`prefill_cache_rank`: prefill a TP model and hand back this rank's KV cache.
* :func:`timed_generation_rank`: the generation loop and a timeline of its collectives (each record's start
  and duration).

They live in the package so that gloo ranks (spawned processes) can import them.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from tplab.checkpoint.sources import StateDictSource
from tplab.comm.group import Dist
from tplab.engine.generate import GenerationResult, generate, left_pad
from tplab.layers.rope import RotaryEmbedding
from tplab.model.attention import attention_mask
from tplab.model.decoder import TPDecoderLayer
from tplab.model.kv_cache import KVCache
from tplab.model.loading import from_pretrained
from tplab.specs.model import ModelConfig

SUBLAYERS = ("input", "attn", "mlp", "output")


# --- one decoder block ---------------------------------------------------------
def layer_state(hf_model: torch.nn.Module, layer: int) -> dict[str, torch.Tensor]:
    """The HF tensors of decoder layer ``layer`` (names keep their ``model.layers.{layer}.`` prefix)."""
    prefix = f"model.layers.{layer}."
    return {k: v.detach().clone() for k, v in hf_model.state_dict().items() if k.startswith(prefix)}


def pad_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """Left-pad per-prompt (T_b, hidden) tensors with zeros into one (batch, T, hidden) batch."""
    longest = max(r.shape[0] for r in rows)
    return torch.stack([torch.cat([r.new_zeros(longest - r.shape[0], r.shape[1]), r]) for r in rows])


def _capture_outputs(modules: dict[str, torch.nn.Module]) -> tuple[dict[str, torch.Tensor], list]:
    """Forward hooks that keep each module's output (the first element when it returns a tuple)."""
    captured: dict[str, torch.Tensor] = {}

    def hook(name):
        def keep(module, args, output):
            captured[name] = (output[0] if isinstance(output, tuple) else output).detach().clone()
        return keep

    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    return captured, handles


def decoder_block_rank(dist: Dist, config: ModelConfig, state: dict[str, torch.Tensor], layer: int,
                       prompts: list[list[int]], hidden: torch.Tensor) -> dict:
    """Run this rank's shard of decoder layer ``layer`` on ``hidden`` (batch, T, hidden), left-padded.

    ``prompts`` give the rows' lengths (their padding and RoPE positions).
    Returns ``attn``, ``mlp``, ``output`` (batch, T, hidden: full on every rank
    after the all-reduces), the heads this rank holds, its weight shapes, its
    KV cache (keys after RoPE) and its collectives (``comm``, ``records``).
    """
    block = TPDecoderLayer(config, dist, config.layer_windows[layer], hidden.dtype)
    block.load(StateDictSource(state), f"model.layers.{layer}")
    _, positions, key_valid = left_pad(prompts, 0, dist.device)
    batch, tokens, _ = hidden.shape
    cache = KVCache(1, batch, tokens, config.kv_heads_per_rank(dist.world_size), config.head_dim,
                    hidden.dtype, dist.device)
    rotary = RotaryEmbedding(config.rope, config.head_dim, tokens, dist.device)  # left-padded: positions < T
    cos, sin = rotary(positions, hidden.dtype)
    mask = attention_mask(torch.arange(tokens, device=dist.device), key_valid, block.attn.window)
    captured, handles = _capture_outputs({"attn": block.attn, "mlp": block.mlp})
    dist.stats.reset()
    with torch.no_grad():
        output = block(hidden.to(dist.device), cos, sin, mask, cache.step(0, tokens, positions, key_valid), 0)
    for h in handles:
        h.remove()
    qkv = block.attn.qkv
    return {
        "attn": captured["attn"].cpu(), "mlp": captured["mlp"].cpu(), "output": output.cpu(),
        "q_heads": list(qkv.q_heads), "kv_heads": list(qkv.kv_heads),
        "weights": {name.removesuffix(".tensor"): tuple(p.shape) for name, p in block.named_parameters()},
        "weight_bytes": sum(p.numel() * p.element_size() for p in block.parameters()),
        "cache_k": cache.k[0].cpu(), "cache_v": cache.v[0].cpu(),
        "comm": dist.stats.summary(),
        "records": [(r.op, r.shape, r.bytes) for r in dist.stats.records],
    }


@torch.no_grad()
def hf_block_reference(hf_model: torch.nn.Module, prompts: list[list[int]], layer: int) -> list[dict]:
    """Per prompt, run ALONE through the HF model: layer ``layer``'s input, attention output, MLP output, output.

    Each is (T_b, hidden). ``attn`` is what self_attn returns (after o_proj),
    ``mlp`` what the MLP returns (after down_proj); the layer adds the residuals.
    """
    hf_layer = hf_model.model.layers[layer]
    out = []
    for prompt in prompts:
        captured, handles = _capture_outputs({"attn": hf_layer.self_attn, "mlp": hf_layer.mlp, "output": hf_layer})
        pre = hf_layer.register_forward_pre_hook(lambda m, args: captured.__setitem__("input", args[0].clone()))
        hf_model(torch.tensor([prompt]))
        for h in [*handles, pre]:
            h.remove()
        out.append({name: captured[name][0] for name in SUBLAYERS})
    return out


# --- the KV cache after a prefill ----------------------------------------------
def prefill_cache_rank(dist: Dist, model_path: str | Path, prompts: list[list[int]]) -> dict:
    """Load this rank's shard, prefill the left-padded prompts, return its KV cache and its sizes.

    ``k``/``v``: (layers, batch, local_kv_heads, T, head_dim); slots before a
    row's padding length hold padding, not tokens.
    """
    model = from_pretrained(model_path, dist)
    ids, positions, key_valid = left_pad(prompts, 0, dist.device)
    cache = model.new_cache(len(prompts), ids.shape[1])
    model(ids, cache.step(0, ids.shape[1], positions, key_valid))
    return {"k": cache.k.cpu(), "v": cache.v.cpu(), "kv_heads": list(model.layers[0].attn.qkv.kv_heads),
            "bytes_per_token": cache.bytes_per_token, "total_bytes": cache.total_bytes,
            "parameter_bytes": model.parameter_bytes()}


# --- the generation loop, with a timeline of its collectives ------------------
def forward_labels(num_layers: int) -> list[str]:
    """What each collective of one forward pass (+ LM head) is for, in issue order."""
    per_layer = [f"L{i} {part}" for i in range(num_layers) for part in ("attn", "mlp")]
    return ["embed", *per_layer, "lm_head"]


def timed_generation_rank(dist: Dist, model_path: str | Path, prompts: list[list[int]],
                          max_new_tokens: int) -> dict:
    """Greedy generation (no EOS stop) that also returns a timeline of this rank's collectives.

    ``events``: per collective {step, phase, label, op, bytes, start, end}, in
    seconds since the first step began; ``label`` names the layer and sub-layer
    (:func:`forward_labels`).
    """
    model = from_pretrained(model_path, dist)
    t0 = time.perf_counter()
    result: GenerationResult = generate(model, prompts, max_new_tokens, eos_token_ids=())
    labels = forward_labels(model.config.num_layers)
    events, index = [], 0
    for step, info in enumerate(result.step_comm):
        for label in labels:
            r = dist.stats.records[index]
            events.append({"step": step, "phase": info["phase"], "label": label, "op": r.op, "bytes": r.bytes,
                           "start": r.started - t0, "end": r.started + r.seconds - t0})
            index += 1
    if index != len(dist.stats.records):
        raise RuntimeError(f"expected {index} collectives, recorded {len(dist.stats.records)}")
    return {"result": result, "events": events, "num_layers": model.config.num_layers}
