"""Sharding arithmetic: divisibility errors, contiguous blocks, ownership maps."""
import pytest
import torch

from tplab.layers.shards import ownership_map, shard_tensor
from tplab.specs.sharding import check_divisible, check_tp, divisors, shard_range


def test_divisors():
    assert divisors(1) == [1]
    assert divisors(52) == [1, 2, 4, 13, 26, 52]
    assert divisors(13) == [1, 13]


def test_not_divisible_names_the_dimension_and_lists_valid_tp():
    with pytest.raises(ValueError) as info:
        check_divisible("num_attention_heads", 52, 3)
    assert str(info.value) == "num_attention_heads=52 is not divisible by tp=3; valid tp: 1, 2, 4, 13, 26, 52"
    check_divisible("num_attention_heads", 52, 4)  # no error


@pytest.mark.parametrize("tp", [0, -2, 2.0, True, "4"])
def test_tp_must_be_a_positive_integer(tp):
    with pytest.raises(ValueError, match="tp must be a positive integer"):
        check_tp(tp)
    with pytest.raises(ValueError, match="tp must be a positive integer"):
        check_divisible("hidden", 64, tp)


@pytest.mark.parametrize("size,tp", [(12, 1), (12, 3), (48, 8), (5, 5)])
def test_blocks_are_contiguous_equal_and_cover_the_dimension(size, tp):
    ranges = [shard_range(size, tp, r) for r in range(tp)]
    assert ranges[0][0] == 0 and ranges[-1][1] == size
    assert all(stop == nxt for (_, stop), (nxt, _) in zip(ranges, ranges[1:]))
    assert {stop - start for start, stop in ranges} == {size // tp}


def test_shard_range_rejects_bad_rank_and_size():
    with pytest.raises(ValueError, match="rank=4 is outside 0..3"):
        shard_range(8, 4, 4)
    with pytest.raises(ValueError, match="intermediate_size=10 is not divisible by tp=4; valid tp: 1, 2, 5, 10"):
        shard_range(10, 4, 0, "intermediate_size")


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_shard_tensor_is_the_rank_chunk(dim):
    full = torch.arange(8 * 12).reshape(8, 12)
    for r in range(4):
        shard = shard_tensor(full, dim, 4, r)
        assert torch.equal(shard, full.chunk(4, dim)[r]) and shard.is_contiguous()


def test_ownership_map_column_and_row_split():
    rows_split = ownership_map(4, 6, 2, split_dim=0)
    assert rows_split.tolist() == [[0] * 6, [0] * 6, [1] * 6, [1] * 6]
    cols_split = ownership_map(4, 6, 3, split_dim=1)
    assert cols_split.tolist() == [[0, 0, 1, 1, 2, 2]] * 4
    for tp in (1, 2, 4):
        m = ownership_map(8, 16, tp, split_dim=1)
        assert [(m == r).sum().item() for r in range(tp)] == [8 * 16 // tp] * tp
    with pytest.raises(ValueError, match="cols=6 is not divisible by tp=4"):
        ownership_map(4, 6, 4, split_dim=1)
    with pytest.raises(ValueError, match="split_dim must be 0 .* or 1"):
        ownership_map(4, 6, 2, split_dim=2)
