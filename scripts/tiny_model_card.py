"""data/tiny/README.md, the tiny model's card, written by scripts/train_tiny.py from its training record."""
from __future__ import annotations

from pathlib import Path


def write_model_card(out: Path, r: dict) -> None:
    """data/tiny/README.md (or data/tiny_moe's): every number in it is copied from the training record ``r``."""
    c, h, cfg, loss = r["corpus"], r["hyperparameters"], r["model"]["config"], r["final_loss"]
    moe = h.get("moe", False)
    name, arch = ("tiny-moe", "MixtralForCausalLM") if moe else ("tiny", "LlamaForCausalLM")
    purpose = ("so that the routing tplab measures (`python -m tplab generate --model tiny-moe --ep 2`) is a trained "
               "router's, not random weights' noise. It is tplab's second bundled model, trained on the same corpus "
               "with the same tokenizer as `tiny` (`data/tiny`)" if moe else
               "so that\n`python -m tplab generate` prints readable text on a machine with no network")
    experts = (f" In every layer a mixture of {h['experts']} SwiGLU experts of width {cfg['intermediate_size']}, "
               f"{h['experts_per_token']} per token (Mixtral's router: softmax over the top-2 logits); trained with "
               f"Mixtral's load-balancing loss at weight {h['router_aux_loss_coef']} added to the cross-entropy (the "
               "batch loss below includes it; the validation loss is the cross-entropy alone)." if moe else "")
    retrain = "scripts/train_tiny.py --moe" if moe else "scripts/train_tiny.py"
    corpus = "`../tiny/corpus.json.xz`" if moe else "`corpus.json.xz`"
    rows = "\n".join(f"| {e['step']} | {e['batch_loss']:.3f} | {e['val_loss']:.3f} | {e['seconds']:.0f} |"
                     for e in r["history"])
    samples = "\n".join(f"* `{p}` → `{t!r}`" for p, t in r["greedy_samples"].items())
    (out / "README.md").write_text(f"""# {name}: {"tplab's mixture of experts" if moe else "tplab's default model"}

A {r["model"]["parameters"]:,}-parameter `{arch}` trained from scratch, {purpose}. It is a toy: it writes
Python-documentation-flavoured English that is often wrong in content. Written by
`scripts/train_tiny.py` (fixed seeds, pinned corpus); every number here is copied from `training.json`.

**Corpus.** {corpus}: the {c["topics"]} topics of `pydoc_data.topics` (what `help("for")` prints),
{c["characters"]:,} characters from {c["extracted_from"]}: the largest body of English prose that ships with
every CPython. It changes between Python releases, so the exact text is shipped here; the script refuses
any other (SHA-256 of the uncompressed JSON: `{c["sha256_uncompressed"]}`). The text is the CPython
documentation, Copyright © Python Software Foundation, PSF License. Held-out split: each topic is cut
at the first paragraph break after {100 - 100 * h["val_fraction"]:.0f}% of it and the tails are never trained on
({c["train_tokens"]:,} training tokens, {c["val_tokens"]:,} validation tokens).

**Tokenizer.** Byte-level BPE trained with `tokenizers` on the training split, {cfg["vocab_size"]} tokens;
`<s>` (id 0) starts every encoding, `</s>` (id 1) ends each topic. `AutoTokenizer` loads it.

**Model.** hidden {cfg["hidden_size"]}, intermediate {cfg["intermediate_size"]}, {cfg["num_hidden_layers"]} layers,
{cfg["num_attention_heads"]} query heads and {cfg["num_key_value_heads"]} KV heads (at tp=8 each KV head is
replicated on 2 ranks), vocabulary {cfg["vocab_size"]}, context {cfg["max_position_embeddings"]} tokens (the training
window), untied embeddings, fp32 weights.{experts}

**Training.** AdamW (betas 0.9, 0.95, weight decay {h["weight_decay"]}), peak learning rate {h["lr"]},
{h["warmup_steps"]} warmup steps then cosine decay to 10%, {h["steps"]} steps of {h["batch_size"]} random windows of
{h["seq_len"]} tokens, seed {h["seed"]}; {h["threads"]} threads on a shared {r["hardware"]["cpu"]}, torch
{r["versions"]["torch"]}, transformers {r["versions"]["transformers"]}, {r["date_utc"]}, commit {r["git_commit"]}.
Training took {r["wall_seconds"]["training"] / 60:.1f} min ({r["wall_seconds"]["total"] / 60:.1f} min for the script).
Final mean next-token cross-entropy: **train {loss["train"]:.3f} nats, validation {loss["val"]:.3f} nats**.

| step | batch loss | validation loss | seconds |
|---|---|---|---|
{rows}

**Greedy samples** (HF `generate`, 48 new tokens):
{samples}

**Files.** `config.json`, `model.safetensors` (SHA-256 `{r["model_safetensors_sha256"]}`, pinned in
`tplab/specs/tiny.py`), `generation_config.json` (greedy), `tokenizer.json`, `tokenizer_config.json`,
{"" if moe else "`corpus.json.xz`, "}`training.json`, this README. Retrain: `.venv/bin/python {retrain}`.
""")
