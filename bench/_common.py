"""Small helpers shared by the benchmarks: timing windows, percentiles and output.

Conventions every benchmark follows:

* Human-readable progress goes to stderr (:func:`progress`); the machine-readable
  result is ONE JSON object printed as the last line of stdout (:func:`emit_result`).
* A worker records one ``(started, finished)`` pair of ``time.perf_counter()``
  values per operation. :func:`summarize` counts only the operations that finished
  inside the measurement :class:`Window`, so a warm-up before ``window.start`` and
  the operations still in flight at ``window.end`` are excluded.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_STARTED = time.perf_counter()

Sample = tuple[float, float]
"""One operation: (perf_counter when it started, perf_counter when it was acknowledged)."""


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by the nearest-rank method; NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    """The median (mean of the two middle values for an even count); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when the denominator is not positive."""
    return numerator / denominator if denominator > 0 else math.nan


@dataclass(frozen=True, slots=True)
class Window:
    """The measured part of a run, in ``time.perf_counter()`` seconds."""

    start: float
    end: float

    @classmethod
    def after_warmup(cls, warmup_s: float, measure_s: float) -> Window:
        """A window opening ``warmup_s`` from now and lasting ``measure_s``."""
        start = time.perf_counter() + warmup_s
        return cls(start, start + measure_s)

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class RateResult:
    """Operations acknowledged inside a window, their rate and latency."""

    ops: int
    seconds: float
    per_s: float
    p50_ms: float
    p99_ms: float

    def to_json(self) -> dict[str, float]:
        return {
            "ops": self.ops,
            "seconds": round(self.seconds, 3),
            "per_s": round(self.per_s, 1),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
        }


def summarize(samples: Iterable[Sample], window: Window) -> RateResult:
    """Rate and latency of the operations that finished inside ``window``."""
    latencies = [end - start for start, end in samples if window.start <= end <= window.end]
    return RateResult(
        ops=len(latencies),
        seconds=window.seconds,
        per_s=ratio(len(latencies), window.seconds),
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
    )


def progress(message: str) -> None:
    """One line of progress on stderr, stamped with the seconds since start-up."""
    print(f"[{time.perf_counter() - _STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


def _finite(value: Any) -> Any:
    """JSON has no NaN: turn non-finite floats into None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def emit_result(result: Mapping[str, Any]) -> None:
    """Print the result as one JSON line on stdout (the benchmark's last stdout line)."""
    sys.stdout.write(json.dumps(_finite(result), sort_keys=True, allow_nan=False) + "\n")
    sys.stdout.flush()
