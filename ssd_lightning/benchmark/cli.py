"""Command line of the benchmark suite: one subcommand per benchmark, `all` for the whole suite."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ssd_lightning.benchmark import external, formats
from ssd_lightning.benchmark.environment import device_tag, load_average, machine_info, resolve_device
from ssd_lightning.benchmark.external import DATA_MODULE, TRAIN_MODULE
from ssd_lightning.benchmark.report import Result, format_table, write_report
from ssd_lightning.benchmark.suites import (
    OPTIMIZERS,
    PRECISIONS,
    REFERENCE_MODES,
    FastPath,
    Settings,
    fast_path_ladder,
    inference_benchmark,
    loss_benchmark,
    postprocess_benchmark,
    train_step_benchmark,
)
from ssd_lightning.models.architectures import ARCHITECTURES, get_architecture

DEFAULT_OUT_DIR = Path("experiments/benchmarks")
# (warmup, repeats, number) per benchmark on CPU and on CUDA: CPU runs are kept short (a shared 2-core box).
# train-step and inference always make one more untimed call first (it checks both sides' outputs).
TIMING = {
    "loss": ((2, 10, 1), (10, 20, 10)),
    "postprocess": ((2, 10, 1), (10, 20, 5)),
    "train-step": ((0, 3, 1), (5, 10, 5)),
    "inference": ((0, 5, 1), (10, 20, 10)),
}
# torch.compile traces on the first call, and the next few calls may still recompile or autotune.
COMPILE_WARMUP = 5
# Batch of the training step and of inference throughput.
NETWORK_BATCH = {"cpu": 2, "cuda": 32}
INFERENCE_BATCH = {"cpu": 4, "cuda": 32}


def _sizes(args: argparse.Namespace, training: bool) -> list[int]:
    """--size, else every size the arch comes in for a train step and its usual size for inference."""
    if args.size:
        return list(args.size)
    architecture = get_architecture(args.arch)
    if training and architecture.sizes:
        return list(architecture.sizes)
    return [architecture.default_size]


def _arch(name: str) -> str:
    try:
        get_architecture(name)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return name


def _settings(args: argparse.Namespace, device: torch.device, benchmark: str) -> Settings:
    cpu, cuda = TIMING[benchmark]
    warmup, repeats, number = cuda if device.type == "cuda" else cpu
    return Settings(
        device=device,
        warmup=warmup if args.warmup is None else args.warmup,
        repeats=repeats if args.repeats is None else args.repeats,
        number=number if args.number is None else args.number,
        seed=args.seed,
        num_classes=args.num_classes,
        compact_width=args.width,
    )


def _with_compile_warmup(settings: Settings, fast: FastPath) -> Settings:
    return replace(settings, warmup=max(settings.warmup, COMPILE_WARMUP)) if fast.compile else settings


def _fast_path(args: argparse.Namespace) -> FastPath:
    return FastPath(
        precision=args.precision,
        channels_last=args.channels_last,
        compile=args.compile,
        optimizer=getattr(args, "optimizer", "default"),
        cudnn_benchmark=args.cudnn_benchmark,
        reference=args.reference,
    )


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_loss(args: argparse.Namespace, device: torch.device) -> list[Result]:
    settings = _settings(args, device, "loss")
    if args.compile:
        settings = replace(settings, warmup=max(settings.warmup, COMPILE_WARMUP))
    _log(
        f"loss: batch {args.batch}, {args.min_objects}-{args.max_objects} objects, "
        f"backward={args.backward}, compile={args.compile}"
    )
    result = loss_benchmark(
        settings,
        args.batch,
        args.size,
        args.min_objects,
        args.max_objects,
        args.backward,
        args.precision,
        args.compile,
    )
    return [result]


def run_postprocess(args: argparse.Namespace, device: torch.device) -> list[Result]:
    settings = _settings(args, device, "postprocess")
    _log(f"postprocess: batch {args.batch}, {args.scores} scores")
    return [postprocess_benchmark(settings, args.batch, args.size, args.scores)]


def _network_variants(args: argparse.Namespace, training: bool) -> list[FastPath]:
    if not args.sweep:
        return [_fast_path(args)]
    ladder = fast_path_ladder(training=training, compile_models=not args.no_compile)
    return [replace(fast, reference=args.reference) for fast in ladder]


def run_train_step(args: argparse.Namespace, device: torch.device) -> list[Result]:
    base = _settings(args, device, "train-step")
    batch = args.batch or NETWORK_BATCH[device.type]
    results = []
    for size in _sizes(args, training=True):
        for fast in _network_variants(args, training=True):
            _log(f"train-step: SSD{size}, batch {batch}, {fast}")
            results.append(
                train_step_benchmark(_with_compile_warmup(base, fast), size, batch, fast, args.arch)
            )
    return results


def run_inference(args: argparse.Namespace, device: torch.device) -> list[Result]:
    base = _settings(args, device, "inference")
    batch = args.batch or INFERENCE_BATCH[device.type]
    results = []
    for size in _sizes(args, training=False):
        for fast in _network_variants(args, training=False):
            for images in (1, batch):
                _log(f"inference: SSD{size}, batch {images}, {fast}")
                results.append(
                    inference_benchmark(
                        _with_compile_warmup(base, fast), size, images, fast, args.candidates, args.arch
                    )
                )
    return results


def run_data(args: argparse.Namespace, device: torch.device) -> list[Result]:
    _log(f"data: {DATA_MODULE}, {args.passes} passes, {args.workers} DataLoader workers")
    return [external.data_benchmark(args.root, args.passes, args.workers, args.image_size, args.timeout)]


def run_end_to_end(args: argparse.Namespace, device: torch.device) -> list[Result]:
    _log(f"end-to-end: {TRAIN_MODULE} {' '.join(args.overrides) or '(SSD300 on coco128)'}")
    result = external.end_to_end_benchmark(
        args.overrides, args.steps, args.skip_steps, device, args.timeout, args.coco128, args.workers
    )
    return [result]


def run_all(args: argparse.Namespace, device: torch.device) -> list[Result]:
    """The whole suite at the sizes that suit the device: on CUDA every knob of the fast path in turn (and
    our fastest training step against torchvision as shipped); on CPU small batches in fp32."""
    on_gpu = device.type == "cuda"
    loss = {"batch": 32, "size": 300, "min_objects": 1, "max_objects": 10, "precision": "fp32"}
    results = run_loss(_namespace(args, backward=False, compile=False, **loss), device)
    if not args.no_compile:
        results += run_loss(_namespace(args, backward=False, compile=True, **loss), device)
    if on_gpu:
        results += run_loss(_namespace(args, backward=True, compile=False, **loss), device)
    for scores in ("peaked", "flat") if on_gpu else ("peaked",):
        results += run_postprocess(_namespace(args, batch=32, size=300, scores=scores), device)
    network = {
        "precision": "fp32",
        "channels_last": False,
        "compile": False,
        "optimizer": "default",
        "cudnn_benchmark": False,
        "reference": "same",
        "sweep": on_gpu,
        "candidates": 1200.0,
        "arch": "vgg16",
    }
    results += run_train_step(_namespace(args, size=[300, 512], batch=None, **network), device)
    if on_gpu:
        fastest = fast_path_ladder(training=True, compile_models=not args.no_compile)[-1]
        as_shipped = {**network, **asdict(fastest), "reference": "eager", "sweep": False}
        results += run_train_step(_namespace(args, size=[300], batch=None, **as_shipped), device)
    results += run_inference(_namespace(args, size=[300], batch=None, **network), device)
    if not args.skip_data:
        workers = max(1, min(8, (os.cpu_count() or 2) - 2)) if on_gpu else 0
        results += run_data(_namespace(args, root=None, passes=2, workers=workers, image_size=300), device)
    if on_gpu and not args.skip_end_to_end:
        e2e = {"overrides": [], "steps": 200, "skip_steps": 20, "coco128": None, "workers": None}
        results += run_end_to_end(_namespace(args, **e2e), device)
    return results


def _namespace(args: argparse.Namespace, **values: object) -> argparse.Namespace:
    merged = vars(args).copy()
    merged.update(values)
    return argparse.Namespace(**merged)


COMMANDS: dict[str, Callable[[argparse.Namespace, torch.device], list[Result]]] = {
    "loss": run_loss,
    "postprocess": run_postprocess,
    "train-step": run_train_step,
    "inference": run_inference,
    "data": run_data,
    "end-to-end": run_end_to_end,
    "all": run_all,
}


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    common.add_argument("--warmup", type=int, help="untimed calls per side before timing")
    common.add_argument("--repeats", type=int, help="timed samples per side (the median is reported)")
    common.add_argument("--number", type=int, help="calls per timed sample")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--num-classes", type=int, default=21, help="classes including background (VOC: 21)")
    common.add_argument("--width", type=int, default=16, help="compact arch: first-layer channels")
    common.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where the JSON goes")
    common.add_argument("--no-save", action="store_true", help="print the table only, write no JSON")
    common.add_argument("--note", default="", help="free text stored with the results (e.g. machine busy)")
    return common


def _network_options(parser: argparse.ArgumentParser, optimizer: bool) -> None:
    parser.add_argument(
        "--size",
        type=int,
        nargs="+",
        help="300 | 512 (vgg16), 320 (mobilenet_v3_large), 300 (resnet50), any (compact); default: "
        "300 and 512 for a vgg16 train-step, 320 for mobilenet_v3_large, else 300",
    )
    parser.add_argument(
        "--arch",
        type=_arch,
        default="vgg16",
        help=f"one of {', '.join(ARCHITECTURES)} or timm:<name>. mobilenet_v3_large: SSDLite320 vs "
        "torchvision's; the others: ours only",
    )
    parser.add_argument("--batch", type=int, help="batch size (default: 32 on CUDA, small on CPU)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the networks")
    if optimizer:
        parser.add_argument("--optimizer", choices=OPTIMIZERS, default="default", help="SGD implementation")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="cudnn autotuning (both sides)")
    parser.add_argument(
        "--reference",
        choices=REFERENCE_MODES,
        default="same",
        help="torchvision with the same knobs | as shipped (eager, same precision) | not at all",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="each knob added in turn: fp32, bf16, channels_last, cudnn, fused, compile",
    )
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out of --sweep")


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="python -m ssd_lightning.benchmark",
        description="Benchmarks of ssd_lightning against torchvision's ssd300_vgg16 (and ssdlite320) "
        "doing the same work.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    loss = commands.add_parser(
        "loss", parents=[common], help="MultiBoxLoss vs torchvision matching + compute_loss"
    )
    loss.add_argument("--batch", type=int, default=32)
    loss.add_argument(
        "--size", type=int, choices=(300, 512), default=300, help="prior set (300: 8732 priors)"
    )
    loss.add_argument("--min-objects", type=int, default=1)
    loss.add_argument("--max-objects", type=int, default=10)
    loss.add_argument("--backward", action="store_true", help="include the loss's backward pass")
    loss.add_argument("--precision", choices=PRECISIONS, default="fp32", help="dtype of the predictions")
    loss.add_argument("--compile", action="store_true", help="torch.compile our loss (dynamic shapes)")

    post = commands.add_parser("postprocess", parents=[common], help="detect vs postprocess_detections")
    post.add_argument("--batch", type=int, default=32)
    post.add_argument("--size", type=int, choices=(300, 512), default=300)
    post.add_argument("--scores", choices=("peaked", "flat"), default="peaked", help="synthetic score model")

    train = commands.add_parser("train-step", parents=[common], help="forward+loss+backward+SGD, images/s")
    _network_options(train, optimizer=True)

    infer = commands.add_parser("inference", parents=[common], help="batch-1 latency, batch-N throughput")
    _network_options(infer, optimizer=False)
    infer.add_argument(
        "--candidates", type=float, default=1200.0, help="NMS candidates per image the scores are tuned to"
    )

    data = commands.add_parser("data", parents=[common], help="the data pipeline's own benchmark")
    data.add_argument("--root", type=Path, help="COCO-format root (default: coco128's coco/)")
    data.add_argument("--passes", type=int, default=2, help="timed passes over the dataset")
    data.add_argument("--workers", type=int, default=0, help="also time a DataLoader with this many workers")
    data.add_argument("--image-size", type=int, default=300)
    data.add_argument("--timeout", type=float, default=1800.0)

    e2e = commands.add_parser("end-to-end", parents=[common], help="images/s of a real train.py run")
    e2e.add_argument("--steps", type=int, default=200, help="optimiser steps of the run")
    e2e.add_argument("--skip-steps", type=int, default=20, help="first steps left out of the figures")
    e2e.add_argument("--coco128", type=Path, help="coco128 folder (default: ../shared/data/coco128)")
    e2e.add_argument("--workers", type=int, help="DataLoader workers (default: cores - 2, at most 8)")
    e2e.add_argument("--timeout", type=float, default=1800.0)
    e2e.add_argument(
        "overrides", nargs="*", help="Hydra overrides on top of the defaults (SSD300 on coco128, see README)"
    )

    everything = commands.add_parser("all", parents=[common], help="the whole suite for this device")
    everything.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    everything.add_argument("--skip-data", action="store_true")
    everything.add_argument("--skip-end-to-end", action="store_true")
    everything.add_argument("--timeout", type=float, default=1800.0)

    formats.add_parser(commands, common)  # every deployment format of one checkpoint, in one table
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one benchmark command; print the table; write the JSON (unless --no-save). Returns 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    if args.command == "formats":  # its own table and files (rows of formats, not ours vs torchvision)
        return formats.run_formats(args, device)
    machine = machine_info(device)
    if args.note:
        machine["note"] = args.note
    started = time.perf_counter()
    results = COMMANDS[args.command](args, device)
    machine["load_average_end"] = load_average()
    machine["wall_time_s"] = round(time.perf_counter() - started, 1)
    load = machine.get("load_average_start")
    print(
        f"{machine['device_name']} ({machine['device']}), torch {machine['torch']}, "
        f"torchvision {machine['torchvision']}, load {load} -> {machine['load_average_end']}"
    )
    print(format_table(results))
    if not args.no_save:
        path = write_report(args.out_dir, args.command, argv, machine, results, device_tag(machine))
        print(f"wrote {path}")
    return 0
