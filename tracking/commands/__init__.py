"""Subcommands of the ``smartify`` CLI: one module each, with ``register(subparsers)``."""
