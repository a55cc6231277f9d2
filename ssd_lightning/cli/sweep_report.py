"""`python -m ssd_lightning.cli.sweep_report <multirun folder>`: the sweep's jobs sorted by best validation
value, written as sweep_report.csv and sweep_report.md in the folder (a sweep writes them when it ends
too)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ssd_lightning.sweeps.table import write_report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssd_lightning.cli.sweep_report", description=__doc__)
    parser.add_argument("sweep_dir", help="a multirun folder, e.g. outputs/train/multiruns/<time>")
    args = parser.parse_args(argv)
    try:
        written = write_report(args.sweep_dir)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(written.markdown_path.read_text(), end="")
    print(f"\nWritten: {written.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
