"""Stage 2 (finetune): question/answer data, template `llama`; runs stage 1 first unless `init_from` is set.

    python train.py --config configs/finetune.py --workdir /tmp/qtl          # tiny preset, CPU
    python train.py --config configs/finetune.py:preset=paper --workdir ...  # the paper's recipe
"""

from configs.common import parse_arg, training_config


def get_config(arg: str | None = None):
    args = parse_arg(arg, preset="tiny")
    config = training_config("finetune", args.preset)
    # Stage 1, run first when init_from is empty. Its data, model, compressor and split sections follow this
    # config's (set them once, on the command line of the whole recipe); the rest is its own.
    config.stage1 = training_config("pretrain", args.preset)
    return config
