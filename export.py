"""`python export.py ckpt_path=... [overrides]`: see ssd_lightning/cli/export.py and conf/export.yaml."""

from ssd_lightning.cli.export import main

if __name__ == "__main__":
    main()
