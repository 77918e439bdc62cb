"""What a run prints: the project's own lines (stages, tables, the final lines) and progress
bars on the console; library chatter (datasets' map / filter bars, transformers' loading and
shard-writing bars, Python warnings, absl / matplotlib / transformers log lines) in the run's
log file only, W&B's own lines in its run folder's logs. ``verbose=true`` (``detox-exp -v``)
brings it all back to the console."""

from __future__ import annotations

import logging

# loggers whose records reach the console (below ERROR; anything at ERROR or above always does)
OWN_LOGGERS = ("detox_exp", "hydra", "__main__")


class OwnRecords(logging.Filter):
    """Passes the project's and Hydra's records, and every library's errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = any(record.name == n or record.name.startswith(n + ".") for n in OWN_LOGGERS)
        return own or record.levelno >= logging.ERROR


_FILTER = OwnRecords()


def console_handlers() -> list[logging.Handler]:
    """The root logger's handlers that write to a terminal or pipe (not to a file)."""
    return [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]


def configure(verbose: bool = False) -> None:
    """Route library output: every library log record and Python warning goes through the
    root logger (so Hydra's log file gets it); unless ``verbose``, the console handlers drop
    what is not ours, and the libraries' own progress bars are off. Idempotent (a multirun
    calls it once per job)."""
    import os

    import datasets
    import huggingface_hub.utils
    import transformers

    if not verbose:  # W&B's own console lines (artifact uploads...) to its log files
        os.environ.setdefault("WANDB_SILENT", "true")

    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger
    for lib in (transformers.utils.logging, datasets.utils.logging):
        lib.enable_propagation()  # their records reach the root logger's handlers
    transformers.utils.logging.disable_default_handler()  # (its own stderr handler)
    for handler in console_handlers():
        handler.removeFilter(_FILTER)
        if not verbose:
            handler.addFilter(_FILTER)
    bars = (
        transformers.utils.logging.enable_progress_bar,
        datasets.utils.logging.enable_progress_bar,
        huggingface_hub.utils.enable_progress_bars,
    )
    if not verbose:
        bars = (
            transformers.utils.logging.disable_progress_bar,
            datasets.utils.logging.disable_progress_bar,
            huggingface_hub.utils.disable_progress_bars,
        )
    for switch in bars:
        switch()
