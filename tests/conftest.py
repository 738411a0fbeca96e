"""Shared test helpers."""

from __future__ import annotations

import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def source_cache(request, name: str, sources: tuple[str, ...], recipe: object) -> Path:
    """A folder in pytest's cache for slow-to-build test assets (worlds, policies, judges), keyed by
    the source files that build them and by their recipe (`repr`), so any change rebuilds them."""
    digest = hashlib.sha256(b"".join((ROOT / s).read_bytes() for s in sources) + repr(recipe).encode())
    return Path(request.config.cache.mkdir(f"r1flow-{name}-{digest.hexdigest()[:10]}"))


def drain_prefect(timeout: float = 30) -> None:
    """Deliver the run logs and events this process still queues for the current Prefect server. Call
    it before stopping a test server: otherwise Prefect retries them against the dead server at exit,
    for minutes, after the suite has finished."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        service.drain_all(timeout=timeout, at_exit=False)
