"""Small Hugging Face checkpoints with random weights, and the HF reference they are checked against.

No hub: each model is built from a config, given random weights (all of them:
norms and biases too, so every code path matters), saved with
``save_pretrained`` and read back by tplab like any checkpoint. The specs
cover the cases TP must get right:

=============  =======================================================================
``llama``      Llama 2 style: 8 heads, 8 KV heads (MHA), vocab 256
``llama31``    Llama 3.1: GQA 8 heads / 2 KV heads, llama3 RoPE scaling, vocab 300
``mistral``    GQA 8 / 4, sliding window of 6 tokens, vocab 256
``qwen2``      GQA 8 / 2, q/k/v biases, tied embeddings, vocab 250
``tied``       Llama with MQA (1 KV head), tied embeddings, attention and MLP biases, vocab 250
``qwen3``      GQA 8 / 4, an RMSNorm on every query and key head, tied embeddings, vocab 280
``mixtral``    GQA 8 / 2, a mixture of 8 experts, 2 per token (weights renormalised), vocab 260
``qwen3_moe``  Qwen3's attention, 8 experts of width 32, 2 per token (renormalised: ``norm_topk_prob``), vocab 270
``qwen2_moe``  q/k/v biases, 4 experts of width 32, 2 per token (not renormalised), a gated shared expert of
               width 48, vocab 240
=============  =======================================================================

So tp in {1, 2, 4, 8} meets tp > KV heads (llama31, qwen2, tied; mistral at 8)
and a vocabulary not divisible by tp (300, 250).
"""
from __future__ import annotations

from pathlib import Path

import torch
import transformers

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
               head_dim=8, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

SPECS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=8, vocab_size=256)),
    "llama31": ("LlamaConfig", dict(num_key_value_heads=2, vocab_size=300, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    "mistral": ("MistralConfig", dict(num_key_value_heads=4, vocab_size=256, sliding_window=6)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, vocab_size=250, tie_word_embeddings=True)),
    "tied": ("LlamaConfig", dict(num_key_value_heads=1, vocab_size=250, tie_word_embeddings=True,
                                 attention_bias=True, mlp_bias=True)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=4, vocab_size=280, tie_word_embeddings=True)),
    "mixtral": ("MixtralConfig", dict(num_key_value_heads=2, vocab_size=260, num_local_experts=8,
                                      num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_key_value_heads=2, vocab_size=270, num_experts=8, num_experts_per_tok=2,
                                         moe_intermediate_size=32, norm_topk_prob=True)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_key_value_heads=2, vocab_size=240, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                         norm_topk_prob=False)),
}
MOE_SPECS = ("mixtral", "qwen3_moe", "qwen2_moe")  # the specs whose MLP is a mixture of experts

_CLASSES = {"LlamaConfig": "LlamaForCausalLM", "MistralConfig": "MistralForCausalLM", "Qwen2Config": "Qwen2ForCausalLM",
            "Qwen3Config": "Qwen3ForCausalLM", "MixtralConfig": "MixtralForCausalLM",
            "Qwen3MoeConfig": "Qwen3MoeForCausalLM", "Qwen2MoeConfig": "Qwen2MoeForCausalLM"}


def hf_config(name: str, **overrides) -> transformers.PretrainedConfig:
    """The transformers config of spec ``name``, with ``overrides`` applied."""
    if name not in SPECS:
        raise ValueError(f"unknown spec {name!r}; choose one of {sorted(SPECS)}")
    config_class, kwargs = SPECS[name]
    return getattr(transformers, config_class)(**{**_COMMON, **kwargs, **overrides})


def build_hf_model(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A float32 HF causal LM of spec ``name`` in eval mode, every parameter drawn from ``seed``.

    Matrices ~ N(0, 0.15^2) (bigger than HF's 0.02, so logits are well
    separated and greedy choices are not coin flips), norm weights ~ 1 + N(0,
    0.1^2), biases ~ N(0, 0.1^2).
    """
    config = hf_config(name, **overrides)
    config._attn_implementation = "sdpa"
    model = getattr(transformers, _CLASSES[type(config).__name__])(config).float().eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if "norm" in pname:
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_((0.15 if p.dim() > 1 else 0.1) * noise)
    return model


def make_checkpoint(name: str, directory: str | Path, seed: int = 0, max_shard_size: str | None = None,
                    tokenizer: bool = False, **overrides) -> tuple[Path, torch.nn.Module]:
    """Save a random spec ``name`` model to ``directory``; return (directory, the HF model).

    ``max_shard_size`` (e.g. "40KB") splits the weights over several files
    with a ``model.safetensors.index.json``. ``tokenizer=True`` adds a
    character-level tokenizer (:func:`save_char_tokenizer`).
    """
    directory = Path(directory)
    model = build_hf_model(name, seed, **overrides)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, **kwargs)
    if tokenizer:
        save_char_tokenizer(directory, model.config.vocab_size)
    return directory, model


def write_random_checkpoint(name: str, directory: str | Path, seed: int = 0, **overrides) -> Path:
    """config.json + model.safetensors of spec ``name`` with N(0, 0.15^2) weights, without building the HF model.

    The tensor names and shapes come from the HF model built on the meta
    device (no memory, no init), so this is fast for large test checkpoints
    (hundreds of MB) where only loading matters, not the HF reference.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    config = hf_config(name, **overrides)
    with torch.device("meta"):
        meta = getattr(transformers, _CLASSES[type(config).__name__])(config)
    generator = torch.Generator().manual_seed(seed)
    tensors = {pname: 0.15 * torch.randn(p.shape, generator=generator)
               for pname, p in meta.named_parameters(remove_duplicate=True)}
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


CHARS = " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-\n"


def save_char_tokenizer(directory: str | Path, vocab_size: int) -> None:
    """A character-level tokenizer (ids 0-2 are <unk>, <s>, </s>), saved in HF format to ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    if len(vocab) > vocab_size:
        raise ValueError(f"the character tokenizer needs vocab_size >= {len(vocab)}, got {vocab_size}")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")
    fast.save_pretrained(str(directory))


def distinct_prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Prompts of the given lengths with different random tokens in every row (ids 3 .. vocab_size-1)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=generator).tolist() for n in lengths]


@torch.no_grad()
def hf_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int,
              eos_token_ids: tuple[int, ...] = ()) -> tuple[list[int], list[torch.Tensor]]:
    """The HF model's greedy continuation of ONE prompt, run alone: (new tokens, last-position logits per step).

    Recomputes the whole sequence at every step (no cache), so it depends on
    nothing but the HF model's forward pass. Stops after an EOS token.
    """
    ids = list(prompt)
    tokens, logits = [], []
    for _ in range(max_new_tokens):
        last = model(torch.tensor([ids], device=model.device)).logits[0, -1]
        token = int(last.argmax())
        tokens.append(token)
        logits.append(last)
        ids.append(token)
        if token in eos_token_ids:
            break
    return tokens, logits

