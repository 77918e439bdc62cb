"""Stop requests (detox_exp.interrupt): a signal inside the training loop waits for the step
boundary, anywhere else (or a second one) stops at once; the handlers are restored after."""

from __future__ import annotations

import os
import signal
import time

import pytest

from detox_exp import interrupt


def send(signum: int) -> None:
    """Deliver ``signum`` to this process and give Python the chance to run its handler."""
    os.kill(os.getpid(), signum)
    time.sleep(0.01)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_outside_the_loop_a_signal_stops_at_once(signum: int) -> None:
    with interrupt.handling(), pytest.raises(interrupt.Interrupted) as stop:
        send(signum)
    assert stop.value.signum == signum and stop.value.exit_code == 128 + signum
    assert stop.value.step is None and "before the first stage" in stop.value.message()
    stop.value.stage = "evaluate_before"
    assert f"stopped by {signal.Signals(signum).name} during evaluate_before;" in str(
        stop.value.message()
    )


def test_inside_the_loop_the_first_signal_is_a_request_the_second_stops() -> None:
    with interrupt.handling():
        with interrupt.deferred():
            assert interrupt.requested() is None
            send(signal.SIGTERM)  # no exception: the loop reads the request
            assert interrupt.requested() == signal.SIGTERM
            with pytest.raises(interrupt.Interrupted) as stop:
                send(signal.SIGINT)
            assert stop.value.signum == signal.SIGINT
        # after the loop a signal stops at once again
        with pytest.raises(interrupt.Interrupted):
            send(signal.SIGINT)
    assert interrupt.requested() is None


def test_previous_handlers_come_back() -> None:
    before = {s: signal.getsignal(s) for s in interrupt.SIGNALS}
    with interrupt.handling():
        assert all(signal.getsignal(s) is not before[s] for s in interrupt.SIGNALS)
    assert {s: signal.getsignal(s) for s in interrupt.SIGNALS} == before
    with pytest.raises(KeyboardInterrupt):  # Python's own SIGINT handler again
        send(signal.SIGINT)


def test_the_line_names_step_checkpoint_and_command(tmp_path) -> None:
    stop = interrupt.Interrupted(
        signal.SIGTERM, 7, tmp_path / "step-7", "detox-exp seed=1 resume=auto"
    )
    line = stop.message()
    assert "\n" not in line and "SIGTERM" in line and "step 7" in line
    assert str(tmp_path / "step-7") in line and line.endswith("detox-exp seed=1 resume=auto")
    assert "no checkpoint written" in interrupt.Interrupted(signal.SIGINT, 3).message()
    assert not isinstance(stop, Exception)  # `except Exception` (a sweep's job) lets it pass
