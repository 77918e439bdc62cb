"""User-facing errors: one line that names the config field (or file) and the fix, and the
translation of other bad-input exceptions (Hydra's, OmegaConf's, the file system's) into
such a line (:func:`bad_input_message`, used by the CLI and by sweeps)."""

from __future__ import annotations

import os
import re
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path


class DetoxError(Exception):
    """Bad input. The CLI prints it as one line and exits with code 2."""

    def __init__(self, field: str, problem: str, fix: str) -> None:
        self.field, self.problem, self.fix = field, problem, fix
        super().__init__(f"{field}: {problem}; fix: {fix}")


class ConfigError(DetoxError):
    """An impossible or inconsistent config value."""


class DataError(DetoxError):
    """A missing, malformed or empty data file or model directory."""


class TrainingError(DetoxError):
    """Training cannot go on (e.g. NaN / inf in scores, rewards, advantages or the loss).
    The CLI prints it as one line and exits with code 3."""


class UnknownKeyError(ConfigError):
    """A config key that does not exist (``field``, dotted), with the closest known keys
    (``suggestions``; failing those, the keys its node has: ``choices``) or, where the
    node's ``_target_`` takes such an argument, the ``+key=`` that adds it (``added_for``:
    the target's name). A check deep inside suggests from the
    keys its node knows; the CLI replaces them with those of the whole config
    (:func:`detox_exp.config_keys.with_suggestions`)."""

    def __init__(
        self,
        field: str,
        suggestions: Sequence[str] = (),
        added_for: str | None = None,
        choices: Sequence[str] = (),
    ) -> None:
        self.suggestions, self.added_for, self.choices = suggestions, added_for, choices
        listing = "(`detox-exp --cfg job` lists every key)"
        if added_for is not None:
            problem = "not in the config yet"
            fix = f"add it with +{field}=... ({added_for} takes it)"
        elif suggestions:
            names = ", ".join(suggestions[:-1])
            names = f"{names} or {suggestions[-1]}" if names else suggestions[0]
            problem = f"unknown config key (did you mean {names}?)"
            fix = f"use the key you meant, e.g. {suggestions[0]}=... {listing}"
        elif choices:
            problem = "unknown config key"
            names = ", ".join(c.rpartition(".")[2] for c in choices)
            fix = f"use a key of {field.rpartition('.')[0] or 'the config'}: {names}"
        else:
            problem = "unknown config key"
            fix = f"check the spelling {listing}"
        super().__init__(field, problem, fix)


# Hydra plugins -> the pyproject extra that installs them
PLUGIN_EXTRAS = {"submitit": "slurm", "joblib": "sweep", "optuna": "sweep"}


def exception_chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and its causes / contexts, outermost first."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _stdlib(filename: str) -> bool:
    """Whether ``filename`` is a module of Python's standard library (pathlib, os...)."""
    stdlib = os.path.dirname(os.__file__)
    parts = Path(filename).parts
    return filename.startswith(stdlib) and not {"site-packages", "dist-packages"} & set(parts)


def _run_dir_error(err: BaseException) -> bool:
    """An OSError from creating the run dir: a permission / not-a-folder error anywhere, or
    any OSError (e.g. no such folder under /proc, a read-only file system) raised by the
    ``mkdir`` with which Hydra creates the run dir or its .hydra folder. Errors of the job
    itself also pass through Hydra's ``run_job`` (re-raised there), so the test is on the
    innermost frame outside pathlib / os, where the error was raised."""
    if isinstance(err, (PermissionError, NotADirectoryError, FileExistsError)):
        return True
    if not isinstance(err, OSError):
        return False
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not _stdlib(f.filename)]
    hydra_setup = os.path.join("hydra", "core", "utils.py")
    return bool(frames) and (
        frames[-1].filename.endswith(hydra_setup) and frames[-1].name in ("run_job", "_save_config")
    )


def bad_input_message(err: BaseException) -> str | None:
    """One-line message for a bad-input error anywhere in the exception chain, else None."""
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, ValidationError

    for item in exception_chain(err):
        if isinstance(item, DetoxError):
            return str(item)
    for item in exception_chain(err):
        text = str(item)
        if isinstance(item, RuntimeError) and 'Could not detect "srun"' in text:
            return (
                "hydra/launcher: slurm needs a SLURM cluster (srun not found); fix: launch from "
                "a SLURM login node, or use hydra/launcher=local_parallel here"
            )
        if _run_dir_error(item):
            return (
                f"paths.output_dir: cannot write {item.filename} ({item.strerror}); "
                "fix: choose a writable hydra.run.dir / hydra.sweep.dir"
            )
        if isinstance(item, MissingConfigException):
            group = re.search(r"Could not find '([^']+)/([^']+)'", text)
            options = re.findall(r"^\t(\S+)$", text, flags=re.M)
            if group:
                return (
                    f"{group.group(1)}: no option {group.group(2)!r}; "
                    f"fix: choose one of {', '.join(options) or '(none)'}"
                )
            plugin = re.search(r"Could not load 'hydra/(launcher|sweeper)/([^']+)'", text)
            if plugin:  # the config of a Hydra plugin that is not installed
                extra = next((e for k, e in PLUGIN_EXTRAS.items() if k in plugin.group(2)), None)
                fix = f"pip install -e '.[{extra}]'" if extra else "install its Hydra plugin"
                return (
                    f"hydra/{plugin.group(1)}: the {plugin.group(2)} plugin is not installed; "
                    f"fix: {fix}"
                )
            return text.splitlines()[0] + "; fix: check the config group option names"
        if isinstance(item, ConfigCompositionException):
            key = re.search(r"Could not override '([^']+)'", text)
            if key:  # the CLI adds the closest keys (config_keys.with_suggestions)
                return str(UnknownKeyError(key.group(1)))
            return " ".join(text.split()) + "; fix: check the command-line overrides"
        if isinstance(item, MissingMandatoryValue):
            key = re.search(r"full_key: (\S+)", text)
            name = key.group(1) if key else text.splitlines()[0]
            return f"{name}: required value is missing; fix: set {name}=... on the command line"
        if isinstance(item, (ConfigKeyError, ValidationError)):
            key = re.search(r"full_key: (\S+)", text)
            name = key.group(1) if key else "config"
            return f"{name}: {text.splitlines()[0]}; fix: check the key and its type"
    return None
