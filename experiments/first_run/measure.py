"""Measure the built-in first run, `python train.py`, as a new user gets it.

    python experiments/first_run/measure.py [--runs 3] [--seeds 7 11] [-- extra train.py overrides]

Each run makes a fresh `git clone` of the current HEAD of this checkout into a temporary folder (so
uncommitted changes are not measured), points SSD_DATA_CACHE at a new empty folder (so the data are
generated inside the timed run, as on a first start), runs `python train.py [overrides]` there with this
interpreter (the checkout's venv) and times its wall clock. It then reads the final test mAP from the
run's metrics.json, evaluates the checkpoint the test pass used on 200 freshly generated test images of
each of `--seeds` (another generator seed: images the recipe was never tuned on), and writes one JSON
record per run into experiments/first_run/ (commit, date, machine, load average before/after, wall time,
training throughput, test and fresh-seed mAP with per-class AP).

Extra overrides after `--` are appended to `python train.py` (to measure a recipe that is not in conf/
yet). The throughput callback (experiments/first_run/throughput.py) is added unless --no-throughput;
it only reads the clock per batch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
THROUGHPUT = "+callbacks.throughput._target_=experiments.first_run.throughput.Throughput"


def _git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch  # the venv's torch, for its version and thread count

    return {
        "nproc": int(subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() or 0),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _run_dir(clone: Path) -> Path:
    runs = sorted((clone / "outputs" / "train" / "runs").glob("*/*"))  # runs/<run_name>/<time>
    if len(runs) != 1:
        raise RuntimeError(f"expected one run folder under {clone}/outputs/train/runs, found {runs}")
    return runs[0]


def _checkpoint(run: Path) -> Path:
    """The checkpoint the test pass used: the best by val/map, else the last one."""
    best = sorted((run / "checkpoints").glob("best-*.ckpt"))
    return best[-1] if best else run / "checkpoints" / "last.ckpt"


def _evaluate(clone: Path, checkpoint: Path, seed: int, cache: Path, out: Path) -> dict[str, Any]:
    result = out / f"seed{seed}.json"
    command = [
        sys.executable, "eval.py", f"ckpt_path={checkpoint}", f"dataset.root={cache / f'seed{seed}'}",
        f"dataset.shapes.seed={seed}", "dataset.shapes.num_test=200", "dataset.shapes.num_train=1",
        "dataset.shapes.num_val=1", f"output_json={result}", f"hydra.run.dir={out / f'eval_seed{seed}'}",
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, cwd=clone, check=True, capture_output=True, text=True)
    record = json.loads(result.read_text())
    return {
        "images": record["num_images"],
        "map_voc07": round(record["map_voc07"], 4),
        "map_voc12": round(record["map_voc12"], 4),
        "map_coco": round(record["map"], 4),
        "per_class_ap_voc07": {k: round(v, 4) for k, v in record["per_class_ap_voc07"].items()},
        "eval_s": round(time.perf_counter() - start, 1),
    }


def _generation_s(log_file: Path) -> float:
    """Seconds the shapes data took to generate, from the run's log ("generated N images in X s")."""
    for line in log_file.read_text().splitlines():
        if "generated" in line and " images in " in line:
            return float(line.rsplit(" in ", 1)[1].split()[0])
    return 0.0


def _phases(timing: dict[str, Any], log_file: Path, started_at: float, ended_at: float) -> dict[str, float]:
    """Where the run's wall time went: start-up (imports, config, model), data generation, training steps,
    validation, the rest of fit (checkpoints, loops), the test pass, and what follows it (the detections
    picture, metrics.json, exit)."""
    clock = timing["clock"]
    generation = _generation_s(log_file)
    fit_end = clock.get("fit_end", clock["fit_start"])
    phases = {
        "start_up": clock["fit_start"] - started_at - generation,
        "data_generation": generation,
        "train_steps": timing["train_s"],
        "validation": timing["val_s"],
        "fit_other": fit_end - clock["fit_start"] - timing["train_s"] - timing["val_s"],
        "test": clock.get("test_end", fit_end) - fit_end,
        "after_test": ended_at - clock.get("test_end", fit_end),
    }
    return {name: round(seconds, 1) for name, seconds in phases.items()}


