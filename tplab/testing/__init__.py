"""Helpers for tests and notebooks: small random Hugging Face checkpoints to check tplab against."""
from tplab.testing.hf_checkpoints import (
    MOE_SPECS,
    SPECS,
    build_hf_model,
    distinct_prompts,
    hf_config,
    hf_greedy,
    make_checkpoint,
    save_char_tokenizer,
    write_random_checkpoint,
)

__all__ = ["MOE_SPECS", "SPECS", "hf_config", "build_hf_model", "make_checkpoint", "save_char_tokenizer",
           "distinct_prompts", "hf_greedy",
           "write_random_checkpoint"]
