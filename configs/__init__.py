"""The built-in experiment configs, installed as `sb_finetune.configs`: `--config NAME` reads `NAME.yaml` from here."""
