"""Native compute releases the GIL, so other Python threads keep running meanwhile."""

from __future__ import annotations

import threading
import time

from kvfast import Session


def test_prefill_releases_the_gil() -> None:
    s = Session.from_pretrained()
    ids = [1 + (i * 7919) % 8000 for i in range(2000)]
    started = threading.Event()
    span: list[float] = []

    def work() -> None:
        started.set()
        t0 = time.perf_counter()
        s.prefill(ids, logits=None)
        span.extend([t0, time.perf_counter()])

    t = threading.Thread(target=work)
    t.start()
    started.wait()
    stamps = []
    while t.is_alive():
        stamps.append(time.perf_counter())
    t.join()
    t0, t1 = span
    assert t1 - t0 > 0.02, f"prefill too quick to tell ({t1 - t0:.3f}s)"
    # This thread must have run in the middle half of the native call: were the GIL held,
    # it could only run before the call started or after it returned.
    lo, hi = t0 + 0.25 * (t1 - t0), t0 + 0.75 * (t1 - t0)
    inside = sum(lo <= x <= hi for x in stamps)
    assert inside > 100, f"only {inside} iterations during the middle of a {t1 - t0:.2f}s call"
