"""The data position of a checkpoint continues on any process count: the rest of the epoch is
split anew, so no batch is trained twice and only the split's remainder (fewer than the new
process count) is left out, as at every epoch's end."""

from __future__ import annotations

import pytest

from chronoedit_lora.train.state.checkpoint import Progress
from chronoedit_lora.train.loop.data import TrainingData

from .test_train import make_subset, tiny_config

PAIRS = 7


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> TrainingData:
    folder = tmp_path_factory.mktemp("progress")
    return TrainingData(tiny_config(folder / "model", make_subset(folder / "data", PAIRS), folder / "run"))


@pytest.mark.parametrize("before", [1, 2, 3])
@pytest.mark.parametrize("after", [1, 2, 3])
def test_every_batch_is_trained_at_most_once_across_a_change_of_process_count(data, before, after):
    batches = data.epoch_batches(0)
    for done in range(data.batches_per_rank(before) + 1):  # steps taken on `before` processes
        trained = [tuple(batch) for rank in range(before) for batch in data.rank_batches(0, rank, before)[:done]]
        progress = Progress(step=done, batch_in_epoch=done, processes=before).continued_on(after)
        assert progress.consumed() == done * before
        trained += [tuple(batch) for rank in range(after)
                    for batch in data.rank_batches(0, rank, after, progress.epoch_start)[progress.batch_in_epoch:]]
        assert len(trained) == len(set(trained))  # none twice
        assert set(trained) <= {tuple(batch) for batch in batches}
        assert len(batches) - len(trained) == (len(batches) - progress.epoch_start) % after  # the split's remainder
        if after != before and done:
            assert data.total_steps(progress, after, 1, 1) == done + (len(batches) - done * before) // after
        if after != before and done and data.rank_batches(0, 0, after, progress.epoch_start):
            logged = data.items_trained([progress.position()], after)  # what metrics.csv shows for its next step
            assert logged == sorted(i for rank in range(after)
                                    for i in data.rank_batches(0, rank, after, progress.epoch_start)[0])


def test_the_same_process_count_continues_where_it_was():
    progress = Progress(step=3, epoch=1, batch_in_epoch=3, processes=2)
    assert progress.continued_on(2) is progress
    progress.next_epoch()
    assert progress.position() == (2, 0, 0)
