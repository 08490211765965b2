"""The `lefusion` command: one subcommand per job, each a thin wrapper around a typed function.

Bad input surfaces as one sentence (``lefusion: error: ...``) with exit status 2 and nothing written.
"""
from __future__ import annotations

import argparse
import logging
import sys

from lefusion_nnunet import __version__
from lefusion_nnunet.cli import (data_commands, demo, import_checkpoint, mask_commands, nnunet_commands, synthesize,
                                 train)
from lefusion_nnunet.errors import LeFusionInputError
from lefusion_nnunet.threads import configure_threads

COMMAND_MODULES = (data_commands, train, mask_commands, synthesize, nnunet_commands, import_checkpoint, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lefusion",
        description="LeFusion lesion-focused diffusion for nnU-Net v2: train a lesion model on an nnU-Net raw "
                    "dataset, synthesise lesions into lesion-free scans, enlarge datasets, and train nnU-Net "
                    "with synthetic lesions (-tr LeFusionTrainer).")
    parser.add_argument("--version", action="version", version=f"lefusion-nnunet {__version__}")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="intra-op CPU threads (default: OMP_NUM_THREADS if set, else all available CPUs); "
                             "OpenMP threads sleep instead of spinning while they wait, so a busy machine "
                             "does not slow a run down many times over")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        configure_threads(args.threads)   # before any command imports torch: OpenMP reads its settings then
        result = args.func(args)
    except LeFusionInputError as exc:
        print(f"lefusion: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an OS error no check anticipated (disk full, permission) is still one sentence
        print(f"lefusion: error: {_os_error_sentence(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lefusion: interrupted; completed work is kept and --resume continues it.", file=sys.stderr)
        return 130
    return int(result or 0)


def _os_error_sentence(exc: OSError) -> str:
    import errno

    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return f"no space left on the device{where}; free some disk space or choose another output folder."
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied{where}; choose files and folders you can read and write."
    return f"{exc.strerror or exc}{where}; check the path and try again."


if __name__ == "__main__":
    sys.exit(main())
