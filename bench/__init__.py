"""Benchmark of the appliance against `vllm serve` and vLLM's offline engine (see bench/README.md)."""
