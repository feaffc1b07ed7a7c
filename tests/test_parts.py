"""Chunk bookkeeping shared by the network backends: part sizing and the resume chunk set."""

from __future__ import annotations

import random

from vmstore._parts import ChunkSet, s3_part_size

MiB = 1 << 20
GiB = 1 << 30


def test_a_200_gib_disk_fits_in_10000_parts_with_the_default_part_size() -> None:
    part = s3_part_size(200 * GiB, 10 * MiB)
    assert -(-200 * GiB // part) <= 10_000
    assert part == 40 * MiB


def test_chunk_set_saves_chunks_landing_out_of_order_as_few_runs() -> None:
    numbers = list(range(1, 12_801))
    # Concurrent fetches land roughly in order: shuffle within windows of 8.
    rng = random.Random(7)
    landed = []
    for start in range(0, len(numbers), 8):
        window = numbers[start : start + 8]
        rng.shuffle(window)
        landed.extend(window)
    chunks = ChunkSet()
    longest_save = 0
    for number in landed:
        chunks.add(number)
        longest_save = max(longest_save, len(chunks.runs()))
    assert chunks.runs() == [[1, 12_800]]
    assert longest_save <= 8  # never more runs than chunks in flight
    assert len(chunks) == 12_800


def test_chunk_set_round_trips_through_runs_with_gaps() -> None:
    chunks = ChunkSet([1, 2, 3, 7, 9, 10, 5])
    assert chunks.runs() == [[1, 3], [5, 5], [7, 7], [9, 10]]
    assert 4 not in chunks and 5 in chunks and 0 not in chunks
    again = ChunkSet.from_runs(chunks.runs(), last=100)
    assert again.runs() == chunks.runs()
    assert len(again) == 7


def test_chunk_set_from_a_damaged_state_keeps_only_valid_runs_within_the_partial() -> None:
    state = [[1, 4], "x", [6], [8, 3], [0, 2], [9, 50], [True, "2"], None]
    chunks = ChunkSet.from_runs(state, last=12)
    # [0, 2] is clipped to [1, 2] (already inside [1, 4]); [9, 50] to [9, 12].
    assert chunks.runs() == [[1, 4], [9, 12]]
    assert ChunkSet.from_runs({"done": 3}, last=10).runs() == []
