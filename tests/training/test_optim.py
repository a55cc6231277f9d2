"""Parameter groups (no decay on biases / L2Norm scale) and the warmup + multi-step / cosine schedules."""

from __future__ import annotations

import math

import pytest
import torch

from ssd_lightning.models import L2Norm, build_ssd
from ssd_lightning.optim import parameter_groups, resolve_steps, warmup_cosine, warmup_multistep


def lrs(factory, total: int, **kwargs) -> list[float]:
    """The learning rate used at each of `total` optimiser steps (base lr 1)."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = factory(optimizer, total, **kwargs)
    used = []
    for _ in range(total):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return used


def test_biases_and_l2norm_scale_get_no_weight_decay() -> None:
    net = build_ssd(300, 21)
    groups = parameter_groups(net)
    decayed = {id(p) for p in groups[0]["params"]}
    exempt = {id(p) for p in groups[1]["params"]}
    assert groups[1]["weight_decay"] == 0.0 and "weight_decay" not in groups[0]
    l2norm = next(m for m in net.modules() if isinstance(m, L2Norm))
    assert all(id(p) in exempt for p in l2norm.parameters())
    modules = dict(net.named_modules())
    for name, parameter in net.named_parameters():
        owner = modules[name.rsplit(".", 1)[0]]
        assert (id(parameter) in exempt) == (name.endswith(".bias") or isinstance(owner, L2Norm)), name
    assert len(decayed) + len(exempt) == len(list(net.parameters()))
    # The optimiser applies its own weight decay to the first group only.
    optimizer = torch.optim.SGD(groups, lr=1e-3, weight_decay=5e-4)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [5e-4, 0.0]


def test_warmup_then_multistep_at_absolute_milestones() -> None:
    used = lrs(warmup_multistep, 12, milestones=[6, 9], warmup_steps=3, warmup_start_factor=0.25)
    assert used == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01])


def test_milestones_as_fractions_of_the_run() -> None:
    used = lrs(warmup_multistep, 100, milestones=[0.5, 0.75], warmup_steps=0)
    assert used[49] == 1 and used[50] == pytest.approx(0.1) and used[75] == pytest.approx(0.01)


def test_warmup_cosine_reaches_the_floor_at_the_end() -> None:
    used = lrs(warmup_cosine, 20, warmup_steps=4, warmup_start_factor=0.2, min_lr_factor=0.1)
    assert used[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(a >= b for a, b in zip(used[4:], used[5:], strict=False))
    # Half-way through the 16 cosine steps: half-way between the peak and the floor.
    half_way = 0.1 + 0.9 * (1 + math.cos(math.pi * 8 / 16)) / 2
    assert used[12] == pytest.approx(half_way)


def test_fractions_need_a_finite_run() -> None:
    with pytest.raises(ValueError, match="max_steps"):
        resolve_steps(0.5, float("inf"), "scheduler.milestones")
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        resolve_steps(1.5, 100, "scheduler.milestones")
    assert resolve_steps(0.25, 100, "x") == 25 and resolve_steps(30, None, "x") == 30


def test_cosine_rejects_a_warmup_longer_than_the_run() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="shorter than the run"):
        warmup_cosine(optimizer, 10, warmup_steps=10)


def test_a_cosine_warmup_fraction_leaves_a_one_step_run_without_warmup() -> None:
    # fast_dev_run: a run of 1 step with warmup_steps=0.05 (round: 1 step) trains at the full lr.
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    warmup_cosine(optimizer, 1, warmup_steps=0.05, warmup_start_factor=0.25)
    assert optimizer.param_groups[0]["lr"] == 1.0
