"""Shared command-line plumbing: config flags, logging, and one-line errors with exit codes."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from common.config import PipelineConfig, load_config
from common.errors import RetrievalError
from common.logs import setup_logging

LOG = logging.getLogger(__name__)


def int64(text: str) -> int:
    """An argparse type: an integer that fits INT64 (ids go to the server as INT64); ValueError otherwise."""
    value = int(text)
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"{text} is outside INT64")
    return value


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """--config FILE and repeatable --set section.field=value (applied after the environment)."""
    parser.add_argument("--config", metavar="FILE", help="YAML file with data/train/index/serve sections")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one setting, e.g. --set train.epochs=3 (repeatable)")


def config_from_args(args: argparse.Namespace, extra: list[str] | None = None, base: PipelineConfig | None = None) -> PipelineConfig:
    return load_config(args.config, [*args.overrides, *(extra or [])], base=base)


def run_cli(main: Callable[[], int]) -> None:
    """Runs a CLI body: logging once, RetrievalErrors as one line on stderr with exit code 1."""
    setup_logging()
    try:
        code = main()
    except RetrievalError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code or 0)
