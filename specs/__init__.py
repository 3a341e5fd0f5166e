"""Built-in family specs (`vllm_*.layout`), found by `use` and by name on the command line."""
