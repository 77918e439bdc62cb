"""What a CLI run that refuses bad input must print: checked on a real run's stderr
(:func:`check_one_line_error`), or in process on the exception the run would stop with
(:func:`check_error_line`, the line ``detox_exp.cli.main`` prints for it)."""

from __future__ import annotations


def check_one_line_error(result, *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("detox-exp: error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert not any("Error executing job" in line for line in lines), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert "fix" in errors[0]
    return errors[0]


def check_error_line(err: BaseException, *needles: str) -> str:
    """The line ``detox_exp.cli.main`` prints for ``err``, with the checks of
    :func:`check_one_line_error`: bad input (exit code 2: a message, and no TrainingError,
    which exits 3), one line, naming ``needles`` and the fix."""
    from detox_exp.errors import TrainingError, bad_input_message, exception_chain

    message = bad_input_message(err)
    assert message is not None, f"not bad input (a traceback): {err!r}"
    assert not any(isinstance(e, TrainingError) for e in exception_chain(err)), message
    line = f"detox-exp: error: {message}"
    assert "\n" not in line, line
    for needle in needles:
        assert needle in line, line
    assert "fix" in line
    return line
