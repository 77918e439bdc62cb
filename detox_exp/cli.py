"""The ``detox-exp`` entrypoint (also ``python -m detox_exp``): one ``@hydra.main``.

Bad input (config typos, impossible values, missing files, malformed data) ends with one
line on stderr that names the field and the fix, and exit code 2; set HYDRA_FULL_ERROR=1 for
the traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
EXIT_BAD_INPUT = 2
EXIT_TRAINING_FAILED = 3


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    from detox_exp.pipeline import run_task

    return run_task(cfg)


# Hydra plugins -> the pyproject extra that installs them
PLUGIN_EXTRAS = {"submitit": "slurm", "joblib": "sweep", "optuna": "sweep"}


def _chain(err: BaseException):
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

    from detox_exp.errors import DetoxError

    for item in _chain(err):
        if isinstance(item, DetoxError):
            return str(item)
    for item in _chain(err):
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
            if key:
                return (
                    f"{key.group(1)}: unknown config option; fix: check the spelling "
                    f"(`detox-exp --cfg job` lists every key) or add it with +{key.group(1)}=..."
                )
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


class _HoldJobError:
    """``sys.stderr`` that holds back Hydra's "Error executing job with overrides" line: for
    bad input our one line replaces it; for anything else it is written before the
    traceback."""

    PREFIX = "Error executing job with overrides:"

    def __init__(self, stream: Any) -> None:
        self.stream, self.held = stream, []

    def write(self, text: str) -> int:
        if text.startswith(self.PREFIX):
            self.held.append(text)
            return len(text)
        return self.stream.write(text)

    def release(self) -> None:
        for text in self.held:
            self.stream.write(text)
        self.held.clear()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def main() -> None:
    """Console script: run Hydra, turning bad input into a one-line error and exit code 2."""
    user_full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let exceptions reach us; we format them below
    stderr = sys.stderr
    sys.stderr = held = _HoldJobError(stderr)
    try:
        hydra_main()
        held.release()  # a sweeper that tolerated a failed job: keep Hydra's line
    except Exception as err:
        message = bad_input_message(err)
        if message is None or user_full_error:
            held.release()
            raise
        from detox_exp.errors import TrainingError

        print(f"detox-exp: error: {message}", file=sys.stderr)
        failed = any(isinstance(e, TrainingError) for e in _chain(err))
        sys.exit(EXIT_TRAINING_FAILED if failed else EXIT_BAD_INPUT)
    finally:
        sys.stderr = stderr
        if not user_full_error:
            os.environ.pop("HYDRA_FULL_ERROR", None)


if __name__ == "__main__":
    main()
