"""The layer-wise patch and Gram machinery is one shared module: Bit-Split and TSQ use the same functions."""
from __future__ import annotations

from lowbit.ptq import bitsplit, layerwise
from lowbit.qat import tsq


def test_bitsplit_and_tsq_share_the_layerwise_machinery() -> None:
    for name in ("patch_rows", "weight_rows", "rows_to_weight", "output_positions", "scale_group_of_rows"):
        assert getattr(bitsplit, name) is getattr(layerwise, name), name
    for name in ("patch_rows", "weight_rows", "rows_to_weight", "output_positions", "scale_group_of_rows"):
        assert getattr(tsq, name) is getattr(layerwise, name), name
    assert bitsplit.layer_statistics is layerwise.layer_statistics
    assert "def patch_rows" not in open(bitsplit.__file__).read()  # moved, not copied
