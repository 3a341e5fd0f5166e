"""Semantic passes, one per file, run in the order listed in `layoutc.compiler.pipeline`."""
