"""``medsam3 train CONFIG.yaml [key=value ...]``: fine-tune SAM3 on a manifest from ``medsam3 prepare``.

CONFIG.yaml holds overrides of the defaults (the Medical SAM3 recipe); ``key=value`` arguments override the
file (dotted keys, YAML values). Examples::

    medsam3 train configs/tiny_cpu.yaml data.manifest=manifest.jsonl run_dir=runs/tiny
    medsam3 train configs/paper_full.yaml data.manifest=all.jsonl model.source=checkpoints/sam3-hf
    medsam3 train configs/lora.yaml data.manifest=all.jsonl lora.rank=8 batch_size=2
    medsam3 train configs/tiny_cpu.yaml data.manifest=m.jsonl --print-config

Several GPUs or nodes (DDP; FSDP through an ``accelerate config`` file)::

    accelerate launch --num_processes 4 -m medsam3.commands.train configs/paper_full.yaml data.manifest=...
    torchrun --nproc_per_node 4 -m medsam3.commands.train configs/paper_full.yaml data.manifest=...
    torchrun --nnodes 2 --node_rank N --master_addr HOST --nproc_per_node 4 -m medsam3.commands.train ...

The run folder (``run_dir``) gets ``config.yaml``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/``
(``last.pt``, ``best.pt``) and ``export/{final,best}`` (load them with ``medsam3 segment --model``). Running
the same command again resumes from ``checkpoints/last.pt``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medsam3.io.atomic import protect_inputs


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="YAML file of configuration overrides (see configs/)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="further overrides, e.g. data.manifest=m.jsonl max_steps=100 optim.lr_decoder=1e-4",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.set_defaults(func=run)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="fine-tune SAM3 on a prepared manifest (full, decoder-only or LoRA)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(p)


def run(args: argparse.Namespace) -> int:
    from medsam3.train.config import build_config, config_yaml

    cfg = build_config(args.config, args.overrides)
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    inputs = [args.config]
    if cfg.data.manifest:
        inputs.append(Path(cfg.data.manifest))
    if Path(cfg.model.source).exists():
        inputs.append(Path(cfg.model.source))
    protect_inputs(inputs)

    from medsam3.train.loop import train

    result = train(cfg)
    if result.is_main:
        state = "finished" if result.finished else "stopped (resume with the same command)"
        best = "none"
        if result.best_metric is not None:
            best = f"{result.best_metric:.4f} at step {result.best_step}"
        print(f"training {state} at step {result.step} of {result.total_steps}; best validation Dice {best}")
        print(f"run folder: {result.run_dir}")
        for name, path in result.exports.items():
            print(f"{name} model: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m medsam3.commands.train`` (``torchrun`` / ``accelerate launch -m``)."""
    import logging

    from medsam3.errors import MedSam3Error

    parser = argparse.ArgumentParser(
        prog="medsam3 train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except MedSam3Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
