"""A time limit for a block of code in the main thread, by SIGALRM (Linux): the GPU check's rows
(gpu_check.py) and its test cases (pytest_stream.py) run under one each, so an overrun costs only
itself. A C call in progress (a CUDA synchronisation, say) finishes first; the error comes after."""
import contextlib
import signal


@contextlib.contextmanager
def time_limit(seconds, error):
    """Raise `error` (an exception instance) inside the block once it has run `seconds`."""
    def expire(signum, frame):
        raise error
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
