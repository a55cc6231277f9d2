"""`python eval.py [overrides]`: see ssd_lightning/cli/eval.py and conf/eval.yaml."""

from ssd_lightning.cli.eval import main

if __name__ == "__main__":
    main()
