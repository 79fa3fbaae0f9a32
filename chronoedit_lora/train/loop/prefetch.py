"""Read the next batch while the current step runs: one background thread, one batch ahead.

What the thread does is file work that releases the GIL (decoding and resizing images, reading
cache entries); the encoders and the DiT stay on the main thread, so the order of every random
draw, and with it exact resume, is unchanged. A batch that fails to load raises its error when
the loop reaches it, as without prefetching.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

Loaded = TypeVar("Loaded")


class Prefetcher:
    """Iterate over ``(batch, load(batch))`` with the next batch already loading; :meth:`close`
    (or leaving the ``with`` block) waits for the thread and drops what was read ahead."""

    def __init__(self, load: Callable[[list[int]], Loaded]):
        self.load = load
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")

    def __call__(self, batches: Iterable[list[int]]) -> Iterator[tuple[list[int], Loaded]]:
        pending: tuple[list[int], Future] | None = None
        for batch in batches:
            upcoming = (batch, self.pool.submit(self.load, batch))
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = upcoming
        if pending is not None:
            yield pending[0], pending[1].result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
