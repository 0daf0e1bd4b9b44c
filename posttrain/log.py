"""posttrain's one logger: informational lines once per launch, warnings with the rank that raised them.

Under `accelerate launch` or torchrun every process runs the same code; without this an 8-GPU run prints each
line 8 times. Informational lines (`posttrain: ...` on stdout) come from the main process only; warnings
(stderr) come from any process and, in a multi-process run, name its rank. `posttrain --quiet` keeps errors and
the final summary only (set_quiet), and also silences transformers' and datasets' progress bars.

The rank is read from the launcher's environment (RANK, set by torchrun and accelerate), so logging never
imports torch or starts a process group.
"""

from __future__ import annotations

import logging
import os
import sys

_logger = logging.getLogger("posttrain")
_QUIET = "POSTTRAIN_QUIET"  # inherited by the processes that --nproc launches


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main_process() -> bool:
    return rank() == 0


def quiet() -> bool:
    return os.environ.get(_QUIET, "") == "1"


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        where = f" [rank {rank()}]" if record.levelno >= logging.WARNING and world_size() > 1 else ""
        kind = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}{where}: "
        return f"posttrain: {kind}{record.getMessage()}"


class _MainProcessInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or is_main_process()


class _Stream(logging.Handler):
    """INFO to stdout, WARNING and above to stderr; looks the streams up on each line (pytest swaps them)."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
        stream.write(self.format(record) + "\n")
        stream.flush()


def _configure() -> None:
    if _logger.handlers:
        return
    handler = _Stream()
    handler.setFormatter(_Format())
    handler.addFilter(_MainProcessInfo())
    _logger.addHandler(handler)
    _logger.propagate = False
    _logger.setLevel(logging.ERROR if quiet() else logging.INFO)


def set_quiet(enabled: bool = True) -> None:
    """Errors and the final summary only, in this process and the ones it launches."""
    os.environ[_QUIET] = "1" if enabled else ""
    _configure()
    _logger.setLevel(logging.ERROR if enabled else logging.INFO)
    if enabled:
        os.environ["TQDM_DISABLE"] = "1"  # tqdm >= 4.66 reads it: datasets', TRL's and posttrain's own bars
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
        os.environ["DATASETS_VERBOSITY"] = "error"


def info(message: str) -> None:
    _configure()
    _logger.info(message)


def warning(message: str) -> None:
    _configure()
    _logger.warning(message)


def progress_disabled() -> bool:
    """For tqdm(disable=...): bars on the main process only, and none in a quiet run."""
    return quiet() or not is_main_process()
