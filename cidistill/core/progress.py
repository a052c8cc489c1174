"""One progress display per long stage: a tqdm bar on a terminal; elsewhere (a log file, `ray job logs`) a
line on stdout at a tenth of the work at most every `min_gap` seconds (work that ends sooner prints none: its
stage's summary line follows), so a log shows progress without a wall of carriage returns."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, unit: str = "it", initial: int = 0, disable: bool = False,
                 min_gap: float = 5.0, rate: bool = True):
        self.total, self.desc, self.unit, self.n, self.rate = max(int(total), 0), desc, unit, initial, rate
        self.disable = disable or not total
        self.bar = None
        self.t0, self.next_tenth, self.postfix = time.time(), (initial * 10 // max(self.total, 1)) + 1, ""
        self.min_gap, self.last_line = min_gap, self.t0
        if not self.disable and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif not self.disable:
            reached = min(10, self.n * 10 // self.total) if self.total else 0
            if reached >= self.next_tenth and reached < 10 and time.time() - self.last_line >= self.min_gap:
                rate = f", {self.n / max(time.time() - self.t0, 1e-9):.1f}/s" if self.rate else ""
                print(f"[{self.desc}] {10 * reached}% ({self.n}/{self.total} {self.unit}{rate})"
                      f"{' ' + self.postfix if self.postfix else ''}", flush=True)  # stdout: stderr is for errors
                self.next_tenth, self.last_line = reached + 1, time.time()

    def set_postfix(self, **values) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