def measure_once(overrides: list[str], seeds: list[int], throughput: bool, keep: bool) -> dict[str, Any]:
    commit = _git("rev-parse", "HEAD")
    scratch = Path(tempfile.mkdtemp(prefix="first_run_"))
    try:
        clone = scratch / "ssd_lightning"
        _git("clone", "--quiet", str(REPO), str(clone))
        _git("checkout", "--quiet", commit, cwd=clone)
        cache = scratch / "data_cache"  # empty: train.py generates the data inside the timed run
        env = {**os.environ, "SSD_DATA_CACHE": str(cache)}
        command = [sys.executable, "train.py", *([THROUGHPUT] if throughput else []), *overrides]
        load_before = _load()
        start, started_at = time.perf_counter(), time.time()
        train = subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True)
        wall, ended_at = time.perf_counter() - start, time.time()
        load_after = _load()
        if train.returncode != 0:
            raise RuntimeError(f"train.py failed ({train.returncode}):\n{train.stderr[-4000:]}")
        run = _run_dir(clone)
        metrics = json.loads((run / "metrics.json").read_text())
        record: dict[str, Any] = {
            "commit": commit,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "python train.py " + " ".join(overrides),
            "machine": _machine(),
            "load_before": load_before,
            "load_after": load_after,
            "wall_s": round(wall, 1),
            "test": {
                "map_voc07": round(metrics["test/map_voc07"], 4),
                "map_voc12": round(metrics.get("test/map_voc12", float("nan")), 4),
                "map_coco": round(metrics.get("test/map", float("nan")), 4),
                "per_class_ap_voc07": {
                    k.rsplit("/", 1)[-1]: round(v, 4)
                    for k, v in metrics.items()
                    if k.startswith("test/ap_voc07/")
                },
            },
            "val_map_voc07": round(metrics.get("val/map_voc07", float("nan")), 4),
            "steps": metrics.get("step"),
        }
        if throughput and (run / "throughput.json").is_file():
            timing = json.loads((run / "throughput.json").read_text())
            record["throughput"] = {k: v for k, v in timing.items() if k not in ("epochs", "clock")}
            record["phases_s"] = _phases(timing, run / "train.log", started_at, ended_at)
        checkpoint = _checkpoint(run)
        record["checkpoint"] = checkpoint.name
        record["fresh_seeds"] = {
            str(seed): _evaluate(clone, checkpoint, seed, scratch / "eval_cache", scratch / "eval")
            for seed in seeds
        }
        return record
    finally:
        if keep:
            print(f"kept {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    overrides: list[str] = []
    if "--" in argv:
        overrides, argv = argv[argv.index("--") + 1 :], argv[: argv.index("--")]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="how many runs, one after the other")
    parser.add_argument("--seeds", type=int, nargs="*", default=[7], help="fresh-test generator seeds")
    parser.add_argument("--no-throughput", action="store_true", help="leave the timing callback out")
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone and data")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the JSON records")
    args = parser.parse_args(argv)
    for index in range(args.runs):
        record = measure_once(overrides, args.seeds, not args.no_throughput, args.keep)
        stamp = record["date"].replace(":", "").replace("-", "")[:15]
        path = args.out / f"measure_{stamp}_{record['commit'][:7]}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        fresh = ", ".join(f"seed {s} {r['map_voc07']:.3f}" for s, r in record["fresh_seeds"].items())
        print(
            f"run {index + 1}/{args.runs}: test VOC07 {record['test']['map_voc07']:.3f}, {fresh}, "
            f"wall {record['wall_s']:.0f} s, load {record['load_before']} -> {record['load_after']}  ({path})"
        )


if __name__ == "__main__":
    main()
