"""The generation loop that every rank runs in lockstep: prefill, then one decode step per token."""
from tplab.engine.generate import GenerationResult, generate, generate_rank_program

__all__ = ["GenerationResult", "generate", "generate_rank_program"]
