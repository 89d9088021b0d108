"""Stop requests: Ctrl-C, SIGTERM (a kill, a scheduler's time limit) and SIGHUP (a closed terminal
or SSH session), from the script's first line to its last, through one handler whose answer depends
on how far the run has come:

    LOADING    torch is still importing (seconds): one line and exit 128 + the signal at once, with
               os._exit, because an exception raised inside a native module's initialisation can
               abort. Nothing is written yet.
    STARTING   the run is being set up, or has ended: Interrupted is raised; train_cifar100.main()
               says so in one line and returns 128 + the signal.
    TRAINING   the loop sees `signal` set (after each step in one process, at the next agreed check
               under torchrun), saves a checkpoint and stops; a second signal raises Interrupted.

A signal ignored when the process started stays ignored: under nohup a closed session does not stop
the run, nor Ctrl-C a job started with &. Torch-free, so that it can be installed before torch
loads.
"""
import contextlib
import os
import signal
import sys

from tqdm import tqdm

STOP_SIGNALS = tuple(sig for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None))
                     if sig)  # Windows has no SIGHUP
LOADING, STARTING, TRAINING = "loading", "starting", "training"


def handled(signals):
    """Those of these signals that were not ignored when the process started."""
    return [sig for sig in signals if signal.getsignal(sig) is not signal.SIG_IGN]


class Interrupted(KeyboardInterrupt):
    """A stop signal outside the loop, or a second one in it: stop at once, saving nothing first."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Held:
    depth, pending = 0, None


@contextlib.contextmanager
def held():
    """Within the block a stop signal that would stop at once waits for its end: for writes that
    must land together (last.pth and args.json)."""
    _Held.depth += 1
    try:
        yield
    finally:
        _Held.depth -= 1
        if not _Held.depth and _Held.pending:
            signum, _Held.pending = _Held.pending, None
            raise Interrupted(signum)


class StopSignals:
    """The handler of the stop signals for one run of the script. install() at the top of a script
    (LOADING); `with stops:` around main's work (STARTING, the previous handlers back on exit);
    `with stops.training(announce):` around the loop (TRAINING)."""

    def __init__(self):
        self.phase, self.signal, self.announce, self.previous = LOADING, None, False, {}

    def install(self) -> "StopSignals":
        if not self.previous:
            self.previous = {sig: signal.signal(sig, self._handle) for sig in handled(STOP_SIGNALS)}
        return self

    def __enter__(self) -> "StopSignals":
        self.install()
        self.phase, self.signal = STARTING, None
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous, self.phase = {}, LOADING

    @contextlib.contextmanager
    def training(self, announce: bool = True):
        self.phase, self.announce = TRAINING, announce
        try:
            yield self
        finally:
            self.phase = STARTING

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.phase == LOADING:
            print(f"{name}: stopped while loading; nothing was written", file=sys.stderr,
                  flush=True)
            os._exit(128 + signum)
        if self.phase == STARTING or self.signal is not None:
            if _Held.depth:
                _Held.pending = signum
                return
            raise Interrupted(signum)
        self.signal = signum
        if self.announce:
            tqdm.write(f"\n{name}: saving a checkpoint at the next check...")
