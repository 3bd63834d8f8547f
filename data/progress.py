"""Progress of the tools' long loops: a tqdm bar on a terminal; elsewhere (a log, nohup, CI, a notebook) a key:value
`progress` line on stdout at least every PROGRESS_SECONDS, from a timer thread, so an item that takes long (a shard
download, a sweep variant) still reports. train_moe.py has its own, in RunLog: it imports nothing from the repo.
"""
import sys
import threading
import time

from tqdm import tqdm

PROGRESS_SECONDS = 25  # under the 30 s that a reader waits before suspecting a hang


def progress(iterable=None, *, total=None, desc: str, unit: str = "it", **tqdm_options):
    """tqdm(iterable, ...) on a terminal (stderr), Lines(iterable, ...) otherwise; use as tqdm: iterate, update,
    set_postfix_str, close or `with`."""
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, **tqdm_options)
    return Lines(iterable, total=total, desc=desc, unit=unit)


class Lines:
    """The part of tqdm's interface the tools use, as `progress:<what> done:…/… elapsed_s:… eta_s:…` lines."""

    def __init__(self, iterable=None, *, total=None, desc: str, unit: str = "it"):
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n, self.postfix = 0, ""
        self.start = self.last = time.monotonic()
        self.closed = threading.Event()
        self.timer = threading.Thread(target=self._beats, daemon=True)
        self.timer.start()

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: int = 1):
        self.n += n

    def set_postfix_str(self, text: str):
        self.postfix = text

    def line(self, now: float) -> str:
        elapsed = now - self.start
        of = f"/{self.total}" if self.total is not None else ""
        done = f" done:{self.n}{of} unit:{self.unit}" if of or self.n else ""
        eta = f" eta_s:{elapsed * (self.total - self.n) / self.n:.0f}" if self.total and self.n else ""
        postfix = f" {self.postfix}" if self.postfix else ""
        return f"progress:{self.desc}{done} elapsed_s:{elapsed:.0f}{eta}{postfix}"

    def beat(self, now: float):
        if now - self.last >= PROGRESS_SECONDS:
            self.last = now
            print(self.line(now), flush=True)

    def _beats(self):
        while not self.closed.wait(1.0):
            self.beat(time.monotonic())

    def close(self):
        self.closed.set()
        if self.timer is not threading.current_thread():
            self.timer.join()
