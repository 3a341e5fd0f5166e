"""Engine integrations of layoutc (e.g. :mod:`layoutc.connectors.vllm`)."""
