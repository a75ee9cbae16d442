"""The shipped tiny model (data/tiny): intact, loadable by HF, readable, and identical at every tp."""
from __future__ import annotations

import json
import lzma
import re
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tplab.specs.tiny import EXPECTED_SHA256, TINY_DIR, WEIGHTS_FILE, sha256_file, verify_tiny

PROMPTS = ["The for statement", "A list is", "Exceptions are"]  # different lengths in tokens
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def hf():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(TINY_DIR, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(TINY_DIR)


@pytest.fixture(scope="module")
def hf_greedy(hf) -> dict[str, list[int]]:
    """HF's own greedy continuation of each prompt, alone (no padding): the reference."""
    model, tokenizer = hf
    out = {}
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            gen = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
            out[prompt] = gen[0, ids.shape[1]:].tolist()
    return out


def test_shipped_files_match_the_record_and_fit_20_mb():
    assert verify_tiny() == TINY_DIR
    assert sha256_file(TINY_DIR / WEIGHTS_FILE) == EXPECTED_SHA256
    record = json.loads((TINY_DIR / "training.json").read_text())
    assert record["model_safetensors_sha256"] == EXPECTED_SHA256
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "README.md", "corpus.json.xz"):
        assert (TINY_DIR / name).is_file(), name
    total = sum(f.stat().st_size for f in TINY_DIR.rglob("*") if f.is_file())
    assert total <= 20_000_000, f"data/tiny is {total / 1e6:.1f} MB"
    assert record["final_loss"]["val"] < 5.0  # uniform guessing scores log(3072) = 8.0 nats


def test_verify_tiny_rejects_missing_and_damaged_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        verify_tiny(tmp_path)
    shutil.copy(TINY_DIR / WEIGHTS_FILE, tmp_path / WEIGHTS_FILE)
    with open(tmp_path / WEIGHTS_FILE, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))  # one flipped bit
    with pytest.raises(ValueError, match="expected " + EXPECTED_SHA256):
        verify_tiny(tmp_path)


def test_hf_loads_it_and_its_shape_exercises_tp_8(hf):
    model, tokenizer = hf
    c = model.config
    assert (c.num_attention_heads, c.num_key_value_heads) == (8, 4)  # tp=8 > 4 KV heads: replication
    for size in (c.hidden_size, c.intermediate_size, c.vocab_size):
        assert size % 8 == 0
    assert not c.tie_word_embeddings and model.dtype == torch.float32
    assert tokenizer.bos_token_id == c.bos_token_id and tokenizer.eos_token_id == c.eos_token_id


def test_tokenizer_round_trips_text(hf):
    _, tokenizer = hf
    docs = json.loads(lzma.decompress((TINY_DIR / "corpus.json.xz").read_bytes()))
    texts = [docs[0]["text"][:2000], "  indented\n\ttabs — ünïcode ✓ 😀\r\n", "x = [i ** 2 for i in range(10)]"]
    for text in texts:
        ids = tokenizer(text).input_ids
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(tokenizer(texts[0]).input_ids) < len(texts[0]) / 3  # BPE merges: > 3 characters per token


def test_hf_greedy_text_is_readable(hf, hf_greedy):
    _, tokenizer = hf
    docs = json.loads(lzma.decompress((TINY_DIR / "corpus.json.xz").read_bytes()))
    known = {w.lower() for d in docs for w in re.findall(r"[A-Za-z]+", d["text"])}
    for prompt, ids in hf_greedy.items():
        text = tokenizer.decode(ids, skip_special_tokens=True)
        words = re.findall(r"[A-Za-z]+", text)
        assert all(ch.isprintable() or ch in "\n\t" for ch in text), text
        assert len(words) >= 8, (prompt, text)
        assert sum(w.lower() in known for w in words) >= 0.9 * len(words), (prompt, text)  # real words
        assert len({w.lower() for w in words}) >= 5, (prompt, text)  # not one word repeated


def test_tp_1_2_4_8_give_hf_greedy_text(hf, hf_greedy):
    generate = pytest.importorskip("tplab.engine.generate")
    from tplab import launch
    _, tokenizer = hf
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    assert len({len(p) for p in prompts}) > 1  # a left-padded batch of different lengths
    expected = [hf_greedy[p] for p in PROMPTS]
    for tp in (1, 2, 4, 8):
        results = launch(generate.generate_rank_program, tp, "threads",
                         kwargs={"model": str(TINY_DIR), "prompts": prompts, "max_new_tokens": NEW_TOKENS})
        for rank, result in enumerate(results):
            assert result.tokens == expected, f"tp={tp} rank {rank}"
