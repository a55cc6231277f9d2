"""`python -m ssd_lightning.benchmark formats ckpt_path=<file> [dataset=...] [split=test]`: one trained
checkpoint in every deployment format and precision, measured side by side in one run.

Per row: file size; batch-1 latency (a decoded image of its original size in, boxes in its pixels out),
median and p95, split into pre-processing (resize, and normalisation where it is outside the graph), the
network, and NMS (the graph with post-processing minus the same file exported without it); throughput at a
larger batch; VOC07 and COCO mAP on the evaluation split; agreement with PyTorch's detections. PyTorch eager
(the checkpoint path of eval.py/predict.py) and torchvision's model of the same architecture (SSDLite320,
SSD300-VGG16; our trained weights converted into it where the layouts match) are the reference rows.

Every exported file takes uint8 pixels (input_format=uint8: normalisation in the graph), as a deployment
would. Rows are timed in turn within each round, so load from other processes falls on all of them; still,
measure on an idle machine. Writes `<time>_formats_<device>.json` and `.md` into experiments/benchmarks/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from ssd_lightning.benchmark.environment import device_tag, load_average, machine_info
from ssd_lightning.benchmark.reference import REFERENCE_IMAGE_SIZES, TorchvisionSSD
from ssd_lightning.benchmark.suites import calibrate_batch_norm
from ssd_lightning.benchmark.timing import interleaved_samples
from ssd_lightning.boxes import cxcywh_to_xyxy
from ssd_lightning.checkpoint_files import load_checkpoint
from ssd_lightning.data import build_eval_transform, collate_detection, decode_rgb
from ssd_lightning.export import export_onnx, export_torchscript
from ssd_lightning.metrics.evaluation import DetectionEvaluator
from ssd_lightning.models.conversion import convert_state_dict
from ssd_lightning.runtimes import (
    Detections,
    Detector,
    ModelInfo,
    OnnxRuntimeDetector,
    OpenVINODetector,
    PyTorchDetector,
    TensorRTDetector,
    TorchScriptDetector,
    calibration_pixels,
    data_split,
    evaluate_detector,
    installed,
    resize_images,
)
from ssd_lightning.runtimes.conversion import build_tensorrt_engine, quantize_onnx, write_openvino
from ssd_lightning.training.module import SSDLitModule

log = logging.getLogger("ssd_lightning")
ROWS = (
    "pytorch",
    "torchvision",
    "torchscript",
    "onnxruntime",
    "onnxruntime-int8",
    "openvino",
    "openvino-bf16",
    "openvino-int8",
    "openvino-int8-nncf",
    "tensorrt-fp16",
    "tensorrt-int8",
)
THROUGHPUT_BATCH = {"cpu": 8, "cuda": 32}


@dataclass
class Row:
    """One format/precision: its detector, what times its network alone, and the figures measured."""

    name: str
    detector: Detector
    network: Callable[[np.ndarray], Any] | None  # the network without post-processing, on prepared input
    file_mib: float | None
    note: str = ""
    figures: dict[str, Any] = field(default_factory=dict)


def _mib(path: Path) -> float:
    """A model file's size; an OpenVINO IR's with its weights (.bin)."""
    paths = [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]
    return sum(p.stat().st_size for p in paths) / 2**20


def _tensor_mib(module: torch.nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values()) / 2**20


class TorchvisionDetector(Detector):
    """torchvision's SSD (`TorchvisionSSD`): our pre-processing, its backbone + head, default boxes and
    `postprocess_detections` with our thresholds."""

    runtime = "torchvision"

    def __init__(self, reference: TorchvisionSSD, info: ModelInfo) -> None:
        super().__init__(
            dataclasses.replace(info, input_format="float"), f"torchvision {reference.arch}", "cpu"
        )
        self.reference = reference

    def network(self, prepared: np.ndarray) -> Any:
        with torch.inference_mode():
            return self.reference.network(torch.from_numpy(prepared))

    def run(self, prepared: np.ndarray) -> list[Detections]:
        with torch.inference_mode():
            detections = self.reference.infer(self.reference.network, torch.from_numpy(prepared))
        size = float(self.image_size)
        return [
            {
                "boxes": (d["boxes"] / size).numpy(),
                "scores": d["scores"].numpy(),
                "labels": d["labels"].numpy(),
            }
            for d in detections
        ]


def torchvision_twin(module: SSDLitModule) -> tuple[TorchvisionSSD | None, str]:
    """torchvision's model of the checkpoint's architecture with the checkpoint's weights (pure renaming,
    `convert_state_dict`'s inverse) when the layouts match, else random weights; and a note saying which
    (and whether its default boxes are our priors, without which its mAP says nothing)."""
    arch, size = module.hparams["net"].get("arch", "vgg16"), module.image_size
    if REFERENCE_IMAGE_SIZES.get(arch) != size:
        return None, f"torchvision has no {arch} SSD{size}"
    reference = TorchvisionSSD(module.num_classes, arch)
    keys = list(reference.model.state_dict())
    try:
        # The conversion is a renaming: what it makes of a probe of indices says which key becomes which.
        renamed = convert_state_dict(
            {key: torch.tensor(float(i)) for i, key in enumerate(keys)}, "torchvision"
        )
        ours = module.net.state_dict()
        converted = {keys[int(index)]: ours[our_key] for our_key, index in renamed.items()}
        reference.model.load_state_dict(converted, strict=True)
        note = "our trained weights"
    except (KeyError, RuntimeError, ValueError) as error:
        if arch == "mobilenet_v3_large":
            calibrate_batch_norm(reference.network, torch.randn(2, 3, size, size))
        note = f"random weights (ours do not convert: {str(error).splitlines()[0][:80]})"
    detection = module.net.detection
    model = reference.model.eval()
    model.score_thresh, model.nms_thresh = detection.score_threshold, detection.nms_iou_threshold
    model.detections_per_img, model.topk_candidates = detection.top_k, detection.pre_nms_top_k
    features = [torch.zeros(1, 1, s, s) for s in module.net.prior_spec.feature_maps]
    anchors = reference.default_boxes(torch.zeros(1, 3, size, size), features)[0] / size
    same_boxes = anchors.shape == module.net.priors.shape and torch.allclose(
        anchors, cxcywh_to_xyxy(module.net.priors), atol=1e-4
    )
    if note.startswith("random") or not same_boxes:
        note += "; its default boxes are not our priors: mAP not comparable" if not same_boxes else ""
    return reference, note


def _ms(samples: Sequence[float], quantile: float = 50.0) -> float:
    return float(np.percentile(np.asarray(samples) * 1e3, quantile))


def _agreement(reference: list[Detections], actual: list[Detections]) -> dict[str, Any]:
    same = [len(a["scores"]) == len(r["scores"]) for r, a in zip(reference, actual, strict=True)]
    diffs = [
        float(np.abs(np.sort(a["scores"]) - np.sort(r["scores"])).max())
        for r, a, equal in zip(reference, actual, same, strict=True)
        if equal and len(r["scores"])
    ]
    return {
        "same_count_fraction": sum(same) / max(len(same), 1),
        "max_score_difference": max(diffs, default=0.0),
    }


def build_rows(
    module: SSDLitModule,
    checkpoint: Path,
    wanted: Sequence[str],
    calibration: np.ndarray,
    work: Path,
    device: torch.device,
) -> list[Row]:
    """Export the checkpoint in every wanted format/precision (each also without post-processing, to time
    its network alone) and load each on its runtime."""
    hparams, net = module.hparams, module.net.eval()
    common = {
        "input_format": "uint8",
        "pixel_mean": list(hparams["pixel_mean"]),
        "pixel_std": list(hparams["pixel_std"]),
        "class_names": module.class_names,
        "metadata": {"checkpoint": str(checkpoint), "net": dict(hparams["net"]), "precision": "fp32"},
    }
    on = device.type
    rows: list[Row] = []
    pytorch = PyTorchDetector(module, checkpoint, on)

    def eager_network(prepared: np.ndarray) -> Any:
        with torch.inference_mode():
            return pytorch.module(torch.from_numpy(prepared).to(on).permute(0, 3, 1, 2).contiguous())

    if "pytorch" in wanted:
        rows.append(Row("pytorch", pytorch, eager_network, _tensor_mib(net), "eager, the checkpoint path"))
    if "torchvision" in wanted and on == "cpu":
        reference, note = torchvision_twin(module)
        if reference is not None:
            detector = TorchvisionDetector(reference, pytorch.info)
            rows.append(Row("torchvision", detector, detector.network, _tensor_mib(reference.model), note))
        else:
            log.warning("formats: no torchvision row: %s", note)
    exported = [name for name in wanted if name not in ("pytorch", "torchvision")]
    if not exported:
        return rows
    for name in ("onnxscript", "onnx_ir", "nncf"):
        logging.getLogger(name).setLevel(logging.ERROR)
    files: dict[tuple[str, bool], Path] = {}
    for raw in (False, True):
        suffix = "_raw" if raw else ""
        onnx_path = export_onnx(net, work / f"model{suffix}.onnx", include_postprocess=not raw, **common)
        files[("onnx", raw)] = onnx_path
        if "torchscript" in wanted:
            files[("torchscript", raw)] = export_torchscript(
                net, work / f"model{suffix}.pt", include_postprocess=not raw, **common
            )
        if any(name.endswith("int8") for name in exported):
            files[("int8", raw)] = quantize_onnx(onnx_path, work / f"model_int8{suffix}.onnx", calibration)
        if "openvino-int8-nncf" in wanted:
            files[("nncf", raw)] = quantize_onnx(
                onnx_path, work / f"model_nncf{suffix}.onnx", calibration, quantizer="nncf"
            )
        if any(name.startswith("openvino") for name in exported):
            files[("openvino", raw)] = write_openvino(onnx_path, work / f"model{suffix}.xml")
            if ("int8", raw) in files:
                files[("openvino-int8", raw)] = write_openvino(
                    files[("int8", raw)], work / f"model_int8{suffix}.xml"
                )
            if ("nncf", raw) in files:
                files[("openvino-nncf", raw)] = write_openvino(
                    files[("nncf", raw)], work / f"model_nncf{suffix}.xml"
                )
        if on == "cuda" and "tensorrt-fp16" in wanted:
            files[("trt-fp16", raw)] = build_tensorrt_engine(onnx_path, work / f"model_fp16{suffix}.engine")
        if on == "cuda" and "tensorrt-int8" in wanted:
            symmetric = quantize_onnx(onnx_path, work / f"model_int8_sym{suffix}.onnx", calibration)
            files[("trt-int8", raw)] = build_tensorrt_engine(
                symmetric, work / f"model_int8{suffix}.engine", precision="int8"
            )

    def add(name: str, key: str, make: Callable[[Path, bool], Detector], note: str = "") -> None:
        if name not in wanted or (key, False) not in files:
            return
        path = files[(key, False)]
        raw = make(files[(key, True)], True)
        rows.append(Row(name, make(path, False), raw.outputs, _mib(path), note))

    add("torchscript", "torchscript", lambda p, raw: TorchScriptDetector(p, on, raw=raw), "traced")
    # Spinning threads would steal the cores from the rows timed after them.
    add("onnxruntime", "onnx", lambda p, raw: OnnxRuntimeDetector(p, on, raw=raw, allow_spinning=False))
    add(
        "onnxruntime-int8",
        "int8",
        lambda p, raw: OnnxRuntimeDetector(p, on, raw=raw, allow_spinning=False),
        "QDQ, onnxruntime quantiser",
    )
    add("openvino", "openvino", lambda p, raw: OpenVINODetector(p, raw=raw), "computing in f32")
    bf16 = "bf16 (default here)" if _openvino_bf16() else "no bf16 units: f32"
    add(
        "openvino-bf16",
        "openvino",
        lambda p, raw: OpenVINODetector(p, inference_precision="bf16", raw=raw),
        bf16,
    )
    add(
        "openvino-int8", "openvino-int8", lambda p, raw: OpenVINODetector(p, raw=raw), "onnxruntime quantiser"
    )
    add("openvino-int8-nncf", "openvino-nncf", lambda p, raw: OpenVINODetector(p, raw=raw), "NNCF quantiser")
    add("tensorrt-fp16", "trt-fp16", lambda p, raw: TensorRTDetector(p, on, raw=raw))
    add("tensorrt-int8", "trt-int8", lambda p, raw: TensorRTDetector(p, on, raw=raw), "symmetric QDQ + fp16")
    return rows


def _onnxruntime_gpu() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _openvino_bf16() -> bool:
    if not installed("openvino"):
        return False
    import openvino

    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def measure_rows(
    rows: list[Row],
    image: np.ndarray,
    batch_images: list[np.ndarray],
    warmup: int,
    repeats: int,
    throughput_repeats: int,
    device: torch.device,
) -> None:
    """Batch-1 latency (end to end, and its parts) and throughput of every row, into `row.figures`."""
    size = rows[0].detector.image_size
    prepared = {row.name: row.detector.prepare(resize_images([image], size)) for row in rows}
    end_to_end = interleaved_samples(
        {r.name: (lambda r=r: r.detector([image])) for r in rows}, device, warmup, repeats
    )
    pre = interleaved_samples(
        {r.name: (lambda r=r: r.detector.prepare(resize_images([image], size))) for r in rows},
        device,
        warmup,
        repeats,
    )
    graph = interleaved_samples(
        {r.name: (lambda r=r: r.detector.run(prepared[r.name])) for r in rows}, device, warmup, repeats
    )
    networks = {r.name: (lambda r=r: r.network(prepared[r.name])) for r in rows if r.network is not None}
    network = interleaved_samples(networks, device, warmup, repeats)
    batch = interleaved_samples(
        {r.name: (lambda r=r: r.detector(batch_images)) for r in rows}, device, 1, throughput_repeats
    )
    for row in rows:
        name = row.name
        net_ms = _ms(network[name]) if name in network else None
        row.figures.update(
            latency_ms_median=_ms(end_to_end[name]),
            latency_ms_p95=_ms(end_to_end[name], 95),
            preprocess_ms=_ms(pre[name]),
            network_ms=net_ms,
            nms_ms=None if net_ms is None else max(0.0, _ms(graph[name]) - net_ms),
            graph_ms=_ms(graph[name]),
            throughput_batch=len(batch_images),
            throughput_images_per_s=len(batch_images) / statistics.median(batch[name]),
        )


def evaluate_rows(rows: list[Row], loader: DataLoader, class_names: list[str]) -> None:
    """mAP of every row on the evaluation split, and its detections against PyTorch's (the first row)."""
    reference: list[Detections] | None = None
    for row in rows:
        detections: list[Detections] = []
        result = evaluate_detector(row.detector, loader, DetectionEvaluator(class_names))
        for images, _ in loader:  # the same images again, for the agreement with PyTorch
            detections += row.detector.infer(images.permute(0, 2, 3, 1).numpy())
            break
        if reference is None:
            reference = detections
        row.figures.update(
            map_voc07=result.map_voc07,
            map_coco=result.map,
            eval_images=result.num_images,
            **{f"vs_pytorch_{k}": v for k, v in _agreement(reference, detections).items()},
        )
    for row in rows:  # a reference whose boxes are not ours has a meaningless mAP
        if "not comparable" in row.note:
            row.figures["map_voc07"] = row.figures["map_coco"] = None


