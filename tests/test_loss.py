import math

import pytest
import torch
from torchvision.ops import box_iou

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


def _voc_case(seed: int, counts=(3, 0, 7, 1)):
    generator = torch.Generator().manual_seed(seed)
    priors = generate_priors(prior_preset(300, "voc"))
    targets = [
        {"boxes": boxes, "labels": torch.randint(1, 21, (len(boxes),), generator=generator)}
        for boxes in (_random_boxes(n, generator) for n in counts)
    ]
    loc = torch.randn(len(counts), len(priors), 4, generator=generator)
    conf = torch.randn(len(counts), len(priors), 21, generator=generator)
    return priors, targets, loc, conf


def _losses_and_grads(loc, conf, priors, targets, static, **kwargs):
    loc, conf = loc.detach().requires_grad_(), conf.detach().requires_grad_()
    losses = MultiBoxLoss(conf.shape[-1], static_shapes=static, **kwargs)(loc, conf, priors, targets)
    return losses, torch.autograd.grad(sum(losses), (loc, conf))


def test_float16_inputs_with_an_empty_image_give_the_float32_losses_in_both_paths():
    # Lightning's 16-true casts the whole batch, boxes included; the empty image's padding box used to
    # encode to log(0) = -inf in float16, and -inf * 0 in the static path's mask gave NaN.
    priors, targets, loc, conf = _voc_case(4, counts=(2, 0))
    half_targets = [{"boxes": t["boxes"].half(), "labels": t["labels"]} for t in targets]
    reference = [{"boxes": t["boxes"].float(), "labels": t["labels"]} for t in half_targets]
    expected, _ = _losses_and_grads(loc.half().float(), conf.half().float(), priors, reference, static=False)
    assert all(torch.isfinite(v) for v in expected)
    for static in (True, False):
        losses, grads = _losses_and_grads(loc.half(), conf.half(), priors, half_targets, static)
        assert all(v.dtype == torch.float32 for v in losses)
        torch.testing.assert_close(losses, expected)
        assert all(torch.isfinite(g).all() for g in grads)


def test_an_overflowed_background_prediction_leaves_both_paths_finite():
    priors, targets, loc, conf = _voc_case(5, counts=(2, 1))
    overlap = box_iou(targets[1]["boxes"], cxcywh_to_xyxy(priors)).amax(dim=0)
    background = int(overlap.argmin())  # a prior no target overlaps
    assert overlap[background] == 0
    loc_inf = loc.clone()
    loc_inf[1, background] = float("inf")  # what a float16 overflow gives
    expected, _ = _losses_and_grads(loc, conf, priors, targets, static=False)
    for static in (True, False):
        losses, grads = _losses_and_grads(loc_inf, conf, priors, targets, static)
        torch.testing.assert_close(losses, expected)
        assert all(torch.isfinite(g).all() for g in grads)


def test_hard_negatives_break_exact_ties_by_prior_index_in_both_paths():
    loss = torch.zeros(3, 40)
    loss[:, 30:] = 1.0  # ten clear winners, then thirty exactly equal losses
    loss[2, :] = 0.5  # a row of nothing but ties
    positives = torch.zeros(3, 40, dtype=torch.bool)
    positives[0, [3, 31]] = True  # 2 positives -> 6 negatives: 9 of the 1.0s exceed 6, so ties at 1.0
    positives[1, 32:40] = True  # 8 positives -> 24: the two 1.0s left, then 22 of the 0.0s
    positives[2, 5] = True  # 1 positive -> 3: the first three tied priors that are not positive
    masks = [hard_negative_mask(loss, positives, 3, 3, static_shapes=s) for s in (True, False)]
    assert masks[0].nonzero().tolist() == masks[1].nonzero().tolist()
    expected = torch.zeros(3, 40, dtype=torch.bool)
    expected[0, [30, 32, 33, 34, 35, 36]] = True
    expected[1, [30, 31, *range(22)]] = True
    expected[2, [0, 1, 2]] = True
    assert masks[0].equal(expected)


@pytest.mark.parametrize("seed", range(4))
def test_hard_negatives_equal_a_stable_sort_whatever_the_ties(seed):
    generator = torch.Generator().manual_seed(seed)
    loss = torch.randint(0, 4, (6, 300), generator=generator).float()  # ties everywhere
    loss[0] = torch.rand(300, generator=generator)  # and a row without any
    positives = (
        torch.rand(6, 300, generator=generator) < torch.tensor([0.01, 0.0, 0.02, 0.1, 0.3, 0.0])[:, None]
    )
    num_neg = (positives.sum(1) * 3).clamp(min=3).clamp(max=300 - positives.sum(1))
    # Reference: a stable descending sort keeps equal losses in index order; take each row's first num_neg.
    order = loss.masked_fill(positives, float("-inf")).sort(dim=1, descending=True, stable=True).indices
    expected = torch.zeros_like(positives)
    for row in range(6):
        expected[row, order[row, : num_neg[row]]] = True
    for static in (True, False):
        assert hard_negative_mask(loss, positives, 3, 3, static_shapes=static).equal(expected)


def test_static_and_data_dependent_shapes_agree_under_exact_ties():
    # Zoom-out fills large areas with the mean colour: many priors get bit-identical logits.
    priors, targets, loc, conf = _voc_case(6)
    tied = conf[0, 0].clone()
    tied[0] = -5.0  # confidently not background: these are the hardest negatives, all equally hard
    conf[:, 1000:7000] = tied
    (static_losses, static_grads) = _losses_and_grads(loc, conf, priors, targets, static=True)
    (dynamic_losses, dynamic_grads) = _losses_and_grads(loc, conf, priors, targets, static=False)
    for a, b in zip((*static_losses, *static_grads), (*dynamic_losses, *dynamic_grads), strict=True):
        torch.testing.assert_close(a, b)


