"""Train tplab's tiny default model (data/tiny), or its mixture of experts (data/tiny_moe), from text that ships
with CPython.

    .venv/bin/python scripts/train_tiny.py            # ~10-25 min on 2 CPU cores
    .venv/bin/python scripts/train_tiny.py --moe      # tiny-moe: the same corpus and tokenizer, a Mixtral

Corpus: the 79 documentation topics of ``pydoc_data.topics`` (what ``help("for")``
prints): ~465K characters of English prose about Python. It changes between
Python releases, so the exact text is shipped in ``data/tiny/corpus.json.xz``
(~95 KB) and its SHA-256 is pinned below: training refuses a corpus whose hash
differs (``--allow-corpus-change`` overrides, e.g. to retrain on a newer Python).

Cleaning: the reStructuredText underlines of headings (lines of one repeated
``*``, ``=``, ``-`` or ``~``) are dropped before training; a model trained with
them started most continuations with a row of asterisks. The shipped corpus
file stays the unmodified extraction; cleaning is a pure function of it.

Split: each topic is cut at the first paragraph break after 90% of its
characters; the tail goes to validation, so no validation text is ever trained on.

Tokenizer: byte-level BPE (``tokenizers``), trained on the training split only;
``<s>`` (id 0) is prepended to every text, ``</s>`` (id 1) ends every topic.

Model: ``LlamaForCausalLM``, 8 query heads and 4 KV heads (tp=8 forces KV-head
replication), hidden/intermediate/vocab divisible by 8, untied embeddings, fp32.
With ``--moe``: ``MixtralForCausalLM`` with the same attention and :data:`MOE_HYPERPARAMETERS` (8 experts of width
128, 2 per token), trained with Mixtral's load-balancing loss (``router_aux_loss_coef``) added to the
cross-entropy, as Mixtral was, so that its routing is a trained one, neither random nor collapsed on one expert.
Loss (reported): mean next-token cross-entropy  L = -1/N sum_t log p(x_{t+1} | x_{<=t}).
AdamW with linear warmup then cosine decay to 10% of the peak learning rate.
Also tried: batch 16 x 360 steps at lr 2e-3 (the same 1.4M tokens, half the
updates): the same validation loss (4.381 vs 4.386 nats) but a looser fit of
the training text (3.10 vs 2.52) and greedy text stuck repeating one sentence.

Writes config.json, model.safetensors, generation_config.json, tokenizer files,
training.json (everything measured) and README.md into ``--out``. After a
retrain, paste the printed SHA-256 into ``tplab/specs/tiny.py`` (EXPECTED_SHA256).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import lzma
import math
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
import transformers
from tiny_model_card import write_model_card
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
)

from tplab.specs.tiny import CORPUS_FILE, clean_text, split_text

REPO = Path(__file__).resolve().parent.parent
CORPUS_SHA256 = "13e07c0b9a9a1b2f3c9d6e0efe623d603650814dd5e53a6f031a81dfec28a133"  # uncompressed JSON
CORPUS_ORIGIN = "pydoc_data.topics of CPython 3.11.7"
BOS, EOS = "<s>", "</s>"
SAMPLE_PROMPTS = ["The for statement", "A list is", "The with statement is used to", "Exceptions are"]


HYPERPARAMETERS = {  # argparse flags: --vocab-size 3072 ...
    "vocab_size": 3072, "hidden_size": 256, "intermediate_size": 768, "layers": 4, "heads": 8, "kv_heads": 4,
    "seq_len": 256, "batch_size": 8, "steps": 700, "warmup_steps": 40, "lr": 3e-3, "weight_decay": 0.1,
    "val_fraction": 0.1, "eval_every": 20, "threads": 2, "seed": 0,
}
# --moe: what changes for tiny-moe (the rest as above)
MOE_HYPERPARAMETERS = {"hidden_size": 128, "intermediate_size": 128, "experts": 8, "experts_per_token": 2,
                       "router_aux_loss_coef": 0.02}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="default data/tiny, or data/tiny_moe with --moe")
    p.add_argument("--allow-corpus-change", action="store_true", help="train on a corpus whose SHA-256 differs")
    p.add_argument("--moe", action="store_true", help="train tiny-moe (a Mixtral) into data/tiny_moe")
    for name, default in {**HYPERPARAMETERS, **MOE_HYPERPARAMETERS}.items():
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=None)
    args = p.parse_args()
    defaults = {**HYPERPARAMETERS, **(MOE_HYPERPARAMETERS if args.moe else {})}
    for name, default in {**defaults, **{k: None for k in MOE_HYPERPARAMETERS if not args.moe}}.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.out is None:
        args.out = REPO / "data" / ("tiny_moe" if args.moe else "tiny")
    for name in ("vocab_size", "hidden_size", "intermediate_size"):
        if getattr(args, name) % 8:
            raise SystemExit(f"--{name.replace('_', '-')} must be divisible by 8 (tp up to 8)")
    if args.heads % 8 or args.heads % args.kv_heads or args.hidden_size % args.heads:
        raise SystemExit("--heads must be a multiple of 8 and of --kv-heads, and divide --hidden-size")
    return args


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_corpus(out: Path, allow_change: bool) -> tuple[list[dict], str, str]:
    """The shipped corpus (data/tiny's), or (when absent) this Python's pydoc topics, written out; hash-checked."""
    path = REPO / "data" / "tiny" / CORPUS_FILE
    path = path if path.exists() else out / CORPUS_FILE
    if path.exists():
        raw, origin = lzma.decompress(path.read_bytes()), f"{CORPUS_FILE} (shipped)"
    else:
        from pydoc_data.topics import topics
        docs = [{"topic": name, "text": topics[name]} for name in sorted(topics)]
        raw = json.dumps(docs, ensure_ascii=False, indent=1, sort_keys=True).encode("utf-8")
        origin = f"pydoc_data.topics of Python {platform.python_version()}"
        out.mkdir(parents=True, exist_ok=True)
        path.write_bytes(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))
    digest = sha256_bytes(raw)
    if digest != CORPUS_SHA256 and not allow_change:
        raise SystemExit(f"corpus from {origin} has SHA-256 {digest}, expected {CORPUS_SHA256}: "
                         "the text differs from the one the shipped model was trained on. Restore "
                         f"{path} from git, or pass --allow-corpus-change and update CORPUS_SHA256.")
    return json.loads(raw), digest, origin


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE: any UTF-8 text round-trips; ``<s>`` is prepended to every encoding."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)


def token_stream(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """All texts as one 1-D stream: <s> text_1 </s> <s> text_2 </s> ..."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text).input_ids + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def mean_loss(model: LlamaForCausalLM, stream: torch.Tensor, seq_len: int) -> float:
    """Token-weighted mean cross-entropy over consecutive windows covering the whole stream."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(stream) - 1, seq_len - 1):  # windows share one token: each target counted once
        window = stream[i:i + seq_len][None]
        n = window.shape[1] - 1
        logits = model(input_ids=window).logits[0, :-1]  # the cross-entropy alone, without a router's loss
        total += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
        count += n
    model.train()
    return total / count


def learning_rate(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: LlamaForCausalLM, train_ids: torch.Tensor, val_ids: torch.Tensor,
          args: argparse.Namespace) -> list[dict]:
    """AdamW on random windows of the training stream; returns the logged history."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    history, start = [], time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args)
        starts = torch.randint(0, len(train_ids) - args.seq_len, (args.batch_size,), generator=gen)
        batch = torch.stack([train_ids[s:s + args.seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        last = step + 1 == args.steps
        if step % 10 == 0 or last:
            print(f"step {step:4d}  batch loss {loss.item():.3f}  lr {opt.param_groups[0]['lr']:.2e}  "
                  f"{time.time() - start:6.0f} s", flush=True)
        if (step + 1) % args.eval_every == 0 or last:
            val = mean_loss(model, val_ids, args.seq_len)
            history.append({"step": step + 1, "batch_loss": round(loss.item(), 4), "val_loss": round(val, 4),
                            "seconds": round(time.time() - start, 1)})
            print(f"step {step + 1:4d}  val loss {val:.3f}", flush=True)
    return history


@torch.no_grad()
def greedy_samples(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, max_new_tokens: int) -> dict:
    model.eval()
    out = {}
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        out[prompt] = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    return out


def git_commit() -> str:
    run = lambda *cmd: subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = run("status", "--porcelain", "--", "scripts/train_tiny.py")
    return (run("rev-parse", "HEAD") or "unknown") + (" (scripts/train_tiny.py modified)" if dirty else "")


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or platform.machine())


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    wall_start, commit = time.time(), git_commit()  # the commit whose script is running
    docs, corpus_sha, origin = load_corpus(args.out, args.allow_corpus_change)
    splits = [split_text(clean_text(d["text"]), args.val_fraction) for d in docs]
    train_texts = [t for t, _ in splits]
    val_texts = [v for _, v in splits if v]
    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    train_ids, val_ids = token_stream(tokenizer, train_texts), token_stream(tokenizer, val_texts)
    tokenizer.model_max_length = args.seq_len
    print(f"corpus: {origin}, {len(docs)} topics; train {len(train_ids)} tokens, val {len(val_ids)} tokens",
          flush=True)

    shape = dict(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq_len, tie_word_embeddings=False, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if args.moe:
        config = MixtralConfig(**shape, num_local_experts=args.experts, num_experts_per_tok=args.experts_per_token,
                               output_router_logits=True, router_aux_loss_coef=args.router_aux_loss_coef,
                               sliding_window=None)
        model = MixtralForCausalLM(config)
    else:
        config = LlamaConfig(**shape)
        model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters ({n_params * 4 / 1e6:.1f} MB fp32)", flush=True)
    train_start = time.time()
    history = train(model, train_ids, val_ids, args)
    train_seconds = time.time() - train_start
    final_train = mean_loss(model, train_ids, args.seq_len)
    final_val = history[-1]["val_loss"]
    print(f"final: train loss {final_train:.3f}, val loss {final_val:.3f}, {train_seconds:.0f} s", flush=True)

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id, do_sample=False, max_new_tokens=48)
    samples = greedy_samples(model, tokenizer, max_new_tokens=48)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.moe:
        model.config.output_router_logits = False  # what inference needs; training added the balancing loss
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    tok_config = args.out / "tokenizer_config.json"  # a class name transformers 4 and 5 both load
    tok_config.write_text(tok_config.read_text().replace('"TokenizersBackend"', '"PreTrainedTokenizerFast"'))
    weights_sha = sha256_bytes((args.out / "model.safetensors").read_bytes())
    record = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "hardware": {"cpu": cpu_name(), "machine": platform.machine(), "os_cpus": os.cpu_count(),
                     "torch_threads": args.threads},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "corpus": {"file": CORPUS_FILE, "extracted_from": CORPUS_ORIGIN, "read_from": origin,
                   "sha256_uncompressed": corpus_sha,
                   "cleaning": "heading underlines removed (scripts/train_tiny.py: clean_text)",
                   "topics": len(docs), "characters": sum(len(clean_text(d["text"])) for d in docs),
                   "train_tokens": len(train_ids), "val_tokens": len(val_ids)},
        "model": {"parameters": n_params, "config": config.to_diff_dict()},
        "hyperparameters": {k: v for k, v in vars(args).items()
                            if k not in ("out", "allow_corpus_change") and v is not None},
        "wall_seconds": {"total": round(time.time() - wall_start, 1), "training": round(train_seconds, 1)},
        "final_loss": {"train": round(final_train, 4), "val": final_val},
        "history": history,
        "greedy_samples": samples,
        "model_safetensors_sha256": weights_sha,
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    write_model_card(args.out, record)
    for prompt, text in samples.items():
        print(f"{prompt!r} -> {text!r}")
    print(f"model.safetensors SHA-256: {weights_sha}  (set EXPECTED_SHA256 in tplab/specs/tiny.py)")


if __name__ == "__main__":
    main()
