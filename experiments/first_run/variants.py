"""Training throughput of the first run's settings, one variant after another on the same machine.

    python experiments/first_run/variants.py [--epochs 1] [--repeat 2]

Each variant is `python train.py` with the default recipe (its cached data generated once, before any
timing) for `--epochs` epochs without validation or test, with the throughput callback; what differs is the
DataLoader workers, torch's intra-op threads, OpenMP's wait policy, the optimiser's fused kernel. Variants
run in turn, `--repeat` rounds, so that a change of load falls on all of them. Prints one line per variant
(median images/s of its rounds) and appends the records to `experiments/first_run/variants.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
THROUGHPUT = "+callbacks.throughput._target_=experiments.first_run.throughput.Throughput"

# name -> (train.py overrides, environment)
VARIANTS: dict[str, tuple[list[str], dict[str, str]]] = {
    "default (2 workers)": ([], {}),
    "0 workers": (["dataset.num_workers=0"], {}),
    "1 worker": (["dataset.num_workers=1"], {}),
    "2 workers, OMP passive": ([], {"OMP_WAIT_POLICY": "PASSIVE"}),
    "1 worker, OMP passive": (["dataset.num_workers=1"], {"OMP_WAIT_POLICY": "PASSIVE"}),
    "0 workers, fused AdamW": (["dataset.num_workers=0", "+optimizer.fused=true"], {}),
}


def run(name: str, overrides: list[str], env: dict[str, str], epochs: int, cache: Path, out: Path) -> dict:
    folder = out / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    command = [
        sys.executable, "train.py", THROUGHPUT, f"trainer.max_epochs={epochs}",
        "trainer.check_val_every_n_epoch=1000", "test=false", "callbacks.last_checkpoint=null",
        f"hydra.run.dir={folder}", *overrides,
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env={**os.environ, "SSD_DATA_CACHE": str(cache), **env}, check=True,
                   capture_output=True)  # fmt: skip
    record = json.loads((folder / "throughput.json").read_text())
    return {"variant": name, "wall_s": round(time.perf_counter() - start, 1), **record}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    args = parser.parse_args()
    names = args.only or list(VARIANTS)
    scratch = Path(tempfile.mkdtemp(prefix="first_run_variants_"))
    cache = scratch / "cache"
    subprocess.run(  # the checker generates the data with the run's settings, outside any timing
        [sys.executable, "-m", "ssd_lightning.cli.check"],
        cwd=ROOT, env={**os.environ, "SSD_DATA_CACHE": str(cache)}, check=True, capture_output=True,
    )  # fmt: skip
    results: dict[str, list[dict]] = {name: [] for name in names}
    for round_ in range(args.repeat):
        for name in names:
            overrides, env = VARIANTS[name]
            results[name].append(run(name, overrides, env, args.epochs, cache, scratch / f"r{round_}"))
    with open(HERE / "variants.jsonl", "a") as stream:
        for name, records in results.items():
            rates = [r["images_per_s"] for r in records]
            line = {"variant": name, "images_per_s": rates, "load": [r["load_at_fit_start"] for r in records]}
            stream.write(json.dumps(line) + "\n")
            print(f"{name:28s} {statistics.median(rates):6.1f} img/s  (rounds: {rates})")


if __name__ == "__main__":
    main()
