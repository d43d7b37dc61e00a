"""PackedLoader: shapes, one-epoch coverage, rank sharding, exact resume (also across world sizes)."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from model import data as packed

SEQ_LEN = 16
SEQUENCES = 100
VOCAB = 4096


def write_synthetic(data_dir: Path, sequences: int = SEQUENCES, per_shard: int = 40) -> Path:
    """Sequence i starts with token i: batches tell which sequences they hold."""
    data_dir.mkdir(parents=True, exist_ok=True)
    dtype = packed.token_dtype(VOCAB)
    windows = (np.arange(sequences)[:, None] * 7 + np.arange(SEQ_LEN + 1)[None, :]) % VOCAB
    windows[:, 0] = np.arange(sequences)
    with packed.PackedShardWriter(data_dir, "train", SEQ_LEN, dtype, per_shard) as writer:
        writer.write(windows.reshape(-1))
        writer.write(np.arange(5))  # a tail shorter than a window is dropped
    info = packed.packing_info(
        seq_len=SEQ_LEN,
        vocab_size=VOCAB,
        eot_id=0,
        pad_id=1,
        tokenizer_sha256="",
        splits={"train": writer.info},
    )
    packed.write_packing_info(data_dir, info)
    return data_dir


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("synthetic"))


def ids(batch: tuple[torch.Tensor, torch.Tensor]) -> list[int]:
    return batch[0][:, 0].tolist()


def test_writer_layout(data_dir: Path) -> None:
    info = packed.read_packing_info(data_dir)
    train = info["splits"]["train"]
    assert [s["sequences"] for s in train["shards"]] == [40, 40, 20]
    assert train["tail_tokens_dropped"] == 5 and train["tokens"] == SEQUENCES * (SEQ_LEN + 1)
    assert (data_dir / "train-00002.bin").stat().st_size == 20 * (SEQ_LEN + 1) * 2


def test_batches_are_shifted_int64_windows(data_dir: Path) -> None:
    loader = packed.PackedLoader(data_dir, batch_size=4)
    assert loader.seq_len == SEQ_LEN and loader.vocab_size == VOCAB
    inputs, targets = next(iter(loader))
    assert inputs.shape == targets.shape == (4, SEQ_LEN)
    assert inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    shards = packed.open_shards(data_dir, "train")
    whole = np.concatenate(shards)
    for row, first in zip(inputs.tolist(), ids((inputs, targets)), strict=True):
        assert row == whole[first, :-1].tolist()


def test_one_epoch_covers_every_sequence_once(data_dir: Path) -> None:
    seen = [i for batch in packed.PackedLoader(data_dir, batch_size=8, loop=False) for i in ids(batch)]
    assert sorted(seen) == list(range(SEQUENCES))
    assert seen != sorted(seen)  # shuffled
    ranks = [
        [
            i
            for b in packed.PackedLoader(data_dir, batch_size=4, rank=r, world_size=2, loop=False)
            for i in ids(b)
        ]
        for r in range(2)
    ]
    assert sorted(ranks[0] + ranks[1]) == list(range(SEQUENCES))
    # The global stream does not depend on the world size: ranks interleave the single-rank order.
    interleaved = [i for s in range(0, SEQUENCES, 8) for r in range(2) for i in ranks[r][s // 2 : s // 2 + 4]]
    assert interleaved == seen


def test_epochs_and_seeds_reshuffle(data_dir: Path) -> None:
    stream = [i for b in islice(packed.PackedLoader(data_dir, batch_size=10), 20) for i in ids(b)]
    first, second = stream[:SEQUENCES], stream[SEQUENCES:]
    assert sorted(first) == sorted(second) == list(range(SEQUENCES))
    assert first != second
    other_seed = [i for b in islice(packed.PackedLoader(data_dir, batch_size=10, seed=1), 10) for i in ids(b)]
    assert other_seed != first


def take(loader: packed.PackedLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(islice(iter(loader), n))


def test_resume_mid_epoch_gives_the_identical_next_batches(data_dir: Path) -> None:
    loader = packed.PackedLoader(data_dir, batch_size=8, seed=3)
    take(loader, 15)  # 120 sequences: past the end of the first epoch
    state = json.loads(json.dumps(loader.state_dict()))  # JSON-able, as in a checkpoint
    expected = take(loader, 6)
    resumed = packed.PackedLoader(data_dir, batch_size=8, seed=3)
    resumed.load_state_dict(state)
    for a, b in zip(expected, take(resumed, 6), strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_resume_from_two_ranks_on_one_rank(data_dir: Path) -> None:
    ranks = [packed.PackedLoader(data_dir, batch_size=4, rank=r, world_size=2, seed=5) for r in range(2)]
    for loader in ranks:
        take(loader, 11)
    states = [loader.state_dict() for loader in ranks]
    assert states[0] == states[1]  # every rank saves the same state
    expected = [take(loader, 5) for loader in ranks]
    single = packed.PackedLoader(data_dir, batch_size=8, seed=5)
    single.load_state_dict(states[0])
    for step, (inputs, targets) in enumerate(take(single, 5)):
        assert torch.equal(inputs, torch.cat([expected[0][step][0], expected[1][step][0]]))
        assert torch.equal(targets, torch.cat([expected[0][step][1], expected[1][step][1]]))


def test_incompatible_states_are_refused(data_dir: Path) -> None:
    loader = packed.PackedLoader(data_dir, batch_size=8)
    take(loader, 3)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="global batch"):
        packed.PackedLoader(data_dir, batch_size=5).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        packed.PackedLoader(data_dir, batch_size=8, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="num_sequences"):
        packed.PackedLoader(data_dir, batch_size=8).load_state_dict({**state, "num_sequences": 7})


def test_bad_directories(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no packing\.json"):
        packed.PackedLoader(tmp_path)
    with pytest.raises(ValueError, match="rank"):
        packed.PackedLoader(data_dir, rank=2, world_size=2)
    with pytest.raises(KeyError, match="validation"):
        packed.PackedLoader(data_dir, split="validation")
    broken = write_synthetic(tmp_path / "broken")
    with open(broken / "train-00001.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=r"not \d+ bytes"):
        packed.PackedLoader(broken)


def test_an_older_format_is_a_one_line_error(tmp_path: Path) -> None:
    old = write_synthetic(tmp_path / "old")
    info = json.loads((old / packed.PACKING_FILE).read_text())
    (old / packed.PACKING_FILE).write_text(json.dumps({**info, "format_version": 1}))
    with pytest.raises(
        ValueError, match=r"packed in format 1, this code reads format 2: pack the data again"
    ) as error:
        packed.PackedLoader(old)
    assert "\n" not in str(error.value)


def test_killed_writer_leaves_no_partial_shard(tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError),
        packed.PackedShardWriter(tmp_path, "train", 4, np.uint16, 1000) as writer,
    ):
        writer.write(np.arange(5 * 500))
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_unshuffled_order_is_the_stream_order(data_dir: Path) -> None:
    ranks = [
        packed.PackedLoader(data_dir, batch_size=3, rank=r, world_size=2, loop=False, shuffle=False)
        for r in range(2)
    ]
    batches = [list(loader) for loader in ranks]
    # Global batch s = sequences [6s, 6s + 6): rank 0 the first three, rank 1 the next.
    for step, (first, second) in enumerate(zip(*batches, strict=False)):
        assert ids(first) + ids(second) == list(range(6 * step, min(6 * step + 6, SEQUENCES)))
    # 100 = 16 x 6 + 4: the last global batch is 96..99, rank 0 gets three, rank 1 one.
    assert len(batches[0]) == len(batches[1]) == 17
    assert ids(batches[0][-1]) == [96, 97, 98] and ids(batches[1][-1]) == [99]
