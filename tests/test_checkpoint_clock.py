"""When a search trial saves a checkpoint (tuner/run/trial.py CheckpointClock), on a clock that tests set."""
import pytest

import tuner.run.trial
from tuner.run.trial import CheckpointClock


def checkpointed_epochs(monkeypatch, every_s: float, epoch_seconds: list[float]) -> list[int]:
    now = [0.0]
    monkeypatch.setattr(tuner.run.trial.time, "monotonic", lambda: now[0])
    clock, saved = CheckpointClock(every_s), []
    for epoch, seconds in enumerate(epoch_seconds, 1):
        now[0] += seconds
        if clock.due(len(epoch_seconds) - epoch):
            saved.append(epoch)
    return saved


def test_every_30_s_but_not_just_before_the_last_epoch(monkeypatch):
    # 10-s epochs: epochs 3 and 6 (30 s apart); at epoch 9 the last epoch's checkpoint is 10 s away, so none.
    assert checkpointed_epochs(monkeypatch, 30, [10.0] * 10) == [3, 6, 10]


def test_short_trials_checkpoint_only_at_their_last_epoch(monkeypatch):
    assert checkpointed_epochs(monkeypatch, 30, [1.0] * 8) == [8]


@pytest.mark.parametrize("seconds", [[0.5] * 5, [100.0] * 3])
def test_zero_means_every_epoch(monkeypatch, seconds):
    assert checkpointed_epochs(monkeypatch, 0, seconds) == list(range(1, len(seconds) + 1))


def test_long_epochs_checkpoint_every_epoch(monkeypatch):
    assert checkpointed_epochs(monkeypatch, 30, [60.0] * 4) == [1, 2, 3, 4]
