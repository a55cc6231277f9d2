"""`python train.py [overrides]`: see ssd_lightning/cli/train.py and conf/train.yaml."""

from ssd_lightning.cli.train import main

if __name__ == "__main__":
    main()
