"""torch.distributed as quantkit uses it: the one home for the world's size, this process's rank, the process group
and the collectives quantkit's data parallelism needs.

quantkit never starts processes itself: `torchrun --nproc-per-node N -m quantkit eval ...` starts N copies of the
command and sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; `init_from_env` (called once by the console entry)
joins them in a process group: gloo on CPU, nccl where each rank has a CUDA device (LOCAL_RANK's). Without torchrun
(WORLD_SIZE unset or 1) every function here is the single process's trivial case and no group is made.

Work is shared out by item: `shard(n)` is this rank's share of n items (every world_size-th, from its rank), and
`gather_ordered` brings each rank's (index, value) pairs to rank 0 in index order, so that rank 0 sums in exactly the
order one process would (float sums then match a single-process run bit for bit). Failures are collective:
`collective(fn)` runs fn on every rank and gathers either its value or its error; every rank then raises the first
error (by rank), so that one rank's bad input ends the run everywhere with the same one-line message instead of
leaving the others waiting in a collective (a rank that dies without reaching one is caught by the group's
timeout, `TIMEOUT`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from quantkit.errors import QuantkitError

T = TypeVar("T")


class RankFailed(QuantkitError):
    """Another rank's unexpected error (not a QuantkitError: a bug, a lost connection), as `collective` raises it on
    the ranks that did not fail: one line, and not to be taken for bad input (a quantize run keeps its work)."""


TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("QUANTKIT_DIST_TIMEOUT_S", "600")))
# How long the other ranks wait at the end for rank 0, which alone writes the output (a 70B model's: minutes).
FINISH_TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("QUANTKIT_DIST_FINISH_TIMEOUT_S", str(6 * 3600))))


def active() -> bool:
    """Whether this process is one rank of a process group of more than one."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0: the one that prints, writes reports and outputs, and shows progress."""
    return rank() == 0


