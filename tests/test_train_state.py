"""TrainState (pipeline.distill.state): a saved state round-trips and puts every training
object and each rank's RNG streams back where they were."""

from __future__ import annotations

import random

import numpy as np
import torch

from distilpose.rng import rng_state
from distilpose.schedule import step_schedule
from pipeline.distill.state import TrainState


def _objects():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, step_schedule(4, (6,)))
    return model, optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=False)


def _draw() -> tuple:
    return torch.rand(4).tolist(), np.random.rand(4).tolist(), [random.random() for _ in range(4)]


def test_train_state_round_trip_restores_everything(tmp_path) -> None:
    torch.manual_seed(0)
    model, optimizer, scheduler, scaler = _objects()
    for _ in range(3):
        model(torch.randn(5, 3)).square().sum().backward()
        optimizer.step()
        scheduler.step()
    ranks = []
    for seed in (1, 2):  # two ranks' streams, each mid-way
        torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)
        _draw()
        ranks.append(rng_state())
    after_rank1 = _draw()
    state = TrainState(
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        scaler=scaler.state_dict(),
        epochs_done=2,
        step=3,
        best={"AP": 0.5, "epoch": 1},
        rng=ranks,
        metrics={"epoch": 2},
        teacher_fields=["heatmaps"],
        config={},
        student_config={},
    )
    state.save(str(tmp_path / "state.pt"))
    loaded = TrainState.load(str(tmp_path / "state.pt"))
    assert (loaded.epochs_done, loaded.step, loaded.best) == (2, 3, {"AP": 0.5, "epoch": 1})

    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    fresh = _objects()
    loaded.restore(*fresh, rank=1)
    assert _draw() == after_rank1  # rank 1 continues its own streams
    model2, optimizer2, scheduler2, _ = fresh
    for key, value in model.state_dict().items():
        assert torch.equal(model2.state_dict()[key], value)
    assert scheduler2.last_epoch == scheduler.last_epoch and scheduler2.get_last_lr() == scheduler.get_last_lr()
    moments = optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(optimizer2.state_dict()["state"][0]["exp_avg"], moments)
