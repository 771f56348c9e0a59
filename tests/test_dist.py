"""quantkit.dist's sharing out, at 1 to 4 ranks (the world's size patched: the arithmetic needs no process group;
tests/eval/test_distributed.py and tests/run/test_distributed_quantize.py run real gloo groups)."""

import pytest

import quantkit.dist as dist
from quantkit.run.calibrator import sample_block


@pytest.fixture
def world(monkeypatch):
    def set_world(size: int, rank: int = 0):
        monkeypatch.setattr(dist, "world_size", lambda: size)
        monkeypatch.setattr(dist, "rank", lambda: rank)
    return set_world


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 5, 8, 10, 129])
def test_blocks_cover_the_items_once_in_rank_order(world, ranks, n):
    world(ranks)
    blocks = [dist.block(n, r) for r in range(ranks)]
    assert [i for b in blocks for i in b] == list(range(n))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


@pytest.mark.parametrize("ranks", [1, 2, 3])
@pytest.mark.parametrize("n, batch_size", [(10, 4), (128, 8), (9, 3), (7, 1)])
def test_sample_blocks_are_whole_batches_of_one_process(world, ranks, n, batch_size):
    """Every rank's samples start at a batch boundary and end at one (or at n): one process's batches, unsplit."""
    world(ranks)
    blocks = [sample_block(n, batch_size, r) for r in range(ranks)]
    assert [i for b in blocks for i in b] == list(range(n))
    assert all(b.start % batch_size == 0 and (b.stop % batch_size == 0 or b.stop == n) for b in blocks)


@pytest.mark.parametrize("costs, ranks, loads", [
    ([3, 3, 3], 2, [3, 6]),  # q/k/v of equal size: one on rank 0, two on rank 1 (ties: the last rank of a chain)
    ([11, 4, 4, 4], 2, [12, 11]),  # largest first, each to the least loaded
    ([1, 1], 4, [0, 0, 1, 1]),
    ([5], 1, [5]),
])
def test_owners_balance_the_cost(world, costs, ranks, loads):
    world(ranks)
    owner = dist.owners(costs)
    assert [sum(c for c, o in zip(costs, owner) if o == r) for r in range(ranks)] == loads
    assert owner == dist.owners(costs)  # the same on every rank: no randomness


def test_one_process_is_the_trivial_case():
    """No process group: collectives return what they are given."""
    import torch

    t = torch.arange(6.0).reshape(3, 2)
    assert dist.gather_blocks(t, [3]) is t and dist.scatter_blocks(t, [3], t[:0]) is t
    assert dist.chained([1], lambda s: s + [2]) == [1, 2]
    assert dist.broadcast_object("x", src=0) == "x" and dist.collective(lambda: 7) == 7
