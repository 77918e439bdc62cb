"""What a CLI run that refuses bad input must print."""

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