def markdown_table(rows: list[Row], title: str) -> str:
    """The table the README shows."""
    eager = next((r.figures["latency_ms_median"] for r in rows if r.name == "pytorch"), None)
    header = (
        "| format | precision | file MiB | batch-1 ms median / p95 | pre / network / NMS ms | speed-up | "
        f"img/s at batch {rows[0].figures['throughput_batch']} | VOC07 mAP | COCO mAP | note |"
    )
    lines = [f"**{title}**", "", header, "|" + "---|" * 10]

    def number(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for row in rows:
        f = row.figures
        parts = " / ".join(number(f.get(k)) for k in ("preprocess_ms", "network_ms", "nms_ms"))
        speed = "-" if not eager else f"{eager / f['latency_ms_median']:.1f}x"
        lines.append(
            f"| {row.name} | {row.detector.info.precision} | {number(row.file_mib)} | "
            f"{number(f['latency_ms_median'])} / {number(f['latency_ms_p95'])} | {parts} | {speed} | "
            f"{number(f['throughput_images_per_s'])} | {number(f.get('map_voc07'), 4)} | "
            f"{number(f.get('map_coco'), 4)} | {row.note} |"
        )
    return "\n".join(lines)


def goals(rows: list[Row], arch: str) -> list[dict[str, Any]]:
    """The issue's goals that apply to this architecture, judged from the rows (CPU figures)."""
    by_name = {r.name: r.figures for r in rows}
    exported = [r for r in rows if r.name not in ("pytorch", "torchvision")]
    if not exported or "pytorch" not in by_name:
        return []
    out: list[dict[str, Any]] = []

    def judge(goal: str, row: Row, met: bool) -> None:
        out.append({"goal": goal, "row": row.name, "met": bool(met)})

    best = min(exported, key=lambda r: r.figures["latency_ms_median"])
    fastest, eager = best.figures["latency_ms_median"], by_name["pytorch"]["latency_ms_median"]
    if arch == "mobilenet_v3_large":
        judge("best runtime <= 10 ms batch 1", best, fastest <= 10)
        judge(">= 3x faster than PyTorch eager", best, eager / fastest >= 3)
        if "torchvision" in by_name:
            judge(
                "faster than torchvision eager", best, fastest < by_name["torchvision"]["latency_ms_median"]
            )
    if arch == "vgg16":
        fp32 = by_name["pytorch"].get("map_voc07")
        for row in (r for r in exported if r.detector.info.precision == "int8"):
            judge("INT8 <= 200 ms batch 1", row, row.figures["latency_ms_median"] <= 200)
            if fp32 is not None and row.figures.get("map_voc07") is not None:
                judge(
                    "INT8 VOC07 mAP within 1.0 point of fp32",
                    row,
                    abs(fp32 - row.figures["map_voc07"]) <= 0.01,
                )
    return out


def run_formats(args: argparse.Namespace, device: torch.device) -> int:
    """The `formats` command (see the module docstring)."""
    settings, overrides = _parse_overrides(args.overrides)
    if "ckpt_path" not in settings:
        raise SystemExit(
            "formats needs ckpt_path=<checkpoint> (a .ckpt or export.py format=safetensors file)"
        )
    checkpoint = Path(settings["ckpt_path"]).expanduser()
    trust = settings.get("trust_checkpoint", "false").lower() == "true"
    module = SSDLitModule.from_checkpoint(load_checkpoint(checkpoint, "ckpt_path", trust)).eval()
    hparams = module.hparams
    transform = build_eval_transform(
        module.image_size, hparams["pixel_mean"], hparams["pixel_std"], normalize=False
    )
    split = settings.get("split", "test")
    arguments = _data_arguments(module, overrides)
    evaluation = data_split(arguments, split, transform)
    if args.eval_images:
        evaluation = Subset(evaluation, range(min(args.eval_images, len(evaluation))))
    records = evaluation.dataset.records if isinstance(evaluation, Subset) else evaluation.records
    calibration = calibration_pixels(data_split(arguments, "train", transform), args.calibration_images)
    batch = args.batch or THROUGHPUT_BATCH[device.type]
    images = [decode_rgb(records[i % len(records)].path) for i in range(batch)]
    wanted = _wanted_rows(args.rows, device)
    loader = DataLoader(evaluation, batch_size=batch, collate_fn=collate_detection)
    arch = hparams["net"].get("arch", "vgg16")
    _log(
        f"formats: {arch} SSD{module.image_size}, {len(evaluation)} {split} images, rows {', '.join(wanted)}"
    )
    machine = machine_info(device)
    if args.note:
        machine["note"] = args.note
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ssd_formats_") as scratch:
        work = Path(args.work_dir) if args.work_dir else Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        rows = build_rows(module, checkpoint, wanted, calibration, work, device)
        _log("formats: timing")
        measure_rows(
            rows, images[0], images, args.warmup or 3, args.repeats or 30, args.throughput_repeats, device
        )
        _log("formats: mAP")
        evaluate_rows(rows, loader, module.class_names)
    machine["load_average_end"] = load_average()
    machine["wall_time_s"] = round(time.perf_counter() - started, 1)
    title = (
        f"{arch} SSD{module.image_size} ({checkpoint.name}), {machine['device_name']} ({device}), "
        f"{len(evaluation)} {split} images"
    )
    table = markdown_table(rows, title)
    judged = goals(rows, arch)
    print(table)
    for goal in judged:
        print(f"goal: {goal['goal']} ({goal['row']}): {'MET' if goal['met'] else 'MISSED'}")
    if not args.no_save:
        document = {
            "suite": "ssd_lightning.benchmark",
            "command": "formats",
            "argv": list(sys.argv[1:]),
            "created_utc": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
            "machine": machine,
            "checkpoint": str(checkpoint),
            "arch": arch,
            "image_size": module.image_size,
            "split": split,
            "calibration_images": len(calibration),
            "rows": [
                {
                    "name": r.name,
                    "runtime": r.detector.runtime,
                    "precision": r.detector.info.precision,
                    "file_mib": r.file_mib,
                    "note": r.note,
                    **r.figures,
                }
                for r in rows
            ],
            "goals": judged,
        }
        args.out_dir.mkdir(parents=True, exist_ok=True)
        path = args.out_dir / f"{document['created_utc']}_formats_{device_tag(machine)}.json"
        path.write_text(json.dumps(document, indent=2, default=str) + "\n")
        path.with_suffix(".md").write_text(table + "\n")
        print(f"wrote {path} and {path.with_suffix('.md').name}")
    return 0


def _parse_overrides(items: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """`ckpt_path=`, `split=`, `trust_checkpoint=` are ours; the rest are Hydra overrides of the data."""
    ours, rest = {}, []
    for item in items:
        key, _, value = item.partition("=")
        if not value:
            raise SystemExit(f"formats: {item!r} is not key=value (e.g. ckpt_path=last.ckpt dataset=voc)")
        if key in ("ckpt_path", "split", "trust_checkpoint"):
            ours[key] = value
        else:
            rest.append(item)
    return ours, rest


def _data_arguments(module: SSDLitModule, overrides: list[str]) -> dict[str, Any]:
    """The DataModule arguments of the evaluation data: the checkpoint's training data, or conf/eval.yaml's
    `dataset` with the Hydra overrides given (dataset=voc dataset.root=...)."""
    if not overrides:
        if not module.datamodule_arguments:
            raise SystemExit("the checkpoint does not record its data: pass dataset=... (as for eval.py)")
        return dict(module.datamodule_arguments)
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ssd_lightning.conf_dir import HYDRA_VERSION_BASE, config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base=HYDRA_VERSION_BASE):
        cfg = compose("eval", overrides=["ckpt_path=unused", *overrides])
    node = OmegaConf.to_container(cfg.dataset, resolve=True)
    hparams = module.hparams
    return {
        **node,
        "image_size": module.image_size,
        "mean": list(hparams["pixel_mean"]),
        "std": list(hparams["pixel_std"]),
    }


def _wanted_rows(names: Sequence[str] | None, device: torch.device) -> list[str]:
    """The rows asked for (default: every one this machine can run)."""
    if names:
        unknown = sorted(set(names) - set(ROWS))
        if unknown:
            raise SystemExit(f"--rows {unknown}: choose from {', '.join(ROWS)}")
        return [name for name in ROWS if name in names]
    wanted = ["pytorch", "torchvision", "torchscript"]
    if installed("onnxruntime") and (device.type == "cpu" or _onnxruntime_gpu()):
        wanted += ["onnxruntime", "onnxruntime-int8"]
    if installed("openvino") and device.type == "cpu":
        wanted += ["openvino", "openvino-int8"] + (["openvino-bf16"] if _openvino_bf16() else [])
        wanted += ["openvino-int8-nncf"] if installed("nncf") else []
    if installed("tensorrt") and device.type == "cuda":
        wanted += ["tensorrt-fp16", "tensorrt-int8"]
    return [name for name in ROWS if name in wanted]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def add_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    """The `formats` subcommand of `python -m ssd_lightning.benchmark`."""
    parser = commands.add_parser(
        "formats",
        parents=[common],
        help="one checkpoint in every deployment format: size, latency, throughput, mAP",
    )
    parser.add_argument("--batch", type=int, help="throughput batch (default 8 on CPU, 32 on CUDA)")
    parser.add_argument("--throughput-repeats", type=int, default=5, help="timed batches per row")
    parser.add_argument("--calibration-images", type=int, default=128, help="INT8: training images")
    parser.add_argument("--eval-images", type=int, help="evaluate on the first N images of the split only")
    parser.add_argument("--rows", nargs="+", help=f"rows to measure (default: all this machine runs): {ROWS}")
    parser.add_argument("--work-dir", type=Path, help="keep the exported files here (default: a temp folder)")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="ckpt_path=<checkpoint> (required), split=test|val, and Hydra overrides of the data "
        "(dataset=voc dataset.root=...; default: the checkpoint's own training data)",
    )
