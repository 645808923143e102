"""Training recipes for small checkpoints of the real Qwen3-ASR architecture (test fixtures only)."""
