import math

import pytest
import torch

from ssd_lightning.boxes import cxcywh_to_xyxy, encode
from ssd_lightning.loss import MultiBoxLoss, hard_negative_mask
from ssd_lightning.priors import generate_priors, prior_preset

# Eight 0.1-wide priors in a row; only prior 0 overlaps the object below.
PRIORS = torch.tensor([[0.05 + 0.1 * i, 0.5, 0.1, 0.1] for i in range(8)])
OBJECT = {"boxes": torch.tensor([[0.0, 0.45, 0.1, 0.55]]), "labels": torch.tensor([1])}
EMPTY = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}


def _perfect_loc(batch=1):
    target = encode(OBJECT["boxes"].expand(8, 4), PRIORS)
    return target[None].repeat(batch, 1, 1).clone()


def test_loc_loss_is_smooth_l1_on_positives_only():
    criterion = MultiBoxLoss(num_classes=2)
    conf = torch.zeros(1, 8, 2)
    loc = _perfect_loc()
    loc[0, 0, 0] += 0.5  # positive prior: smooth L1 of 0.5 is 0.5 * 0.5**2
    loc[0, 3, :] += 7.0  # a background prior: must not count
    loss_loc, _ = criterion(loc, conf, PRIORS, [OBJECT])
    assert loss_loc.item() == pytest.approx(0.125)
    loc[0, 0, 0] += 1.5  # |error| = 2 -> 2 - 0.5
    loss_loc, _ = criterion(loc, conf, PRIORS, [OBJECT])
    assert loss_loc.item() == pytest.approx(1.5)


def test_conf_loss_counts_one_positive_and_three_hardest_negatives():
    criterion = MultiBoxLoss(num_classes=2)
    conf = torch.zeros(1, 8, 2)
    # background logit per prior; lower = harder negative. Priors 5, 2, 7 are the three hardest.
    conf[0, :, 0] = torch.tensor([0.0, 1.0, -2.0, 2.0, 3.0, -3.0, 4.0, -1.0])
    _, loss_conf = criterion(_perfect_loc(), conf, PRIORS, [OBJECT])

    def ce(logits, label):
        return -torch.log_softmax(torch.tensor(logits), 0)[label].item()

    expected = ce([0.0, 0.0], 1) + ce([-3.0, 0.0], 0) + ce([-2.0, 0.0], 0) + ce([-1.0, 0.0], 0)
    assert loss_conf.item() == pytest.approx(expected, rel=1e-6)


def test_losses_are_divided_by_the_number_of_positives():
    criterion = MultiBoxLoss(num_classes=2)
    conf = torch.randn(1, 8, 2)
    loc = _perfect_loc() + 0.3
    single = criterion(loc, conf, PRIORS, [OBJECT])
    double = criterion(loc.repeat(2, 1, 1), conf.repeat(2, 1, 1), PRIORS, [OBJECT, OBJECT])
    for one, two in zip(single, double, strict=True):
        assert two.item() == pytest.approx(one.item(), rel=1e-6)


def test_hard_negative_counts():
    loss = torch.arange(10.0).repeat(3, 1)
    positives = torch.zeros(3, 10, dtype=torch.bool)
    positives[0, :2] = True  # 2 positives -> 6 negatives
    positives[1, :4] = True  # 4 positives -> 12 wanted, only 6 left
    mask = hard_negative_mask(loss, positives, neg_pos_ratio=3, min_negatives=3)
    assert mask.sum(dim=1).tolist() == [6, 6, 3]  # an empty image gets min_negatives
    assert not (mask & positives).any()
    assert mask[2].nonzero().flatten().tolist() == [7, 8, 9]  # the highest-loss ones


def test_image_without_objects_adds_negatives_only():
    criterion = MultiBoxLoss(num_classes=2)
    conf = torch.zeros(2, 8, 2)
    loc = _perfect_loc(2)
    loss_loc, loss_conf = criterion(loc, conf, PRIORS, [OBJECT, EMPTY])
    assert loss_loc.item() == pytest.approx(0.0, abs=1e-6)
    # image 1: 1 positive + 3 negatives; image 2: 3 negatives; all logits 0 -> ln 2 each
    assert loss_conf.item() == pytest.approx(7 * math.log(2), rel=1e-6)


def test_batch_without_positives_is_finite_and_differentiable():
    criterion = MultiBoxLoss(num_classes=3)
    loc = torch.randn(2, 8, 4, requires_grad=True)
    conf = torch.randn(2, 8, 3, requires_grad=True)
    loss_loc, loss_conf = criterion(loc, conf, PRIORS, [EMPTY, EMPTY])
    (loss_loc + loss_conf).backward()
    assert loss_loc.item() == 0.0
    assert torch.isfinite(loss_conf) and loss_conf.item() > 0
    assert torch.isfinite(conf.grad).all() and torch.isfinite(loc.grad).all()


def test_shape_errors_are_clear():
    criterion = MultiBoxLoss(num_classes=2)
    with pytest.raises(ValueError, match="classes"):
        criterion(torch.zeros(1, 8, 4), torch.zeros(1, 8, 3), PRIORS, [OBJECT])
    with pytest.raises(ValueError, match="priors"):
        criterion(torch.zeros(1, 7, 4), torch.zeros(1, 7, 2), PRIORS, [OBJECT])
    with pytest.raises(ValueError, match="targets"):
        criterion(torch.zeros(2, 8, 4), torch.zeros(2, 8, 2), PRIORS, [OBJECT])
    with pytest.raises(ValueError, match="background"):
        MultiBoxLoss(num_classes=1)


def _random_boxes(count, generator):
    centres = torch.rand(count, 2, generator=generator) * 0.6 + 0.2
    sizes = torch.rand(count, 2, generator=generator) * 0.3 + 0.05
    return cxcywh_to_xyxy(torch.cat([centres, sizes], dim=1))


def test_static_and_data_dependent_shapes_give_the_same_losses_and_gradients():
    generator = torch.Generator().manual_seed(3)
    priors = generate_priors(prior_preset(300, "voc"))
    targets = [
        {"boxes": boxes, "labels": torch.randint(1, 21, (len(boxes),), generator=generator)}
        for boxes in (_random_boxes(n, generator) for n in (3, 0, 7, 1))
    ]
    loc = torch.randn(4, len(priors), 4, generator=generator, requires_grad=True)
    conf = torch.randn(4, len(priors), 21, generator=generator, requires_grad=True)
    results = []
    for static in (True, False):
        losses = MultiBoxLoss(21, static_shapes=static)(loc, conf, priors, targets)
        results.append((losses, torch.autograd.grad(sum(losses), (loc, conf))))
    (static_losses, static_grads), (dynamic_losses, dynamic_grads) = results
    assert static_losses[0] > 0 and static_losses[1] > 0
    for a, b in zip((*static_losses, *static_grads), (*dynamic_losses, *dynamic_grads), strict=True):
        torch.testing.assert_close(a, b)
