"""``nemo-viper``: the command line of the project (see SPEC §9 for the contract).

User-facing errors (:class:`~nemo_viper.errors.NemoViperError`) are printed as one line,
``error: <message>``, with exit status 2. Multi-rank commands run under ``torchrun``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from nemo_viper.errors import NemoViperError


def _add_layout_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")


def cmd_tiny_model(args) -> None:
    from nemo_viper.models.tiny import TinyModelConfig, write_tiny_checkpoint

    out = write_tiny_checkpoint(args.out, TinyModelConfig(seed=args.seed))
    print(f"tiny Qwen2.5-VL checkpoint written to {out}")


def cmd_convert_import(args) -> None:
    from nemo_viper.models.checkpoint import import_hf

    out = import_hf(args.hf, args.out, tensor_parallel=args.tp, pipeline_parallel=args.pp)
    if _is_rank_zero():
        print(f"imported {args.hf} -> {out}")


def cmd_convert_export(args) -> None:
    from nemo_viper.models.checkpoint import export_checkpoint

    out = export_checkpoint(args.ckpt, args.out, tensor_parallel=args.tp, pipeline_parallel=args.pp)
    if _is_rank_zero():
        print(f"exported {args.ckpt} -> {out}")


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nemo-viper", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tiny = commands.add_parser("tiny-model", help="write an offline tiny Qwen2.5-VL HF checkpoint")
    tiny.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    tiny.add_argument("--seed", type=int, default=0, help="weight-initialisation seed")
    tiny.set_defaults(func=cmd_tiny_model)

    convert = commands.add_parser("convert", help="convert between HF and Megatron checkpoints")
    directions = convert.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    imp = directions.add_parser("import", help="HF checkpoint dir -> Megatron distributed checkpoint")
    imp.add_argument("--hf", required=True, help="HF Qwen2.5-VL checkpoint directory")
    imp.add_argument("--out", required=True, help="output checkpoint directory")
    _add_layout_args(imp)
    imp.set_defaults(func=cmd_convert_import)
    exp = directions.add_parser("export", help="Megatron distributed checkpoint -> HF checkpoint dir")
    exp.add_argument("--ckpt", required=True, help="policy checkpoint directory")
    exp.add_argument("--out", required=True, help="output HF directory")
    _add_layout_args(exp)
    exp.set_defaults(func=cmd_convert_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except NemoViperError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
