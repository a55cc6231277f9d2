"""`python -m ssd_lightning.benchmark <command> [options]`; see experiments/benchmarks/README.md."""

from ssd_lightning.benchmark.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
