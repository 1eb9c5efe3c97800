"""SIGTERM and SIGHUP stop a study or a final stage as Ctrl-C does.

SLURM, Kubernetes, a preempted VM, `kill` and a closed terminal send SIGTERM or SIGHUP. While a command runs
Ray (between `install()` and `restore()`), the first such signal is turned into Ctrl-C: Tune stops the trials
and saves its state, fer-tune writes its files and the resume command, and the command exits 128 + the signal
(143 for SIGTERM, 129 for SIGHUP). A second signal stops the process at once (the locks it holds are released
first; the state Tune saved a few seconds earlier still resumes).

Ray's own handler (installed by ray.init) would dump a native stack on the terminal and exit; this one
replaces it in the driver.
"""

from __future__ import annotations

import os
import signal
import threading

HANDLED = (signal.SIGTERM, signal.SIGHUP)
_received: list[int] = []
_previous: dict[int, object] = {}


def received() -> int | None:
    """The first SIGTERM / SIGHUP this process received while it was handled, if any."""
    return _received[0] if _received else None


def exit_code(default: int = 130) -> int:
    """128 + the signal that stopped the command, else `default` (130: Ctrl-C)."""
    sig = received()
    return 128 + sig if sig else default


def _say(text: str) -> None:
    """To stderr with one write(2), which is safe in a signal handler (logging and print take locks that the
    interrupted code may hold)."""
    try:
        os.write(2, text.encode())
    except OSError:
        pass


def _handler(signum: int, frame) -> None:
    name = signal.Signals(signum).name
    if _received:
        from .lock import release_all

        _say(f"\nfer-tune: {name} received again: stopping at once\n")
        release_all()
        os._exit(128 + _received[0])
    _received.append(signum)
    _say(
        f"\nfer-tune: {name} received: stopping the trials and saving the study as Ctrl-C does (send it again to "
        "stop at once)\n"
    )
    interrupt(frame)


def interrupt(frame=None) -> None:
    """Stop the command's run as Ctrl-C does, from its main thread: through the SIGINT handler in place, Tune's
    (it stops the trials and saves its state, every trial resumable) or Python's (KeyboardInterrupt)."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


def install() -> None:
    """Handle SIGTERM and SIGHUP in this (main) thread until restore()."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in HANDLED:
        previous = signal.signal(sig, _handler)
        _previous.setdefault(sig, previous)


def restore() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, previous in list(_previous.items()):
        signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        del _previous[sig]
