"""The ``attention-engine`` command: ``list``, ``bench``, ``demo``, ``distributed``, ``train`` and
``generate``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
this module only wires them, importing each lazily so ``list`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "list": ("engine.cli.listing", "show installed variants (with their plugin and distribution) and backends"),
    "bench": ("engine.benchmark", "compare variants and backends: time, GFLOP/s, memory, ratio to torch"),
    "demo": ("engine.models.demo", "run a pretrained transformer through the engine and show its attention"),
    "distributed": (
        "engine.distributed.cli",
        "one problem on a Dask cluster (a LocalCluster of worker "
        "processes unless --scheduler): time, tasks, bytes moved, vs the cpu backend",
    ),
    "train": (
        "engine.models.train_demo",
        "train a character-level LM with torch's and the engine's attention and compare the loss curves (needs torch)",
    ),
    "generate": (
        "engine.models.generate",
        "greedy GPT-2 generation through attention_with_kvcache vs transformers: tokens/s",
    ),
}


#: what ``attention-engine --help`` says first (whole sentences: the module docstring's first line
#: was cut mid-sentence there)
DESCRIPTION = (
    "Exact scaled dot-product attention with PyTorch's semantics on Numba kernels: list what is "
    "installed, benchmark against torch, and run the demos. Each command takes --help."
)


def build_parser(argv) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attention-engine", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    wanted = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # only the module of the chosen command is imported
            p.set_defaults(_module=importlib.import_module(module))
            p._defaults["_module"].add_arguments(p)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    from ..runtime.gemm_providers import gemm_mode

    try:  # ATTENTION_ENGINE_GEMM, read by every command: a bad value is a usage error, not a traceback
        gemm_mode()
    except ValueError as exc:
        print(f"attention-engine: error: {exc}", file=sys.stderr)
        return 2
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
