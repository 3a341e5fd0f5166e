"""Tiny fp32 models with seeded random weights, saved where vLLM can load them.

Nothing here touches the network: each model is a transformers config plus random weights drawn
from a fixed seed, written with ``save_pretrained`` into ``<root>/<name>-<hash>`` where the hash
covers the config, the seed and the weight scale. A model directory that already exists is
reused, so a test session builds each model once (and a persistent ``root`` keeps them across
sessions). vLLM runs these with ``skip_tokenizer_init=True`` and token-id prompts.

Sizes are chosen for vLLM 0.32's CPU backend: attention head size 32 (the smallest
``CPU_ATTN`` supports), KV heads, Mamba heads/groups and the vocabulary divisible by the
tensor-parallel sizes each model is used at.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VOCAB_SIZE = 960
"""Vocabulary of every tiny model; prompts draw token ids from ``[0, VOCAB_SIZE)``. vLLM pads
the vocabulary to a multiple of 64 and shards it by TP; 960 = 64 * 15 divides by 1, 2 and 3."""

MAX_POSITIONS = 4096

WEIGHT_STD = 0.1
"""Standard deviation of the random weights. transformers' default (0.02) makes the tiny models
nearly constant functions of their input; a larger scale lets the KV cache visibly steer the
greedy tokens, which the transfer tests rely on."""


@dataclass(frozen=True)
class ModelSpec:
    """One tiny model: ``arch`` picks the transformers config class, ``config`` its arguments."""

    name: str
    arch: str  # "llama" | "nemotron_h"
    config: dict[str, Any] = field(hash=False)
    seed: int = 0
    tp_sizes: tuple[int, ...] = (1, 2)
    """Tensor-parallel sizes vLLM accepts for this model (documentation for the tests)."""

    def digest(self) -> str:
        """A short hash of everything that determines the saved files."""
        blob = json.dumps(
            {"arch": self.arch, "config": self.config, "seed": self.seed, "std": WEIGHT_STD},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def is_hybrid(self) -> bool:
        return self.arch == "nemotron_h"


_LLAMA_BASE: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": MAX_POSITIONS,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}

_NEMOTRON_H_BASE: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 128,
    # M = Mamba2 mixer, * = attention, - = MLP.
    "hybrid_override_pattern": "M*-M*-",
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 256,
    "mlp_hidden_act": "relu2",
    "mamba_num_heads": 8,
    "mamba_head_dim": 32,
    "ssm_state_size": 16,
    "n_groups": 8,
    "conv_kernel": 4,
    "expand": 2,
    "chunk_size": 128,
    "use_mamba_kernels": False,
    "max_position_embeddings": MAX_POSITIONS,
    "layer_norm_epsilon": 1e-5,
    "tie_word_embeddings": False,
}

LLAMA = ModelSpec("llama", "llama", _LLAMA_BASE, seed=0)
"""4 layers, 2 KV heads of 32: TP 1 and 2."""

LLAMA_OTHER = ModelSpec("llama-other", "llama", _LLAMA_BASE, seed=1)
"""``LLAMA`` with weights from another seed: a prefill engine of these tampers with the KV."""

LLAMA_KV6 = ModelSpec(
    "llama-kv6",
    "llama",
    {
        **_LLAMA_BASE,
        "hidden_size": 192,
        "intermediate_size": 384,
        "num_attention_heads": 6,
        "num_key_value_heads": 6,
    },
    seed=0,
    tp_sizes=(1, 2, 3),
)
"""6 KV heads of 32 (no GQA): TP 1, 2 and 3 (pairs like 2<->3 divide neither way)."""

NEMOTRON_H = ModelSpec("nemotron-h", "nemotron_h", _NEMOTRON_H_BASE, seed=0)
"""Hybrid, 2 Mamba2 + 2 attention + 2 MLP layers; 8 Mamba heads, ``n_groups=8``: TP 1 and 2."""

NEMOTRON_H_G1 = ModelSpec(
    "nemotron-h-g1", "nemotron_h", {**_NEMOTRON_H_BASE, "n_groups": 1}, seed=0
)
"""``NEMOTRON_H`` with ``n_groups=1``: at TP 2 vLLM replicates the single B/C group per rank."""

ALL_MODELS = (LLAMA, LLAMA_OTHER, LLAMA_KV6, NEMOTRON_H, NEMOTRON_H_G1)


def _make_config(spec: ModelSpec) -> Any:
    import torch
    from transformers import LlamaConfig, NemotronHConfig

    cls = {"llama": LlamaConfig, "nemotron_h": NemotronHConfig}[spec.arch]
    config = cls(**spec.config)
    config.dtype = torch.float32
    return config


def _randomize(model: Any, seed: int) -> None:
    """Redraw every floating-point parameter from one seeded generator, in name order.

    Norm weights stay near 1 and biases near 0 so the activations keep a sane scale; Mamba's
    ``A_log``/``dt_bias``/``D`` keep transformers' initial values (they set the decay rates)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if not param.dtype.is_floating_point:
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("A_log", "dt_bias", "D"):
                continue
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                param.copy_(1.0 + 0.1 * noise)
            elif leaf == "bias":
                param.copy_(0.02 * noise)
            else:
                param.copy_(WEIGHT_STD * noise)


def build(spec: ModelSpec, root: Path) -> Path:
    """Return the directory of ``spec``'s model under ``root``, building it on first use.

    Safe against concurrent builders: the model is written to a temporary directory and renamed
    into place; a loser of the race discards its copy."""
    import torch
    from transformers import AutoModelForCausalLM

    root = Path(root)
    target = root / f"{spec.name}-{spec.digest()}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    config = _make_config(spec)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, spec.seed)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=root))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "layoutc-model.json").write_text(
            json.dumps({"spec": spec.name, "seed": spec.seed, "config": spec.config}, indent=1)
        )
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main() -> None:
    """Build every model under the directory given as the first argument (default ``./models``)."""
    import sys

    root = Path(sys.argv[1] if len(sys.argv) > 1 else "models")
    for spec in ALL_MODELS:
        print(spec.name, build(spec, root))


if __name__ == "__main__":
    main()
