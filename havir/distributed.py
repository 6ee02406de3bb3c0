"""Running as several processes under ``accelerate launch`` (one per GPU), with the results of one.

``havir features``, ``havir train`` and ``havir reconstruct`` split their work across the
processes the launch starts: features and reconstructions by whole batches (each batch is
computed exactly as a single process computes it, so the outputs are the same), training by
data parallelism (every process takes its rows of each global batch; see :mod:`havir.train`).
The main process alone writes files; the others wait for it where they must.

Not launched (a plain ``havir ...``), there is one process and everything here is a no-op.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from torch import nn


def processes() -> PartialState:
    """The launch this process belongs to: ``num_processes``, ``process_index``, ``is_main_process``,
    ``device``, ``wait_for_everyone()`` (accelerate's one shared state, read from the environment).

    ``PartialState`` takes the CPU (gloo) only when asked to; on a machine without CUDA there is
    nothing else, and without asking it would run N unconnected copies of the command.
    """
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


@dataclass(frozen=True)
class Shard:
    """This process's rows of a global batch of ``total`` rows: ``start : start + size`` or,
    when the batch is ``blocks`` equal blocks (one per subject of a cross-subject run), the rows
    ``start : start + size / blocks`` of each block."""

    start: int
    size: int
    total: int
    blocks: int = 1

    @classmethod
    def of(cls, total: int, index: int, count: int, blocks: int = 1) -> Shard:
        """Contiguous within each block, as even as can be (sizes differ by at most one; some are
        empty when a block has fewer rows than ``count``, as in a short last batch)."""
        block = total // blocks
        start, stop = block * index // count, block * (index + 1) // count
        return cls(start, (stop - start) * blocks, total, blocks)

    @property
    def block_rows(self) -> slice:
        """This process's rows within each block."""
        return slice(self.start, self.start + self.size // self.blocks)

    @property
    def rows(self) -> slice | torch.Tensor:
        """This process's rows of the global batch (an index tensor when there are several blocks)."""
        if self.blocks == 1:
            return self.block_rows
        block = self.total // self.blocks
        return torch.cat([torch.arange(b * block + self.start, b * block + self.block_rows.stop) for b in range(self.blocks)])

    @property
    def weight(self) -> float:
        """This shard's share of a mean over the global batch."""
        return self.size / self.total


_current_shard: ContextVar[Shard | None] = ContextVar("havir_batch_shard", default=None)


@contextmanager
def batch_shard(shard: Shard) -> Iterator[None]:
    """Within this block, :class:`ShardDropout` layers draw the masks of ``shard``'s rows of the global batch."""
    token = _current_shard.set(shard)
    try:
        yield
    finally:
        _current_shard.reset(token)


class ShardDropout(nn.Dropout):
    """``nn.Dropout`` whose masks do not depend on how a batch is split across processes.

    Inside :func:`batch_shard`, every process draws the mask of the whole global batch (the same
    random numbers a single process draws for it, from the same seeded generator) and applies its
    own rows; so each process's generator also stays where a single process's would be. Outside,
    it is ``nn.Dropout``. (Dropout is ``x * mask / (1 - p)``, so ``x * dropout(ones)`` is
    ``dropout(x)``, bit for bit on the CPU.)
    """

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shard = _current_shard.get()
        if shard is None or not self.training or self.p == 0:
            return super().forward(hidden)
        mask = F.dropout(hidden.new_ones((shard.total, *hidden.shape[1:])), self.p, training=True)
        return hidden * mask[shard.rows]
