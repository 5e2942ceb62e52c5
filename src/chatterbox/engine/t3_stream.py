"""One request's T3 generation as it runs: its sampled tokens in stop-checked blocks."""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor

# produce(start, n) -> the request's tokens [start, start + m) as (1, m), m <= n (m < n: it ended early)
Produce = Callable[[int, int], Tensor]


class T3Stream:
    """Yields the request's tokens in blocks (1, <= block_size), the last one holding the stop token
    (kept) or ending at ``steps``. ``produce`` makes (or waits for) a block's tokens; the stop check is
    one host read per block, and on CUDA it is read one block late (an asynchronous copy to pinned
    memory), so the device always has the next block queued while the host waits. Steps sampled
    after a stop are computed and discarded. ``close`` (also on early exit or error) gives the
    request's slot and KV cache back."""

    def __init__(self, produce: Produce, steps: int, block_size: int, stop_token: int, device: torch.device,
                 keep: tuple = (), on_close: Callable[[], None] | None = None, first_may_stop: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.steps, self.block_size, self.stop_token = steps, block_size, stop_token
        self._produce = produce
        self._keep = keep  # the request's KV cache: alive until the stream closes
        self._on_close = on_close
        self._lagged = torch.device(device).type == "cuda"
        self._first_may_stop = first_may_stop  # False: the first token is never read as a stop (Turbo)
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._keep = ()
        if self._on_close is not None:
            self._on_close()

    def _blocks(self) -> Iterator[tuple[Tensor, Tensor]]:
        """(block, its stop mask) pairs."""
        for start in range(0, self.steps, self.block_size):
            block = self._produce(start, min(self.block_size, self.steps - start))
            if block.shape[1] == 0:
                return
            hit = block[0] == self.stop_token
            if start == 0 and not self._first_may_stop:
                hit[0] = False
            yield block, hit

    def blocks(self) -> Iterator[Tensor]:
        try:
            if self._lagged:
                yield from self._lagged_blocks()
            else:
                for block, hit in self._blocks():
                    stops = hit.nonzero()  # the per-block host read
                    if stops.numel():
                        yield block[:, :int(stops[0, 0]) + 1]
                        return
                    yield block
        finally:
            self.close()

    def _lagged_blocks(self) -> Iterator[Tensor]:
        pending: tuple[Tensor, Tensor, torch.cuda.Event] | None = None
        for block, hit in self._blocks():
            first = torch.where(hit.any(), hit.int().argmax(), -1)
            host = torch.empty((), dtype=torch.long, pin_memory=True)
            host.copy_(first, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            if pending is not None:
                done, stopped = _settle(*pending)
                yield done
                if stopped:
                    return
            pending = (block, host, event)
        if pending is not None:
            yield _settle(*pending)[0]


def stepped_producer(pool_history: Tensor, slot: int, step: Callable[[], None], lock) -> Produce:
    """``produce`` for a request stepped by its own thread: queue ``n`` steps under ``lock``, then read
    the block from the slot's token history (a copy, queued after the steps)."""
    def produce(start: int, n: int) -> Tensor:
        with lock:
            for _ in range(n):
                step()
            return pool_history[slot, start:start + n].clone()[None]  # (1, n)

    return produce


def _settle(block: Tensor, host: Tensor, event: "torch.cuda.Event") -> tuple[Tensor, bool]:
    event.synchronize()
    stop = int(host)
    return (block, False) if stop < 0 else (block[:, :stop + 1], True)