def test_static_shape_loss_captures_as_one_graph_without_host_reads():
    # A CPU-checkable proxy for CUDA-graph capture: one graph, and no op in it that reads a tensor on the
    # host (fullgraph=True alone would capture .item() or nonzero as data-dependent sizes).
    priors, targets, loc, conf = _voc_case(7)
    criterion = MultiBoxLoss(21, static_shapes=True)
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module

    torch._dynamo.reset()
    compiled = torch.compile(criterion, fullgraph=True, backend=record)
    torch.testing.assert_close(compiled(loc, conf, priors, targets), criterion(loc, conf, priors, targets))
    assert len(graphs) == 1
    ops = {str(n.target) for n in graphs[0].graph.nodes if n.op in ("call_function", "call_method")}
    host_reads = {
        op for op in ops if op in ("item", "tolist") or any(w in op for w in ("nonzero", "sym_", "scalar"))
    }
    assert not host_reads, host_reads


@pytest.mark.gpu  # deselected by default (pyproject.toml); on a GPU machine: pytest -m gpu
def test_static_shape_loss_does_not_synchronise_on_cuda():
    priors, targets, loc, conf = _voc_case(8)
    device = torch.device("cuda")
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    args = (loc.to(device), conf.to(device), priors.to(device), targets)
    criterion = MultiBoxLoss(21)
    criterion(*args)  # warm-up: allocators and kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = criterion(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close([v.cpu() for v in losses], MultiBoxLoss(21)(loc, conf, priors, _cpu(targets)))


def _cpu(targets):
    return [{k: v.cpu() for k, v in t.items()} for t in targets]


@pytest.mark.parametrize("static", [True, False])
def test_batch_without_objects_is_scaled_per_image(static):
    conf = torch.randn(1, 8, 3, generator=torch.Generator().manual_seed(9))
    criterion = MultiBoxLoss(num_classes=3, static_shapes=static)
    losses = [
        criterion(torch.zeros(n, 8, 4), conf.repeat(n, 1, 1), PRIORS, [EMPTY] * n)[1] for n in (1, 2, 8)
    ]
    # One image: its 3 hardest negatives (highest background cross-entropy), not divided by anything.
    background_ce = -torch.log_softmax(conf[0], dim=-1)[:, 0]
    assert losses[0].item() == pytest.approx(background_ce.topk(3).values.sum().item(), rel=1e-6)
    for loss in losses[1:]:
        assert loss.item() == pytest.approx(losses[0].item(), rel=1e-6)


@pytest.mark.parametrize("static", [True, False])
def test_ground_truth_without_area_is_left_out(static):
    criterion = MultiBoxLoss(num_classes=3, static_shapes=static)
    loc = _perfect_loc(2) + 0.1
    conf = torch.randn(2, 8, 3, generator=torch.Generator().manual_seed(10))
    flat = torch.tensor([[0.5, 0.45, 0.5, 0.55]])  # zero width
    with_flat = [
        {"boxes": torch.cat([OBJECT["boxes"], flat]), "labels": torch.tensor([1, 2])},
        {"boxes": flat, "labels": torch.tensor([2])},
    ]
    expected = criterion(loc, conf, PRIORS, [OBJECT, EMPTY])
    with pytest.warns(UserWarning, match="2 ground-truth box"):
        losses = criterion(loc, conf, PRIORS, with_flat)
    torch.testing.assert_close(losses, expected)


def test_class_weights_scale_the_positives_classification_loss_only():
    """By hand: one positive of class 2 (weight 4) and its three hardest negatives (weight 1 whatever the
    weights); all-ones weights are the plain loss."""
    obj = {"boxes": OBJECT["boxes"], "labels": torch.tensor([2])}
    conf = torch.zeros(1, 8, 3)
    conf[0, :, 0] = torch.tensor([0.0, 1.0, -2.0, 2.0, 3.0, -3.0, 4.0, -1.0])

    def ce(logits, label):
        return -torch.log_softmax(torch.tensor(logits), 0)[label].item()

    negatives = ce([-3.0, 0.0, 0.0], 0) + ce([-2.0, 0.0, 0.0], 0) + ce([-1.0, 0.0, 0.0], 0)
    positive = ce([0.0, 0.0, 0.0], 2)
    plain = MultiBoxLoss(num_classes=3)(_perfect_loc(), conf, PRIORS, [obj])
    ones = MultiBoxLoss(num_classes=3, class_weights=[1, 1])(_perfect_loc(), conf, PRIORS, [obj])
    weighted = MultiBoxLoss(num_classes=3, class_weights=[1, 4])(_perfect_loc(), conf, PRIORS, [obj])
    assert plain[1].item() == pytest.approx(positive + negatives, rel=1e-6)
    assert ones[1].item() == plain[1].item() and ones[0].item() == weighted[0].item()
    assert weighted[1].item() == pytest.approx(4 * positive + negatives, rel=1e-6)


@pytest.mark.parametrize("weights", [[1.0], [1.0, -1.0], [1.0, float("nan")]])
def test_class_weights_must_be_one_per_class_and_finite(weights):
    with pytest.raises(ValueError, match="model.loss.class_weights needs 2 finite weights >= 0"):
        MultiBoxLoss(num_classes=3, class_weights=weights)
