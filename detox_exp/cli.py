"""The ``detox-exp`` entrypoint (also ``python -m detox_exp``): one ``@hydra.main``.

Bad input (config typos, impossible values, missing files, malformed data) ends with one
line on stderr that names the field and the fix, and exit code 2; set HYDRA_FULL_ERROR=1 for
the traceback. Ctrl-C / SIGTERM end with one line (the step, the checkpoint, the command that
resumes) and exit code 130 / 143. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from detox_exp.config_keys import with_suggestions
from detox_exp.errors import bad_input_message, exception_chain
from detox_exp.interrupt import Interrupted

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
EXIT_BAD_INPUT = 2
EXIT_TRAINING_FAILED = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


def _registry_choice(field: str) -> str:
    """``${registry_choice:ppo.advantage_estimator}``: a sweep over every registered name."""
    from detox_exp.ppo.checks import sweep_choice  # torch: only when a config asks

    return sweep_choice(field)


def register_config() -> None:
    """What composing conf/ needs beyond its files: the typed PPO schema in Hydra's
    ConfigStore (``ppo_schema``, composed by conf/ppo/default.yaml as /ppo_schema@_here_) and
    the ``registry_choice`` resolver. Runs when this module is imported (the entrypoint;
    tests that compose import it too)."""
    from omegaconf import OmegaConf

    import detox_exp.ppo.settings  # noqa: F401 - stores the schema node on import

    OmegaConf.register_new_resolver("registry_choice", _registry_choice, replace=True)


register_config()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    from detox_exp.pipeline import run_task

    return run_task(cfg)


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
    for flag in ("-v", "--verbose"):  # library output on the console too (conf: verbose)
        if flag in sys.argv[1:]:
            sys.argv = [a for a in sys.argv if a != flag] + ["verbose=true"]
    user_full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let exceptions reach us; we format them below
    stderr = sys.stderr
    sys.stderr = held = _HoldJobError(stderr)
    try:
        hydra_main()
        held.release()  # a sweeper that tolerated a failed job: keep Hydra's line
    except Interrupted as stop:  # SIGINT / SIGTERM during the run (detox_exp.interrupt)
        print(f"detox-exp: {stop.message()}", file=sys.stderr)
        sys.exit(stop.exit_code)
    except KeyboardInterrupt:  # Ctrl-C before the run started: nothing was written
        print("detox-exp: stopped by SIGINT before the run started", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as err:
        # an unknown key: with the closest keys of the config composed without it
        message = bad_input_message(with_suggestions(err, CONF_DIR, sys.argv[1:]))
        if message is None or user_full_error:
            held.release()
            raise
        from detox_exp.errors import TrainingError

        print(f"detox-exp: error: {message}", file=sys.stderr)
        failed = any(isinstance(e, TrainingError) for e in exception_chain(err))
        sys.exit(EXIT_TRAINING_FAILED if failed else EXIT_BAD_INPUT)
    finally:
        sys.stderr = stderr
        if not user_full_error:
            os.environ.pop("HYDRA_FULL_ERROR", None)


if __name__ == "__main__":
    main()
