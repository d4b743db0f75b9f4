"""The training engine: stage configuration, per-sample training transform, loops, validation."""
