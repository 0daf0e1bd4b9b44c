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


# What quiet sets for the libraries (and the processes --nproc launches): tqdm >= 4.66 reads TQDM_DISABLE (datasets',
# TRL's and posttrain's own bars); transformers and datasets read their verbosity from the environment.
_QUIET_ENVIRONMENT = {"TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error", "DATASETS_VERBOSITY": "error"}
_before_quiet: dict[str, str | None] = {}


def set_quiet(enabled: bool = True) -> None:
    """Errors and the final summary only, in this process and the ones it launches; set_quiet(False) undoes it."""
    _configure()
    _logger.setLevel(logging.ERROR if enabled else logging.INFO)
    if enabled and not quiet():
        _before_quiet.update({name: os.environ.get(name) for name in _QUIET_ENVIRONMENT})
        os.environ.update(_QUIET_ENVIRONMENT)
    elif not enabled:
        for name, value in _before_quiet.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _before_quiet.clear()
    os.environ[_QUIET] = "1" if enabled else ""


def info(message: str) -> None:
    _configure()
    _logger.info(message)


def warning(message: str, every_rank: bool = True) -> None:
    """every_rank=False: a warning that every process would raise alike, said once, by the main process."""
    _configure()
    if every_rank or is_main_process():
        _logger.warning(message)


def progress_disabled() -> bool:
    """For tqdm(disable=...): bars on the main process only, and none in a quiet run."""
    return quiet() or not is_main_process()
