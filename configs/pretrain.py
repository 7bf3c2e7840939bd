"""Stage 1 (pretrain): captions, template `pretrain`. `--config configs/pretrain.py:preset=paper`."""

from configs.common import parse_arg, training_config


def get_config(arg: str | None = None):
    args = parse_arg(arg, preset="tiny")
    return training_config("pretrain", args.preset)
