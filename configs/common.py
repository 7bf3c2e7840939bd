"""Shared pieces of the training configs: argument parsing and the full field list with its presets.

`get_config("preset=tiny")` style arguments (big_vision's `parse_arg`): comma-separated key=value pairs.
Presets:
  tiny   (default) the built-in Shapes-VQA dataset, tiny SigLIP / OpenELM from random weights, CPU, fp32.
         Because nothing is pretrained, both stages train the towers too (the paper freezes them); stage 0
         (`tower.steps`) pretrains the vision tower first instead, on the stage-1 captions.
  paper  the paper's sizes, data paths, hyperparameters and bf16 compute; needs real checkpoints and data.
"""

from __future__ import annotations

import ml_collections

PRESETS = ("tiny", "paper")
STAGES = ("pretrain", "finetune")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """'a=1,b=x' -> ConfigDict(a=1, b='x') over `defaults` (values keep the defaults' types)."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        if "=" not in item:
            raise ValueError(f"config argument {item!r} must look like key=value")
        key, value = item.split("=", 1)
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; expected one of {sorted(defaults)}")
        out[key] = type(defaults[key])(value) if not isinstance(defaults[key], bool) else value == "true"
    return out


def training_config(stage: str, preset: str) -> ml_collections.ConfigDict:
    """Every field the trainer reads, for one stage and preset (each field commented)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    tiny = preset == "tiny"
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.stage = stage
    c.seed = 0
    c.init_from = ""  # finetune: a stage-1 workdir; empty = run stage 1 first (into workdir/pretrain)

    c.data = ml_collections.ConfigDict()
    # "shapes" (built-in, rendered), "digits" (built-in: scikit-learn's handwritten digits, qtl_jax.data.digits)
    # or "llava" (annotation file + images)
    c.data.dataset = "shapes" if tiny else "llava"
    c.data.data_dir = "~/tensorflow_datasets"  # where tfds builders write their array_record files
    c.data.shapes_config = "tiny"  # Shapes-VQA variant: tiny | smoke (tests) | paper_size
    c.data.annotation_file = "" if tiny else (
        "data/blip_laion_cc_sbu_558k.json" if stage == "pretrain" else "data/llava_v1_5_mix665k.json")
    # The folder the annotation file's image paths are relative to (the paper's stages use different ones).
    c.data.image_root = "" if tiny else ("data/llava_pretrain/images" if stage == "pretrain" else "data/images")
    c.data.tokenizer = ""  # tokenizer folder; empty = the built-in dataset's (paper: the Llama-2 tokenizer)
    c.data.template = "pretrain" if stage == "pretrain" else "llama"
    c.data.max_length = 512 if tiny else 2048  # text tokens + image rows
    c.data.buckets = (32, 48, 64) if tiny else (64, 128, 256, 512, 1024, 1344)  # padded text lengths
    c.data.worker_count = 0
    # "fail" stops at the first bad sample, naming it; "skip" leaves it out and reports it (summary.json).
    c.data.on_bad_sample = "fail"
    # Question/answer files evaluated at the end of stage 2: "NAME=FILE[,NAME=FILE...]", LLaVA format with the
    # reference answer as the last turn; answers and scores go to WORKDIR/finetune/eval/.
    c.data.eval_files = ""
    c.data.eval_image_root = ""  # their image paths' folder; empty = data.image_root, else each file's folder

    c.model = ml_collections.ConfigDict()
    c.model.size = preset  # "tiny" or "paper"
    c.model.dtype = "float32" if tiny else "bfloat16"  # compute dtype
    # "pretrained": SigLIP and OpenELM from the checkpoint folders below (the paper); "random": random weights,
    # no folder read (tiny; also how the paper-size path runs without checkpoints, e.g. for benchmarks).
    c.model.init = "random" if tiny else "pretrained"
    c.model.siglip_checkpoint = "" if tiny else "checkpoints/siglip-so400m-patch14-384"
    c.model.openelm_checkpoint = "" if tiny else "checkpoints/OpenELM-270M-Instruct"
    c.model.tinyllava_checkpoint = ""  # a full TinyLLaVA checkpoint instead of the two above
    # What each SigLIP / OpenELM layer keeps for the backward pass: none | full | dots | dots_no_batch
    # (`qtl_jax.layers.REMAT_POLICIES`). Changes memory and speed, not the result.
    c.model.remat = "none"
    # Which attention code runs: auto (XLA's, cuDNN flash on a GPU in bf16, blocked on a CPU for long sequences)
    # | xla | blocked (`qtl_jax.layers.attention`). Changes speed, not the result (to float rounding).
    c.model.attention = "auto"
    # SigLIP's layers as one nn.scan over stacked parameters (compile time independent of depth) instead of an
    # unrolled loop; the parameter layout differs, so a run resumes only with the value it started with.
    # OpenELM's layers always unroll: layer-wise scaling gives each its own shapes.
    c.model.scan_layers = False
    # With bf16 compute: the frozen parts' kernels and embeddings converted to bf16 once, not in every step
    # (`SplitTrainer`'s cast_frozen_once; the same result bit for bit). Costs half the frozen parts' float32
    # bytes again (the float32 originals stay for checkpoints): set False where that memory is short.
    c.model.cast_frozen_once = True

    c.compressor = ml_collections.ConfigDict()
    c.compressor.image = "rd_fsq"  # rd_fsq | fsq_tanh | nf | none_fp32 | none_bf16 | none_fp16
    c.compressor.text = "rd_fsq"
    c.compressor.bits = 2
    c.compressor.text_transport = "quantized_embeddings"  # or token_ids
    c.compressor.commitment_weight = 0.25  # alpha: the weight of RD-FSQ's loss term per modality
    # RD-FSQ's loss term: "distortion" (ours: squared error of scaler + quantizer with the clipping error, which
    # saturation cannot satisfy) or "cosine" (the paper's commitment, which saturation satisfies: code collapse;
    # see qtl_jax.compress.rd_fsq and README "Code collapse").
    c.compressor.commitment = "distortion"
    # RD-FSQ: weight of a code-usage (entropy) term added to the loss term (rd_fsq.usage_loss; 0 = off).
    c.compressor.usage_weight = 0.0
    # RD-FSQ's statistics: "tensor" (the paper: one mean and 3-sigma range for every channel of a modality) or
    # "channel" (one per channel: a channel's offset cannot take the others' range). Measured on Shapes-VQA:
    # "channel" keeps the codes apart without the client delay, but with it "tensor" learns better (0.957 vs
    # 0.911, seed 0; README "Code collapse").
    c.compressor.scale = "tensor"

    c.split = ml_collections.ConfigDict()
    # single | meshes | remote (this process is the client; the server runs `python -m qtl_jax.split.serve`)
    c.split.mode = "meshes"
    c.split.client_mesh = (1, 1, 1)  # (data, fsdp, tensor) devices of the client
    c.split.server_mesh = (1, 1, 1)
    c.split.downlink = "fp32"  # fp32 | bf16 | nf8 | nf4
    # remote mode (the client's side; none of these changes what is trained, so a resumed run may change them):
    c.split.server = ""  # the server's HOST:PORT
    c.split.client_id = "client0"  # this client's id in the server's tokens file
    c.split.token_file = ""  # the file holding this client's bearer token (never the token itself in a config)
    c.split.tls_ca = ""  # the CA certificate that signed the server's certificate
    c.split.tls_cert = ""  # this client's certificate and key, when the server asks for mutual TLS
    c.split.tls_key = ""
    c.split.insecure = False  # plaintext gRPC: only on a loopback address (a local try-out)
    c.split.deadline_s = 300.0  # the deadline of one call (a step, a session)
    c.split.wait_s = 600.0  # the longest the client waits for an unreachable server (e.g. while it restarts)

    c.optim = ml_collections.ConfigDict()
    c.optim.batch_size = 16 if tiny else (32 if stage == "pretrain" else 8)  # per step, before accumulation
    c.optim.accum_steps = 1 if tiny else 2
    # tiny: 3e-4 for both stages; from random weights 1e-3 collapses the LM onto the answer prior for good.
    c.optim.lr = (3e-4 if tiny else 5e-4) if stage == "pretrain" else (3e-4 if tiny else 2e-5)
    c.optim.weight_decay = 0.1 if stage == "pretrain" else 0.0  # not applied to biases and norms
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
    c.optim.warmup_ratio = 0.02 if stage == "pretrain" else 0.03
    # The client's lr stays 0 for this fraction of the stage's steps, then warms up to lr x client_lr_scale
    # (the paper: 0 and 1). tiny, whose client starts from random weights: the server first learns to read the
    # client's initial codes, then the client moves slowly. Trained together at one lr from the first step, the
    # 2-bit codes collapse (every object gets the same code; colour and shape never reach the server), with a
    # stage-0 tower too (README "Code collapse").
    c.optim.client_delay_ratio = 0.2 if tiny else 0.0
    c.optim.client_lr_scale = 0.1 if tiny else 1.0
    c.optim.grad_clip = 1.0
    # tiny: ~940 caption steps (3 x 5k captions) teach the tower colour, shape and place; 2 x 20k QA follow.
    c.optim.epochs = (3 if stage == "pretrain" else 2) if tiny else 1
    # At least this many optimizer steps, in as many passes over the data as it takes: the budget follows the
    # data (tiny: Shapes-VQA's 3 caption epochs are 937 steps, its QA set takes 4 passes to 5000 steps; a small
    # dataset gets more passes). 2500 QA steps left the LM still learning: its loss still falling, and on
    # Shapes-VQA fp16 validation accuracy 0.756 / 0.869 / 0.922 over seeds 0-2; 5000 gave 0.965 / 0.986 / 0.950.
    c.optim.min_steps = (930 if stage == "pretrain" else 5000) if tiny else 0
    c.optim.max_steps = 0  # > 0 caps the number of optimizer steps (quick runs, tests)
    # What trains. The paper freezes the pretrained towers; tiny starts from random weights, so it trains
    # them too in both stages (with stage 0, leave vision_tower out to freeze the pretrained tower).
    c.optim.trainable = (("vision_tower", "connector", "compressors", "token_embeddings", "language_model")
                         if tiny else (("connector", "compressors") if stage == "pretrain"
                                       else ("connector", "compressors", "token_embeddings", "language_model")))

    # Stage 0 (`qtl_jax.tower`): before stage 1, the client pretrains its vision tower on the stage-1
    # image-caption pairs with SigLIP's sigmoid loss, locally (nothing crosses the network); stage 1 then starts
    # from that tower. The paper's tower is pretrained already (SigLIP so400m): 0 steps = no stage 0. Shared by
    # both stages' configs (set once, as --config.tower.steps=...).
    c.tower = ml_collections.ConfigDict()
    c.tower.steps = 0  # tiny with stage 0 (README "Stage 0"): 1000, and vision_tower out of optim.trainable
    c.tower.batch_size = 64  # image-caption pairs per step (every pair of the batch is a training example)
    c.tower.lr = 1e-3
    c.tower.warmup_ratio = 0.05
    c.tower.weight_decay = 1e-4  # matrices only
    c.tower.text_depth = 2  # layers of the text tower (dropped after stage 0)
    c.tower.embed_dim = 128  # the shared image-text embedding
    c.tower.max_text_len = 64  # caption tokens kept

    c.checkpoint_every = 200  # steps between checkpoints (one is always written at the end)
    c.stop_after = 0  # > 0: stop after this many steps, as if interrupted; rerunning resumes
    c.log_every = 10
    c.eval = ml_collections.ConfigDict()
    c.eval.max_new_tokens = 4 if tiny else 128
    c.eval.batch_size = 32 if tiny else 1
    c.eval.max_examples = 0  # 0 = the whole split
    return c
