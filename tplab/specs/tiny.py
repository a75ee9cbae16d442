"""tiny: the default model that ships with tplab, in ``data/tiny``.

A 4.7M-parameter Llama (``LlamaForCausalLM``: 8 query heads, 4 KV heads,
hidden 256) trained by ``scripts/train_tiny.py`` on the Python documentation
topics, so ``python -m tplab generate --tp 4 --prompt "The with statement"``
prints readable text on a machine with no network. It is an ordinary Hugging
Face checkpoint directory: ``AutoModelForCausalLM.from_pretrained(TINY_DIR)``
and ``AutoTokenizer.from_pretrained(TINY_DIR)`` load it as-is.

``tiny-moe`` (in ``data/tiny_moe``) is its mixture-of-experts sibling: a 2.6M-parameter Mixtral (8 experts, 2
per token) trained by ``scripts/train_tiny.py --moe`` on the same corpus with the same tokenizer, so that its
routing is a trained one (:mod:`tplab.model.routing`).

``verify_tiny()`` checks the weights against the SHA-256 recorded at training
time, so a truncated or edited file fails loudly instead of printing noise.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import re
from pathlib import Path

from tplab.paths import DATA_DIR, INCOMPLETE_DATA

TINY_DIR = DATA_DIR / "tiny"
TINY_MOE_DIR = DATA_DIR / "tiny_moe"
WEIGHTS_FILE = "model.safetensors"
EXPECTED_SHA256 = "1dcf5f31ca9a7fd71152cb3429ee602a6210bf7f48eee37ce3a44f7adaa87af6"
TINY_MOE_SHA256 = "5d36134e54c4cbf012b40c676eb97cec1a16cd65ae8725552caa1112ed40feb8"
BUNDLED = ("tiny", "tiny-moe")  # the models that ship with tplab


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_bundled(name: str) -> Path:
    """The checked directory of a bundled model ("tiny" or "tiny-moe"; :func:`verify_tiny`)."""
    if name == "tiny":
        return verify_tiny(TINY_DIR, EXPECTED_SHA256)
    return verify_tiny(TINY_MOE_DIR, TINY_MOE_SHA256)


def verify_tiny(directory: Path = TINY_DIR, expected: str = EXPECTED_SHA256) -> Path:
    """Return ``directory`` if its model.safetensors is the recorded one (``expected``); otherwise raise.

    FileNotFoundError when the file is absent (tplab installed without its
    data directory), ValueError when its checksum differs (a Git LFS pointer,
    a partial copy, a retrain whose hash was not recorded here).
    """
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: {INCOMPLETE_DATA}")
    actual = sha256_file(weights)
    if actual != expected:
        raise ValueError(f"{weights} has SHA-256 {actual}, expected {expected}: the file is damaged "
                         f"or not the shipped one. Restore it with `git checkout -- data/{Path(directory).name}`, or, "
                         "after retraining with scripts/train_tiny.py, record the new hash in tplab/specs/tiny.py.")
    return Path(directory)


UNDERLINE = re.compile(r"^[ \t]*([*=~-])\1{2,}[ \t]*\n", re.MULTILINE)


def clean_text(text: str) -> str:
    """The text without reStructuredText heading underlines (whole lines of one repeated * = - ~)."""
    return UNDERLINE.sub("", text)


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """Cut at the first paragraph break after (1 - val_fraction) of the text: (train, val)."""
    cut = text.find("\n\n", int(len(text) * (1 - val_fraction)))
    return (text, "") if cut < 0 else (text[:cut + 1], text[cut + 2:])


CORPUS_FILE = "corpus.json.xz"


def corpus_dir(directory: Path) -> Path | None:
    """Where the corpus a bundled model was trained on lies: beside it (tiny), or beside tiny (tiny-moe, trained
    on the same text); None for another checkpoint without one."""
    directory = Path(directory)
    if (directory / CORPUS_FILE).is_file():
        return directory
    return TINY_DIR if directory.resolve() == TINY_MOE_DIR.resolve() else None


def corpus_texts(directory: Path = TINY_DIR) -> list[str]:
    """The text of every topic of the corpus shipped beside the model, as stored."""
    with lzma.open(Path(directory) / CORPUS_FILE) as f:
        return [topic["text"] for topic in json.loads(f.read())]


def validation_texts(directory: Path = TINY_DIR) -> list[str]:
    """The held-out tail of every corpus topic, split as training split it (training.json's val_fraction)."""
    val_fraction = json.loads((Path(directory) / "training.json").read_text())["hyperparameters"]["val_fraction"]
    return [val for _, val in (split_text(clean_text(t), val_fraction) for t in corpus_texts(directory)) if val.strip()]
