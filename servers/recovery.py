"""When a batch fails, find the request that broke it and finish every other one normally, streaming included.

Validation is meant to catch every request that could fail inside the engine; this is the net under it. The
unfinished requests of a failed batch are run again from the start in halves; a half that fails again is halved
again, until the request that fails alone is found and answered with an error of its own. A re-run draws the same
tokens (greedy, or seeded: :class:`servers.jobs.GenRequest` fixes every seed when it is made) and swallows the text
already streamed, so a client that was reading a stream just keeps reading. Cost: about log2(batch) re-runs of the
healthy rows, paid only when something slipped through validation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from servers.jobs import Failed, GenRequest

log = logging.getLogger(__name__)

FAILED_ALONE = "generation failed (server error) while running this request; other requests were not affected"


def isolate(batch: Sequence[GenRequest], decode: Callable[[list[GenRequest]], None]) -> list[GenRequest]:
    """Re-run the unfinished requests of a failed ``batch`` with ``decode`` in halves; returns the requests that
    failed alone (each answered with a 500). A request that finished before the failure is not re-run (its answer
    is complete), but it is never blamed either: a request is blamed only when it fails alone."""
    todo = [r for r in batch if not r.finished]
    half = (len(todo) + 1) // 2
    culprits: list[GenRequest] = []
    for part in (todo[:half], todo[half:]) if len(todo) > 1 else (todo,):
        if not part:
            continue
        for r in part:
            r.rerun()
        try:
            decode(part)
        except Exception:
            if len(part) == 1:
                log.exception("a request failed when run alone")
                part[0].emit(Failed(500, FAILED_ALONE))
                culprits += part
            else:
                log.exception("a re-run of %d requests failed again; halving it", len(part))
                culprits += isolate(part, decode)
    return culprits
