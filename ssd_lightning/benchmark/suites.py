"""The benchmarks. Each builds identical inputs for our code and torchvision's, checks that both do the same
work (equal losses, equal detections), then times them side by side."""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ssd_lightning.benchmark.reference import REFERENCE_IMAGE_SIZES, TorchvisionSSD
from ssd_lightning.benchmark.report import Result, Target
from ssd_lightning.benchmark.timing import Stats, measure
from ssd_lightning.benchmark.workloads import (
    ScoreModel,
    candidates_per_image,
    predictions,
    priors_as_anchors,
    random_targets,
    to_device,
    to_pixels,
)
from ssd_lightning.loss import MultiBoxLoss
from ssd_lightning.models import SSD, build_ssd
from ssd_lightning.models.conversion import convert_state_dict
from ssd_lightning.models.heads import class_logit_conv
from ssd_lightning.postprocess import DetectionConfig, detect
from ssd_lightning.priors import generate_priors, prior_preset

PRECISIONS = ("fp32", "bf16-mixed")
OPTIMIZERS = ("default", "foreach", "fused")
REFERENCE_MODES = ("same", "eager", "none")
# The paper's evaluation protocol, given to both sides.
DETECTION = DetectionConfig(score_threshold=0.01, nms_iou_threshold=0.45, top_k=200, pre_nms_top_k=400)


@dataclass(frozen=True)
class Settings:
    """Where and how long to measure; shared by every benchmark of a run."""

    device: torch.device
    warmup: int = 3
    repeats: int = 10
    number: int = 1
    seed: int = 0
    num_classes: int = 21
    compact_width: int = 16  # the compact arch's first-layer channels (model=compact's)

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def measure(self, functions: dict[str, Callable[[], object]]) -> dict[str, Stats]:
        return measure(functions, self.device, self.warmup, self.repeats, self.number)

    def timing(self) -> dict[str, int]:
        return {"warmup": self.warmup, "repeats": self.repeats, "number": self.number}


