"""The one place loaded models are cached, keyed by (kind, file, mtime, options).

The server and the executor keep models warm between jobs through this cache; loaders stay
pure (same file -> same model). A small per-kind LRU bound keeps a long-running server from
holding every model it ever saw.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

MAX_PER_KIND = 2

_lock = threading.RLock()
_entries: dict[str, OrderedDict[Hashable, Any]] = {}
load_counts: dict[str, int] = {}
"""kind -> number of real loads; tests use it to show a re-run did not reload."""


def _file_stamp(path: str) -> tuple:
    try:
        st = os.stat(path)
        return (st.st_mtime_ns, st.st_size)
    except OSError:
        return (None, None)


def cached(kind: str, path: str, options: tuple, load: Callable[[], T]) -> T:
    key = (str(path), _file_stamp(str(path)), options)
    with _lock:
        entries = _entries.setdefault(kind, OrderedDict())
        if key in entries:
            entries.move_to_end(key)
            return entries[key]
        value = load()
        load_counts[kind] = load_counts.get(kind, 0) + 1
        entries[key] = value
        while len(entries) > MAX_PER_KIND:
            evicted, _ = entries.popitem(last=False)
            log.info("unloaded %s %s", kind, evicted[0])
        return value


def clear() -> None:
    """Drop every cached model (the server's POST /free)."""
    with _lock:
        _entries.clear()