def init_from_env() -> bool:
    """Join torchrun's process group when WORLD_SIZE > 1 (gloo on CPU; nccl where CUDA is available, each rank on
    LOCAL_RANK's device). Returns whether a group was made. QuantkitError (one line) where torchrun's variables are
    incomplete."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise QuantkitError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} unset: start data-parallel "
                            f"runs with torchrun --nproc-per-node N -m quantkit ...")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=TIMEOUT)
    return True


def finish() -> None:
    """Leave the process group (the console entry, at exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(n: int) -> list[int]:
    """This rank's share of items 0..n-1: every world_size-th, from its rank."""
    return list(range(rank(), n, world_size()))


def block(n: int, of_rank: int | None = None, ranks: int | None = None) -> range:
    """A rank's contiguous share of items 0..n-1 (default: this rank's, of this world's ranks): ranks in order, sizes
    differing by at most one."""
    r, size = rank() if of_rank is None else of_rank, ranks or world_size()
    return range(r * n // size, (r + 1) * n // size)


def owners(costs: list[float]) -> list[int]:
    """The rank each of the items of these costs goes to: largest first, each to the least loaded rank (ties: the
    highest rank, the last of a `chained` pass, which then keeps what it holds), so that the ranks finish together;
    the same answer on every rank."""
    loads, owner = [0.0] * world_size(), [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owner[i] = min(range(len(loads)), key=lambda r: (loads[r], -r))
        loads[owner[i]] += costs[i]
    return owner


def chained(state: T, step: Callable[[T], T], to: set[int] | None = None) -> T | None:
    """step over the ranks in rank order, each continuing from the state the rank before it left (rank 0 from
    `state`), the last rank's result on the ranks `to` (default: every rank; None on the others): a statistic
    accumulated over the ranks' blocks of samples in exactly one process's order, so that its float sums are one
    process's bit for bit (the states are sent pickled: objects on the CPU)."""
    if not active():
        return step(state)
    last, to = world_size() - 1, set(range(world_size())) if to is None else to
    if rank() > 0:
        state = _received(src=rank() - 1)
    state = step(state)
    if rank() < last:
        dist.send_object_list([state], dst=rank() + 1)
        state = None
    for r in sorted(to - {last}):  # the result, from the last rank to each that needs it
        if rank() == last:
            dist.send_object_list([state], dst=r)
        elif rank() == r:
            state = _received(src=last)
    return state


def _received(src: int) -> Any:
    """The object rank `src` sends this rank (dist.send_object_list)."""
    box = [None]
    dist.recv_object_list(box, src=src)
    return box[0]


def broadcast_object(value: T, src: int) -> T:
    """Rank `src`'s `value` (a picklable object: a module on the CPU) on every rank."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t (m, ...) with zero rows appended to `rows`, where the group's backend sends from (nccl: this rank's GPU)."""
    if dist.get_backend() == "nccl":
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if t.shape[0] < rows else t.contiguous()


def gather_blocks(t: torch.Tensor, sizes: list[int]) -> torch.Tensor | None:
    """The ranks' blocks of rows joined on rank 0 in rank order (t: this rank's, `sizes[r]` rows on rank r, the same
    trailing shape and dtype everywhere); None on the others."""
    if not active():
        return t
    rows = max(sizes)
    mine = _padded(t, rows)
    joined = mine.new_empty(rows * world_size(), *t.shape[1:]) if is_main() else None  # the parts are its views
    dist.gather(mine, list(joined.split(rows)) if is_main() else None, dst=0)
    if not is_main():
        return None
    if min(sizes) != rows:  # drop the padding rows
        joined = torch.cat([p[:size] for size, p in zip(sizes, joined.split(rows))])
    return joined.cpu()


def scatter_blocks(full: torch.Tensor | None, sizes: list[int], like: torch.Tensor) -> torch.Tensor:
    """This rank's block of rows of rank 0's tensor `full` (None on the others): `sizes[r]` rows for rank r, in rank
    order; `like`: a tensor of the trailing shape, dtype and device every rank receives in."""
    if not active():
        return full
    rows = max(sizes)
    mine = _padded(like.new_empty(0, *like.shape[1:]), rows)
    starts = [sum(sizes[:r]) for r in range(world_size())]
    parts = [_padded(full[start:start + size], rows) for start, size in zip(starts, sizes)] if is_main() else None
    dist.scatter(mine, parts, src=0)
    return mine[:sizes[rank()]].to(like.device)


def gather_ordered(pairs: list[tuple[int, T]]) -> list[T] | None:
    """Every rank's (index, value) pairs, on rank 0 as one list of values in index order; None on the others."""
    if not active():
        return [value for _, value in sorted(pairs, key=lambda p: p[0])]
    gathered: list[Any] = [None] * world_size() if is_main() else None
    dist.gather_object(pairs, gathered, dst=0)
    if not is_main():
        return None
    return [value for _, value in sorted((p for part in gathered for p in part), key=lambda p: p[0])]


def collective(fn: Callable[[], T]) -> T:
    """fn() on every rank; if it raised on any rank, every rank raises: the QuantkitError of the lowest rank that
    failed (its message; other exceptions as RankFailed, their type and message naming the rank); the rank that failed
    raises its own exception."""
    if not active():
        return fn()
    raised = None
    try:
        value, error = fn(), None
    except Exception as e:  # sent to every rank below, then raised there
        value, raised = None, e
        error = (str(e), False) if isinstance(e, QuantkitError) else (f"rank {rank()}: {type(e).__name__}: {e}", True)
    errors: list[Any] = [None] * world_size()
    dist.all_gather_object(errors, error)
    first = next((r for r, e in enumerate(errors) if e is not None), None)
    if first == rank():
        raise raised  # its own type (a full disk stays DiskFull on the rank that writes)
    if first is not None:
        message, unexpected = errors[first]
        raise RankFailed(message) if unexpected else QuantkitError(message)
    return value


@contextlib.contextmanager
def process_group():
    """Within the block, this process is a rank of torchrun's group (init_from_env), left when the block ends."""
    made = init_from_env()
    leaving = dist.new_group(backend="gloo", timeout=FINISH_TIMEOUT) if made else None
    try:
        yield
        if made:  # every rank leaves together: gloo aborts a rank that tears its group down while others still talk;
            dist.barrier(group=leaving)  # they wait while rank 0 writes (a group of its own: FINISH_TIMEOUT)
    finally:
        if made:
            finish()


def broadcast_from_main(value: T) -> T:
    """Rank 0's `value` on every rank (a name they must agree on)."""
    return broadcast_object(value, src=0)
