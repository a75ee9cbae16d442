"""Subcommands of ``python -m tplab``: one module each, with ``register(subparsers)``."""
