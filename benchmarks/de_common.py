"""Peak-memory reading for the DE benchmark workers (standard library only: both envs use it)."""

from __future__ import annotations

import threading
import time
from pathlib import Path


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak resident memory during a ``with`` block, in MiB above the RSS at its start.

    Resets the kernel's high-water mark (``/proc/self/clear_refs``) where allowed and also
    samples the RSS every 20 ms, reporting the larger of the two readings.
    """

    def __enter__(self) -> PeakMemory:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False
        self.start = _status_mib("VmRSS")
        self.sampled = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.sampled = max(self.sampled, _status_mib("VmRSS"))
            time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        hwm = _status_mib("VmHWM") if self.reset else 0.0
        self.peak = max(self.sampled, hwm)
        self.above_start = self.peak - self.start