@dataclass(frozen=True)
class FastPath:
    """The speed knobs of a network benchmark.

    `reference`: "same" gives torchvision's model the same knobs; "eager" runs it as shipped (same precision,
    contiguous, not compiled, default optimiser); "none" measures ours only. cudnn autotuning is a process
    setting and so applies to both sides.
    """

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    optimizer: str = "default"
    cudnn_benchmark: bool = False
    reference: str = "same"

    def __post_init__(self) -> None:
        for value, allowed, name in (
            (self.precision, PRECISIONS, "precision"),
            (self.optimizer, OPTIMIZERS, "optimizer"),
            (self.reference, REFERENCE_MODES, "reference"),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

    def for_reference(self) -> FastPath:
        if self.reference == "eager":
            return FastPath(precision=self.precision, cudnn_benchmark=self.cudnn_benchmark)
        return self


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Lightning's "bf16-mixed" is autocast to bfloat16 around forward and loss; "fp32" changes nothing."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def count_host_syncs(function: Callable[[], object], device: torch.device) -> int | None:
    """How many times one call makes the host wait for the GPU (CUDA sync debug mode); None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            function()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


@functools.lru_cache(maxsize=2)
def _pristine_reference(num_classes: int, arch: str = "vgg16") -> TorchvisionSSD:
    reference = TorchvisionSSD(num_classes, arch)
    # Our detection settings (SSDLite's own defaults differ: threshold 0.001, NMS 0.55, 300 per image).
    reference.model.score_thresh = DETECTION.score_threshold
    reference.model.nms_thresh = DETECTION.nms_iou_threshold
    reference.model.detections_per_img = DETECTION.top_k
    reference.model.topk_candidates = DETECTION.pre_nms_top_k
    return reference


def reference_model(num_classes: int, arch: str = "vgg16") -> TorchvisionSSD:
    """A fresh copy of a random-weight torchvision SSD300 (or SSDLite320 for arch "mobilenet_v3_large"),
    built once per process: VGG init is slow."""
    return copy.deepcopy(_pristine_reference(num_classes, arch))


@torch.no_grad()
def calibrate_batch_norm(network: nn.Module, images: Tensor) -> None:
    """Set every BatchNorm's running statistics to those of `images` (one training-mode forward).

    torchvision's SSDLite initialisation (N(0, 0.03) convs) makes eval-mode activations vanish with the
    fresh statistics (mean 0, var 1): every prior would get the same scores. A trained network's
    statistics keep them O(1); this gives an untrained one such statistics.
    """
    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    was_training = network.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: after one batch, that batch's statistics
    network.train()
    network(images)
    network.train(was_training)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum


def _on_h100(device: torch.device) -> bool:
    return device.type == "cuda" and "H100" in torch.cuda.get_device_name(device)


# ----------------------------------------------------------------------------------------------- loss


def loss_benchmark(
    settings: Settings,
    batch: int = 32,
    size: int = 300,
    min_objects: int = 1,
    max_objects: int = 10,
    backward: bool = False,
    precision: str = "fp32",
    compile_loss: bool = False,
) -> Result:
    """MultiBoxLoss (matching, encoding, hard negative mining, both losses) vs torchvision's per-image
    `proposal_matcher(box_iou(...))` + `compute_loss`, on the same predictions, boxes and priors.

    `compile_loss` runs ours through `torch.compile(dynamic=True)` (box counts vary between batches);
    torchvision's per-image loop with data-dependent shapes stays eager.
    """
    device, num_classes = settings.device, settings.num_classes
    generator = settings.generator()
    priors = generate_priors(prior_preset(size, "voc"))
    targets = random_targets(batch, num_classes, generator, min_objects, max_objects)
    loc, conf = predictions(targets, priors, num_classes, generator, ScoreModel(kind="flat"))
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    loc, conf = (t.to(device, dtype).requires_grad_(backward) for t in (loc, conf))
    priors = priors.to(device)
    anchors = [priors_as_anchors(priors, size)] * batch
    our_targets = to_device(targets, device)
    their_targets = to_device(to_pixels(targets, size), device)
    criterion: nn.Module = MultiBoxLoss(num_classes)
    if compile_loss:
        criterion = torch.compile(criterion, dynamic=True)
    reference = reference_model(num_classes)

    def finish(loss_loc: Tensor, loss_conf: Tensor) -> tuple[Tensor, Tensor]:
        if backward:
            torch.autograd.grad(loss_loc + loss_conf, (loc, conf))
        return loss_loc, loss_conf

    def ours() -> tuple[Tensor, Tensor]:
        with autocast(device, precision):
            return finish(*criterion(loc, conf, priors, our_targets))

    def theirs() -> tuple[Tensor, Tensor]:
        with autocast(device, precision):
            losses = reference.loss(loc, conf, anchors, their_targets)
            return finish(losses["bbox_regression"], losses["classification"])

    our_values = [float(x) for x in ours()]
    their_values = [float(x) for x in theirs()]
    extra: dict[str, Any] = {
        "priors": priors.shape[0],
        "objects_per_image": sum(len(t["boxes"]) for t in targets) / batch,
        "loss_ours": dict(zip(("loc", "conf"), our_values, strict=True)),
        "loss_torchvision": dict(zip(("loc", "conf"), their_values, strict=True)),
        "max_relative_loss_difference": max(
            abs(a - b) / max(abs(b), 1e-12) for a, b in zip(our_values, their_values, strict=True)
        ),
        "host_syncs_ours": count_host_syncs(ours, device),
        "host_syncs_torchvision": count_host_syncs(theirs, device),
        "predictions": "random N(0, 1) offsets and logits (an untrained model)",
    }
    stats = settings.measure({"ours": ours, "theirs": theirs})
    return Result(
        benchmark="loss-backward" if backward else "loss",
        config={
            "batch": batch,
            "size": size,
            "num_classes": num_classes,
            "objects": f"{min_objects}-{max_objects}",
            "precision": precision,
            "compile": compile_loss,
            **settings.timing(),
        },
        ours=stats["ours"],
        theirs=stats["theirs"],
        images_per_call=batch,
        targets=[Target("ours <= 0.5x torchvision's time", "max_ratio", 0.5)],
        extra=extra,
    )


# ------------------------------------------------------------------------------------- post-processing


def compare_detections(
    ours: list[dict[str, Tensor]], theirs: list[dict[str, Tensor]], image_size: int
) -> dict[str, Any]:
    """How far apart the two sides' detections are: per-image counts, scores, and boxes (in pixels)."""
    same_count, score_diff, box_diff = 0, 0.0, 0.0
    for our, their in zip(ours, theirs, strict=True):
        if len(our["scores"]) != len(their["scores"]):
            continue
        same_count += 1
        if len(our["scores"]):
            score_diff = max(score_diff, float((our["scores"] - their["scores"]).abs().max()))
            box_diff = max(box_diff, float((our["boxes"] * image_size - their["boxes"]).abs().max()))
    return {
        "images_with_same_detection_count": same_count,
        "images": len(ours),
        "max_score_difference": score_diff,
        "max_box_difference_px": box_diff,
        "detections_per_image_ours": sum(len(d["scores"]) for d in ours) / max(len(ours), 1),
        "detections_per_image_torchvision": sum(len(d["scores"]) for d in theirs) / max(len(theirs), 1),
    }


def detections_agreement(pair: ModelPair, images: Tensor, loc: Tensor, conf: Tensor) -> dict[str, Any]:
    """Both sides' detections from the same eval-mode predictions, compared by :func:`compare_detections`.

    The background logit is shifted to leave about 300 NMS candidates per image, as a trained network's would.
    """
    if pair.reference is None:
        raise ValueError("detections_agreement needs a reference model (torchvision)")
    size = images.shape[-1]
    conf = conf.clone()
    conf[..., 0] += background_margin(conf, 300, DETECTION.score_threshold, DETECTION.pre_nms_top_k)
    feature_maps = [torch.zeros(1, 1, s, s) for s in pair.ours.prior_spec.feature_maps]  # only sizes read
    anchors = pair.reference.default_boxes(images, feature_maps)
    theirs = pair.reference.detections(loc, conf, anchors, size)
    return compare_detections(pair.ours.detect(loc, conf), theirs, size)


def postprocess_benchmark(
    settings: Settings, batch: int = 32, size: int = 300, scores: str = "peaked"
) -> Result:
    """`detect` (softmax, decode, threshold, per-class NMS, top 200) vs torchvision's `postprocess_detections`
    with the same thresholds, on the same predictions and priors."""
    device, num_classes = settings.device, settings.num_classes
    generator = settings.generator()
    priors = generate_priors(prior_preset(size, "voc"))
    targets = random_targets(batch, num_classes, generator)
    score_model = ScoreModel(kind=scores)
    loc, conf = (t.to(device) for t in predictions(targets, priors, num_classes, generator, score_model))
    priors = priors.to(device)
    anchors = [priors_as_anchors(priors, size)] * batch
    reference = reference_model(num_classes)

    def ours() -> list[dict[str, Tensor]]:
        return detect(loc, conf, priors, DETECTION)

    def theirs() -> list[dict[str, Tensor]]:
        return reference.detections(loc, conf, anchors, size)

    extra = {
        "scores": asdict(score_model),
        "candidates_per_image": candidates_per_image(
            conf, DETECTION.score_threshold, DETECTION.pre_nms_top_k
        ),
        **compare_detections(ours(), theirs(), size),
    }
    stats = settings.measure({"ours": ours, "theirs": theirs})
    return Result(
        benchmark="postprocess",
        config={
            "batch": batch,
            "size": size,
            "num_classes": num_classes,
            "scores": scores,
            **asdict(DETECTION),
            **settings.timing(),
        },
        ours=stats["ours"],
        theirs=stats["theirs"],
        images_per_call=batch,
        targets=[Target("ours <= 1.0x torchvision's time", "max_ratio", 1.0)],
        extra=extra,
    )


# -------------------------------------------------------------------------------- networks: train/infer


@dataclass
class ModelPair:
    """Our SSD and (SSD300) torchvision's with identical weights, each with its (maybe compiled) network."""

    ours: SSD
    our_network: nn.Module
    reference: TorchvisionSSD | None
    their_network: nn.Module | None


def build_model_pair(settings: Settings, size: int, fast: FastPath, arch: str = "vgg16") -> ModelPair:
    """Our SSD of `size`/`arch` on the device in the memory format of `fast`, compiled if asked; where
    torchvision has the same model (SSD300-VGG16, SSDLite320-MobileNetV3) and `fast.reference` is not
    "none", also torchvision's, with the same weights and priors. SSDLite's BatchNorm statistics are set
    from a batch of random images (`calibrate_batch_norm`) before the weights are shared."""
    device = settings.device
    with_reference = fast.reference != "none" and REFERENCE_IMAGE_SIZES.get(arch) == size
    reference = reference_model(settings.num_classes, arch) if with_reference else None
    if arch == "vgg16" and reference is not None:
        # torchvision's default boxes: the COCO sizes, with only widths/heights clipped to the image. With
        # them and its weights our network computes exactly what torchvision's does.
        spec = replace(prior_preset(size, "coco"), clip="size")
        ours = build_ssd(size, settings.num_classes, prior_spec=spec)
    else:
        # SSDLite's default priors are torchvision's default boxes; resnet50 gets NVIDIA's (COCO sizes).
        ours = build_ssd(size, settings.num_classes, arch=arch, width=settings.compact_width)
    if arch == "mobilenet_v3_large":
        calibration = torch.randn(2, 3, size, size, generator=settings.generator())
        calibrate_batch_norm(reference.network if reference is not None else ours, calibration)
    if reference is not None:
        ours.load_state_dict(convert_state_dict(reference.model.state_dict(), "torchvision"))
    memory_format = torch.channels_last if fast.channels_last else torch.contiguous_format
    ours.to(device=device, memory_format=memory_format)
    our_network: nn.Module = torch.compile(ours) if fast.compile else ours
    their_network = None
    if reference is not None:
        their_fast = fast.for_reference()
        reference.to(device, torch.channels_last if their_fast.channels_last else torch.contiguous_format)
        their_network = torch.compile(reference.network) if their_fast.compile else reference.network
    return ModelPair(ours, our_network, reference, their_network)


def _no_reference_reason(fast: FastPath, size: int, arch: str) -> str:
    if fast.reference == "none":
        return "not measured (--reference none)"
    if arch not in REFERENCE_IMAGE_SIZES:
        return f"torchvision has no {arch} SSD"
    return f"torchvision has no {arch} SSD{size} (only SSD{REFERENCE_IMAGE_SIZES[arch]})"


def _images(settings: Settings, batch: int, size: int, channels_last: bool) -> Tensor:
    images = torch.randn(batch, 3, size, size, generator=settings.generator()).to(settings.device)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def _optimizer(parameters: Iterator[nn.Parameter], kind: str) -> torch.optim.Optimizer:
    # SSD's SGD settings; a small learning rate keeps random-weight training finite over many steps.
    options: dict[str, Any] = {"lr": 1e-4, "momentum": 0.9, "weight_decay": 5e-4}
    if kind == "foreach":
        options["foreach"] = True
    elif kind == "fused":
        options["fused"] = True
    return torch.optim.SGD(parameters, **options)


def _peak_memory_mib(function: Callable[[], object], device: torch.device) -> float | None:
    """Run `function` once; on CUDA return the peak memory it allocated."""
    if device.type != "cuda":
        function()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    function()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def _fast_config(fast: FastPath) -> dict[str, Any]:
    config = asdict(fast)
    if fast.reference == "eager":
        their_options = asdict(fast.for_reference())
        del their_options["reference"]
        config["reference_options"] = their_options
    else:
        config["reference_options"] = fast.reference
    return config


def train_step_benchmark(
    settings: Settings, size: int = 300, batch: int = 32, fast: FastPath | None = None, arch: str = "vgg16"
) -> Result:
    """One optimisation step (forward, loss, backward, SGD step) in images/s; torchvision's SSD300 does the
    same step on the same images and targets (SSD512: torchvision has none, ours only)."""
    fast = fast or FastPath()
    device = settings.device
    with cudnn_benchmark(fast.cudnn_benchmark):
        pair = build_model_pair(settings, size, fast, arch)
        pair.ours.train()
        images = _images(settings, batch, size, fast.channels_last)
        targets = random_targets(batch, settings.num_classes, settings.generator())
        our_targets = to_device(targets, device)
        criterion = MultiBoxLoss(settings.num_classes)
        our_optimizer = _optimizer(pair.ours.parameters(), fast.optimizer)
        last_loss: dict[str, Tensor] = {}

        def ours() -> None:
            with autocast(device, fast.precision):
                loc, conf = pair.our_network(images)
                loss_loc, loss_conf = criterion(loc, conf, pair.ours.priors, our_targets)
                loss = loss_loc + loss_conf
            loss.backward()
            our_optimizer.step()
            our_optimizer.zero_grad(set_to_none=True)
            last_loss["ours"] = loss.detach()

        functions: dict[str, Callable[[], object]] = {"ours": ours}
        if pair.reference is not None and pair.their_network is not None:
            reference, their_network = pair.reference, pair.their_network
            their_fast = fast.for_reference()
            reference.model.train()
            their_images = _images(settings, batch, size, their_fast.channels_last)
            their_targets = to_device(to_pixels(targets, size), device)
            their_optimizer = _optimizer(reference.model.parameters(), their_fast.optimizer)

            def theirs() -> None:
                with autocast(device, their_fast.precision):
                    loss = reference.training_loss(their_network, their_images, their_targets)
                loss.backward()
                their_optimizer.step()
                their_optimizer.zero_grad(set_to_none=True)
                last_loss["theirs"] = loss.detach()

            functions["theirs"] = theirs

        extra: dict[str, Any] = {}
        for name, function in functions.items():
            extra[f"peak_memory_mib_{name}"] = _peak_memory_mib(function, device)
            extra[f"first_loss_{name}"] = float(last_loss[name])
        stats = settings.measure(functions)
    extra.update({f"last_loss_{name}": float(loss) for name, loss in last_loss.items()})
    if pair.reference is None:
        extra["torchvision"] = _no_reference_reason(fast, size, arch)
    targets_list = [
        Target(
            "ours >= 1.3x torchvision's images/s (GPU)",
            "min_speedup",
            1.3,
            applies=device.type == "cuda" and "theirs" in stats,
        )
    ]
    if arch == "vgg16" and size == 300 and fast.precision == "bf16-mixed" and batch == 32:
        targets_list.append(
            Target(">= 1000 img/s (H100)", "min_images_per_s", 1000.0, applies=_on_h100(device))
        )
    return Result(
        benchmark="train-step",
        config={
            "arch": arch,
            **({"width": settings.compact_width} if arch == "compact" else {}),
            "size": size,
            "batch": batch,
            "num_classes": settings.num_classes,
            **_fast_config(fast),
            **settings.timing(),
        },
        ours=stats["ours"],
        theirs=stats.get("theirs"),
        images_per_call=batch,
        targets=targets_list,
        extra=extra,
    )


def background_margin(
    conf: Tensor, wanted_candidates: float, score_threshold: float, per_class: int
) -> float:
    """The shift of the background logit that leaves about `wanted_candidates` NMS candidates per image.

    A randomly initialised network scores every class near 1/C, which would send every prior of every
    class into NMS; a trained one is confident about background. Shifting the background bias (bisection
    on the measured logits) gives the random network a trained network's candidate count.
    """
    low, high = 0.0, 40.0
    for _ in range(30):
        middle = (low + high) / 2
        shifted = conf.clone()
        shifted[..., 0] += middle
        if candidates_per_image(shifted, score_threshold, per_class) > wanted_candidates:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def _shift_background_bias(convs: list[nn.Conv2d], num_classes: int, margin: float) -> None:
    with torch.no_grad():
        for conv in convs:
            conv.bias.view(-1, num_classes)[:, 0] += margin  # channels are (box, class) per position


def inference_benchmark(
    settings: Settings,
    size: int = 300,
    batch: int = 1,
    fast: FastPath | None = None,
    candidates: float = 1200.0,
    arch: str = "vgg16",
) -> Result:
    """Images in, detections out (network + post-processing), eval mode, no autograd: batch 1 gives the
    latency, larger batches the throughput. Both networks get the same weights with the background bias
    raised so that about `candidates` boxes per image reach NMS, as with a trained model."""
    fast = fast or FastPath()
    if fast.optimizer != "default":
        fast = replace(fast, optimizer="default")
    device, num_classes = settings.device, settings.num_classes
    with cudnn_benchmark(fast.cudnn_benchmark):
        pair = build_model_pair(settings, size, fast, arch)
        pair.ours.eval()
        images = _images(settings, batch, size, fast.channels_last)
        with torch.no_grad():
            _, conf = pair.ours(images)
        margin = background_margin(conf, candidates, DETECTION.score_threshold, DETECTION.pre_nms_top_k)
        pair.ours.detection = DETECTION
        _shift_background_bias([class_logit_conv(head) for head in pair.ours.heads], num_classes, margin)

        def ours() -> list[dict[str, Tensor]]:
            with torch.inference_mode(), autocast(device, fast.precision):
                loc, conf = pair.our_network(images)
                return pair.ours.detect(loc, conf)

        functions: dict[str, Callable[[], object]] = {"ours": ours}
        if pair.reference is not None and pair.their_network is not None:
            reference, their_network = pair.reference, pair.their_network
            their_fast = fast.for_reference()
            reference.model.eval()
            their_convs = [
                [m for m in branch.modules() if isinstance(m, nn.Conv2d)][-1]  # SSDLite: the 1x1 after the dw
                for branch in reference.model.head.classification_head.module_list
            ]
            _shift_background_bias(their_convs, num_classes, margin)
            their_images = _images(settings, batch, size, their_fast.channels_last)

            def theirs() -> list[dict[str, Tensor]]:
                with torch.inference_mode(), autocast(device, their_fast.precision):
                    return reference.infer(their_network, their_images)

            functions["theirs"] = theirs

        with torch.no_grad():
            _, conf = pair.ours(images)
        outputs = {name: function() for name, function in functions.items()}
        extra: dict[str, Any] = {
            "background_logit_shift": margin,
            "candidates_per_image": candidates_per_image(
                conf, DETECTION.score_threshold, DETECTION.pre_nms_top_k
            ),
            "detections_per_image_ours": sum(len(d["scores"]) for d in outputs["ours"]) / batch,
        }
        if "theirs" in outputs:
            extra["detections_per_image_torchvision"] = (
                sum(len(d["scores"]) for d in outputs["theirs"]) / batch
            )
        else:
            extra["torchvision"] = _no_reference_reason(fast, size, arch)
        stats = settings.measure(functions)
    latency = batch == 1
    targets: list[Target] = []
    if latency and arch == "vgg16" and size == 300:
        targets.append(Target("<= 4 ms incl. NMS (H100)", "max_latency_ms", 4.0, applies=_on_h100(device)))
    config = {
        "arch": arch,
        **({"width": settings.compact_width} if arch == "compact" else {}),
        "size": size,
        "batch": batch,
        "num_classes": num_classes,
        **_fast_config(fast),
        **settings.timing(),
    }
    del config["optimizer"]
    return Result(
        benchmark="inference-latency" if latency else "inference-throughput",
        config=config,
        ours=stats["ours"],
        theirs=stats.get("theirs"),
        images_per_call=batch,
        targets=targets,
        extra=extra,
    )


def fast_path_ladder(training: bool = True, compile_models: bool = True) -> list[FastPath]:
    """Each speed knob added in turn, so each is measured: fp32 -> bf16-mixed -> channels_last -> cudnn
    autotuning -> fused SGD (training only) -> torch.compile."""
    ladder = [
        FastPath("fp32"),
        FastPath("bf16-mixed"),
        FastPath("bf16-mixed", channels_last=True),
        FastPath("bf16-mixed", channels_last=True, cudnn_benchmark=True),
    ]
    if training:
        ladder.append(replace(ladder[-1], optimizer="fused"))
    if compile_models:
        ladder.append(replace(ladder[-1], compile=True))
    return ladder
