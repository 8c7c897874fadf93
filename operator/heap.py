"""The operator's cyclic garbage collector, set for a process that holds every pod of the cluster.

The operator keeps every active pod in its cache (podcache.py): at 30,000 pods well over 100,000 objects
the collector tracks, which live as long as their pods. Python's collector walks all of them in each full
collection, and its default thresholds (a young collection every 700 new objects) run collections all
along while a trace is published: decoding a watch event's JSON makes hundreds of dicts. Measured while a
trace was published to 1,000 nodes × 30 pods (`.ci/bench --only controlplane --cp-scales 1000`, the
collector's time summed with `gc.callbacks`; tests/bench/RESULTS.md): 1.4 s of the operator's 4.0 s of CPU
was the collector's, four full collections of about 0.27 s each and some 400 young and middle ones. So:

- `settle()`, after each complete list of the pod cache: one full collection (so that no garbage is kept),
  then `gc.freeze()`: what exists now is moved out of the collector's sight. It is still freed when its
  last reference goes (a pod's entry, replaced or deleted); only reference cycles among it would stay.
- `configure()`, at start: a young collection every 10,000 new objects instead of 700, so that most of an
  event's objects are gone before one runs (the operator's resident memory, idle and at its peak, stayed
  within 5 MiB of what it was with Python's defaults).
"""

from __future__ import annotations

import gc

THRESHOLDS = (10_000, 10, 10)  # young, middle, old (Python's default: 700, 10, 10)


def configure() -> None:
    gc.set_threshold(*THRESHOLDS)


def settle() -> None:
    gc.collect()
    gc.freeze()
