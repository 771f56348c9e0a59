"""Observers' statistics add up: an observer of all the samples equals the merge of observers of disjoint parts."""

import torch
from torch import nn

from quantkit.quant.observers import ChannelMagnitudeObserver


def test_channel_magnitudes_of_parts_merge_into_the_whole():
    x = torch.randn(10, 7, 32, generator=torch.Generator().manual_seed(0))
    linear = nn.Linear(32, 8)
    whole, parts = ChannelMagnitudeObserver.for_linear(linear, None), []
    for batch in x.split(3):
        whole.add(batch)
        parts.append(ChannelMagnitudeObserver.for_linear(linear, None))
        parts[-1].add(batch)
    merged = parts[0]
    for part in parts[1:]:
        assert merged.merge(part) is merged
    assert merged.n == whole.n == 70
    torch.testing.assert_close(merged.mean_abs, whole.mean_abs, rtol=1e-6, atol=0)
    torch.testing.assert_close(whole.mean_abs, x.reshape(-1, 32).abs().mean(0), rtol=1e-5, atol=0)
