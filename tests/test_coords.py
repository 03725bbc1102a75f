"""Where a sample reads a large layer: blocks of neighbouring values (agent/coords.py)."""

from __future__ import annotations

import torch

from thermoscope.agent.coords import WORK_BLOCK, Coordinates

CPU = torch.device("cpu")


def _estimate(coords: Coordinates, i: int, x: torch.Tensor, y: torch.Tensor, rows) -> float:
    """The layer's dot <x, y> as the sampler estimates it from the taken values."""
    a, b = coords.take(x, i, rows[i]).double(), coords.take(y, i, rows[i]).double()
    weight = coords.weight(i)
    if weight is not None:
        a = a * weight.double()
    return float(torch.dot(a, b)) * coords.scale(i)


def test_a_layer_of_at_most_subset_values_is_read_whole_and_exactly() -> None:
    coords = Coordinates(["small"], [1000], subset=1024, seed=0, device=CPU)
    x, y = torch.randn(1000), torch.randn(1000)
    rows = coords.draw()
    assert rows == [None]
    assert coords.counted(0) == 1000
    assert coords.fixed(x, 0).data_ptr() == x.data_ptr()  # a view, no copy
    assert _estimate(coords, 0, x, y, rows) == float(torch.dot(x.double(), y.double()))


def test_the_work_estimate_on_shifted_blocks_is_unbiased_with_and_without_a_tail() -> None:
    torch.manual_seed(0)
    for n in (WORK_BLOCK * 400, WORK_BLOCK * 400 + 7):  # the second has a tail of 7 values
        coords = Coordinates(["layer"], [n], subset=WORK_BLOCK * 40, seed=1, device=CPU)
        x = torch.randn(n) + torch.linspace(0, 3, n)  # not exchangeable: position matters
        y = torch.randn(n) * torch.linspace(0.1, 2, n)
        y[-7:] += 50.0  # the tail, where there is one, weighs
        exact = float(torch.dot(x.double(), y.double()))
        estimates = torch.tensor([_estimate(coords, 0, x, y, coords.draw()) for _ in range(4000)])
        error = abs(float(estimates.mean()) - exact)
        assert estimates.std() > 0  # the draws differ
        assert error < 4 * float(estimates.std()) / 4000**0.5, (n, error, exact)


def test_every_block_is_taken_equally_often() -> None:
    blocks, kept = 200, 20
    coords = Coordinates(["layer"], [WORK_BLOCK * blocks], subset=WORK_BLOCK * kept, seed=2, device=CPU)
    counts = torch.zeros(blocks)
    draws = 3000
    for _ in range(draws):
        (rows,) = coords.draw()
        assert rows is not None and len(set(rows.tolist())) == kept  # distinct blocks
        counts[rows] += 1
    expected = draws * kept / blocks  # 300, a binomial spread of ~16
    assert float((counts - expected).abs().max()) < 6 * (expected * (1 - kept / blocks)) ** 0.5


def test_the_histogram_counts_the_same_fixed_blocks_at_every_sample_and_on_every_replica() -> None:
    n = WORK_BLOCK * 1000
    one = Coordinates(["blocks.0.weight", "other"], [n, n], subset=WORK_BLOCK * 64, seed=0, device=CPU)
    two = Coordinates(["blocks.0.weight"], [n], subset=WORK_BLOCK * 64, seed=0, device=CPU)
    x = torch.arange(n, dtype=torch.float32)
    taken = one.fixed(x, 0)
    assert one.counted(0) == taken.numel() == WORK_BLOCK * 64
    one.draw()  # drawing work blocks does not move the histogram's
    assert torch.equal(one.fixed(x, 0), taken)
    assert torch.equal(two.fixed(x, 0), taken)  # seeded by the layer's name, not its place
    assert not torch.equal(one.fixed(x, 1), taken)
    # whole blocks of neighbouring values
    blocks = taken.view(-1, WORK_BLOCK)
    within = torch.arange(WORK_BLOCK, dtype=torch.float32).expand_as(blocks)
    assert torch.equal(blocks - blocks[:, :1], within)


def test_drawing_leaves_the_users_random_stream_alone() -> None:
    coords = Coordinates(["layer"], [WORK_BLOCK * 100], subset=WORK_BLOCK * 10, seed=0, device=CPU)
    state = torch.random.get_rng_state()
    coords.draw()
    assert torch.equal(torch.random.get_rng_state(), state)
