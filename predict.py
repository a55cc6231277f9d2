"""`python predict.py [overrides]`: see ssd_lightning/cli/predict.py and conf/predict.yaml."""

from ssd_lightning.cli.predict import main

if __name__ == "__main__":
    main()
