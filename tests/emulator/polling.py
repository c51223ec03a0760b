"""Poll until a condition holds (the emulator's tests wait on controllers and watches this way)."""

import time


def wait_until(pred, *, timeout: float, step: float = 0.1, ignore: tuple = ()):
    """pred()'s first truthy value within `timeout` seconds; exceptions in `ignore` count as not yet."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            value = pred()
        except ignore:
            value = None
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met in time")
