"""One recipe-search run in this checkout: `python train.py <overrides>`, then the seed-7 evaluation.

    python experiments/first_run/search.py NAME [overrides...]

Trains into outputs/first_run_search/NAME with the throughput callback, evaluates the checkpoint the
test pass used (the best by val/map, else the last) on 200 fresh images of seed 7, and appends one JSON
line (overrides, wall time, load, throughput, test and seed-7 mAP) to experiments/first_run/search.jsonl.
The data caches live under $SSD_DATA_CACHE (default /tmp/first_run_cache), one folder per num_train, so
the shared data_cache/ of the checkout is not touched.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("SSD_DATA_CACHE", "/tmp/first_run_cache"))
THROUGHPUT = "+callbacks.throughput._target_=experiments.first_run.throughput.Throughput"


def _value(overrides: list[str], key: str, default: str) -> str:
    for item in overrides:
        if item.lstrip("+").split("=", 1)[0] == key:
            return item.split("=", 1)[1]
    return default


def main() -> None:
    name, overrides = sys.argv[1], sys.argv[2:]
    out = ROOT / "outputs" / "first_run_search" / name
    num_train = _value(overrides, "dataset.shapes.num_train", "600")
    online = _value(overrides, "dataset.shapes.online", "false").lower() == "true"
    root = CACHE / ("shapes_online" if online else f"shapes_train{num_train}")
    load_before = os.getloadavg()
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    command = [sys.executable, "train.py", f"dataset.root={root}", f"hydra.run.dir={out}", THROUGHPUT]
    command += overrides
    out.mkdir(parents=True, exist_ok=True)
    # passive OpenMP waits: spinning threads make a shared, oversubscribed CPU many times slower
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    with open(out / "stdout.txt", "w") as log:  # streamed, to follow a run
        train = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    load_after = os.getloadavg()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of train.py and its loader workers: the work, whatever the machine's load
    cpu_s = sum(getattr(usage, f) - getattr(usage_before, f) for f in ("ru_utime", "ru_stime"))
    if train.returncode != 0:
        raise SystemExit(f"train.py failed ({train.returncode}), see {out / 'stdout.txt'}")
    metrics = json.loads((out / "metrics.json").read_text())
    throughput = json.loads((out / "throughput.json").read_text())
    folder = out / "checkpoints"
    checkpoint = (sorted(folder.glob("best-*.ckpt")) or [folder / "last.ckpt"])[-1]
    fresh = {}
    for seed in (7,):
        result = out / f"seed{seed}.json"
        subprocess.run(
            [sys.executable, "eval.py", f"ckpt_path={checkpoint}", f"dataset.root={CACHE / f'seed{seed}'}",
             f"dataset.shapes.seed={seed}", "dataset.shapes.num_test=200", "dataset.shapes.num_train=1",
             "dataset.shapes.num_val=1", f"output_json={result}", f"hydra.run.dir={out / f'eval{seed}'}"],
            cwd=ROOT, env=env, check=True, capture_output=True,
        )  # fmt: skip
        fresh[seed] = json.loads(result.read_text())
    record = {
        "name": name,
        "overrides": overrides,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu_s, 1),
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in load_after],
        "test_voc07": round(metrics.get("test/map_voc07", float("nan")), 4),
        "val_voc07": round(metrics.get("val/map_voc07", float("nan")), 4),
        **{f"seed{s}_voc07": round(r["map_voc07"], 4) for s, r in fresh.items()},
        "images_per_s": throughput["images_per_s"],
        "train_s": throughput["train_s"],
        "val_s": throughput["val_s"],
        "test_s": throughput["test_s"],
        "train_images": throughput["train_images"],
        "steps": throughput["steps"],
    }
    with open(HERE / "search.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
