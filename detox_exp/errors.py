"""User-facing errors: one line that names the config field (or file) and the fix."""

from __future__ import annotations


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
