"""The `layoutc init` command: a model spec from a Hugging Face config.json.

    layoutc init --from-hf config.json [-o model.layout] [--engine vllm] [--block-size N]
                 [--kv-dtype DTYPE] [--attention-backend flashinfer|flash_attn]

Exit status: 0 ok, 1 a config init cannot describe (unknown architecture, missing keys, bad
JSON), 2 usage errors.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .bind import UsageError
from .fsutil import write_atomically
from .hf_init import ATTENTION_BACKENDS, ENGINES, InitError, init_from_hf, read_config

#: First-lines marker of a spec written by `init`; `-o` overwrites only such files.
MARKER = "layoutc init --from-hf"


def _positive(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"'{text}': must be positive")
    return v


def _source_name(path: str) -> str:
    """The config path as written into the spec: as given, never absolute."""
    if os.path.isabs(path):
        return os.path.basename(path)
    return os.path.normpath(path).replace(os.sep, "/")


def _write(path: str, text: str, force: bool) -> bool:
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"-o {path}: is a directory; name the .layout file to write")
    if p.exists():
        old = p.read_text("utf-8", errors="replace")
        if old == text:
            return False
        if MARKER not in "".join(old.splitlines(True)[:6]) and not force:
            raise UsageError(
                f"{path} exists and was not written by `layoutc init`; not overwriting it "
                "(pass --force to replace it)"
            )
    write_atomically(p, text)
    return True


def cmd_init(args, compiler=None) -> int:
    path = args.from_hf
    if not os.path.isfile(path):
        raise UsageError(f"--from-hf {path}: no such file")
    try:
        config = read_config(path)
        text = init_from_hf(
            config,
            engine=args.engine,
            block_size=args.block_size,
            kv_dtype=args.kv_dtype,
            source_name=_source_name(path),
            attention_backend=args.attention_backend,
        )
    except InitError as e:
        print(f"layoutc: error: {e}", file=sys.stderr)
        return 1
    if args.output is None:
        sys.stdout.write(text)
        return 0
    changed = _write(args.output, text, args.force)
    print(f"{'wrote' if changed else 'unchanged'} {args.output}", file=sys.stderr)
    return 0


def add_commands(sub, add_spec_options=None) -> None:
    """Add `init` to the `layoutc` subcommands (`add_spec_options` is unused: init reads no spec)."""
    p = sub.add_parser(
        "init",
        help="write a model spec from a Hugging Face config.json",
        description="Write a model spec (a family spec with the model's values bound, each "
        "commented with its source) from a Hugging Face config.json.",
    )
    p.add_argument(
        "--from-hf",
        required=True,
        metavar="CONFIG.json",
        help="the model's Hugging Face config.json",
    )
    p.add_argument(
        "-o", "--output", metavar="FILE.layout", help="write the spec here (default: print it)"
    )
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="vllm",
        help="engine whose cache layout to describe (default: vllm)",
    )
    p.add_argument(
        "--block-size",
        type=_positive,
        metavar="N",
        help="tokens per kernel block, as the engine uses it (default: 16; 64 for MLA)",
    )
    p.add_argument(
        "--kv-dtype",
        metavar="DTYPE",
        help="attention cache dtype: fp32, bf16, fp16, fp8 or a torch name "
        "(default: the config's torch_dtype)",
    )
    p.add_argument(
        "--attention-backend",
        choices=ATTENTION_BACKENDS,
        default="flashinfer",
        help="GQA cache layout: flashinfer (blocks-first K|V page, default) or "
        "flash_attn (separate K and V buffers)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="with -o, replace a file that `layoutc init` did not write",
    )
    p.set_defaults(func=cmd_init)
