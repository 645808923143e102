"""The optional forced aligner (Qwen3-ForcedAligner): word and character timestamps.

`base` holds the protocol every aligner implements; `vllm` and `cpu` the two implementations; `text` the
units and prompt they share."""
