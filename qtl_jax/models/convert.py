"""Hugging Face checkpoints <-> Flax parameters, both ways (SPEC §2).

Reads local folders only (nothing is downloaded):
  * SigLIP: `google/siglip-so400m-patch14-384` layout, keys with or without the `vision_model.` prefix
    (transformers 5.x saves `SiglipVisionModel` without it); a full `SiglipModel` (with `text_model.*`) too.
  * OpenELM: `apple/OpenELM-270M(-Instruct)` layout (`transformer.*`), or without the prefix (the
    openelm-pytorch package); sizes from its `config.json`.
  * TinyLLaVA: a full checkpoint (`language_model.`, `vision_tower._vision_tower.`, `connector._connector.`)
    or a pretrain-stage folder with `language_model/`, `vision_tower/`, `connector/` subfolders holding
    `pytorch_model.bin` (needs torch) or safetensors.
Weights come from `model.safetensors`, a sharded `model.safetensors.index.json`, or `pytorch_model.bin`.

And writes Flax parameters back as `model.safetensors` + `config.json` that transformers (SigLIP) and the
OpenELM remote code load. Every Linear weight is transposed (torch [out, in] -> Flax kernel [in, out]), the
patch convolution goes OIHW -> HWIO, norms and embeddings are copied. A checkpoint whose keys do not match
the model raises one `ValueError` listing every missing, unexpected and mis-shaped key.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from qtl_jax import files
from qtl_jax.models.openelm import OpenELMConfig
from qtl_jax.models.siglip import SiglipConfig

Array = Any
# (flax path, hf key, hf->flax transform, flax->hf transform)
Entry = tuple[tuple[str, ...], str, Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]

_copy = (lambda w: w, lambda w: w)
_linear = (lambda w: w.T, lambda w: w.T)
_conv = (lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1))
SIGLIP_PREFIXES = ("vision_model.", "")
EXPORT_NOTE = "qtl_jax.json"  # what export_tinyllava writes beside the Hugging Face folders
COMPRESSORS_FILE = "compressors.safetensors"
CLIENT_EMBEDDINGS_FILE = "client_token_embeddings.safetensors"
OPENELM_PREFIXES = ("transformer.", "")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names the folder and every offending key."""


# ------------------------------------------------------------------------------------------- key tables
def siglip_entries(config: SiglipConfig) -> list[Entry]:
    """Flax path <-> HF key (without prefix) for the layers the tower builds."""
    entries: list[Entry] = [
        (("embeddings", "patch_embedding", "kernel"), "embeddings.patch_embedding.weight", *_conv),
        (("embeddings", "patch_embedding", "bias"), "embeddings.patch_embedding.bias", *_copy),
        (("embeddings", "position_embedding", "embedding"), "embeddings.position_embedding.weight", *_copy),
    ]
    for i in range(config.layers_used):
        flax, hf = ("encoder", f"layers_{i}"), f"encoder.layers.{i}."
        for norm in ("layer_norm1", "layer_norm2"):
            entries.append(((*flax, norm, "scale"), f"{hf}{norm}.weight", *_copy))
            entries.append(((*flax, norm, "bias"), f"{hf}{norm}.bias", *_copy))
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            entries.append(((*flax, "self_attn", proj, "kernel"), f"{hf}self_attn.{proj}.weight", *_linear))
            entries.append(((*flax, "self_attn", proj, "bias"), f"{hf}self_attn.{proj}.bias", *_copy))
        for fc in ("fc1", "fc2"):
            entries.append(((*flax, fc, "kernel"), f"{hf}mlp.{fc}.weight", *_linear))
            entries.append(((*flax, fc, "bias"), f"{hf}mlp.{fc}.bias", *_copy))
    return entries


def openelm_entries(config: OpenELMConfig) -> list[Entry]:
    entries: list[Entry] = [
        (("token_embeddings", "embedding"), "token_embeddings.weight", *_copy),
        (("norm", "weight"), "norm.weight", *_copy),
    ]
    for n in range(config.num_transformer_layers):
        flax, hf = (f"layers_{n}",), f"layers.{n}."
        entries += [
            ((*flax, "attn_norm", "weight"), f"{hf}attn_norm.weight", *_copy),
            ((*flax, "ffn_norm", "weight"), f"{hf}ffn_norm.weight", *_copy),
            ((*flax, "attn", "qkv_proj", "kernel"), f"{hf}attn.qkv_proj.weight", *_linear),
            ((*flax, "attn", "q_norm", "weight"), f"{hf}attn.q_norm.weight", *_copy),
            ((*flax, "attn", "k_norm", "weight"), f"{hf}attn.k_norm.weight", *_copy),
            ((*flax, "attn", "out_proj", "kernel"), f"{hf}attn.out_proj.weight", *_linear),
            ((*flax, "ffn", "proj_1", "kernel"), f"{hf}ffn.proj_1.weight", *_linear),
            ((*flax, "ffn", "proj_2", "kernel"), f"{hf}ffn.proj_2.weight", *_linear),
        ]
    return entries


def connector_entries() -> list[Entry]:
    return [((f"linear_{i}", p), f"_connector.{i}.{'weight' if p == 'kernel' else 'bias'}",
             *(_linear if p == "kernel" else _copy)) for i in (0, 2) for p in ("kernel", "bias")]


# ------------------------------------------------------------------------------------------------ reading
def _check_dir(path: str) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder {path!r} does not exist or is not a folder")
    return path


def read_config(path: str) -> dict:
    """The folder's config.json as a dict; FileNotFoundError naming the folder when absent."""
    file = os.path.join(_check_dir(path), "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path!r} has no config.json (expected a Hugging Face model folder)")
    with open(file) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{file}: not valid JSON ({e})") from e


def read_weights(path: str) -> dict[str, np.ndarray]:
    """All tensors of a folder: model.safetensors, a sharded index, or pytorch_model.bin (torch needed)."""
    path = _check_dir(path)
    files = sorted(os.listdir(path))
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return {k: v for shard in shards for k, v in _read_safetensors(os.path.join(path, shard)).items()}
    safetensors_files = [f for f in files if f.endswith(".safetensors")]
    if safetensors_files:
        return {k: v for f in safetensors_files for k, v in _read_safetensors(os.path.join(path, f)).items()}
    if "pytorch_model.bin" in files:
        return _read_torch_bin(os.path.join(path, "pytorch_model.bin"))
    raise FileNotFoundError(
        f"{path!r} holds no weights: expected model.safetensors, model.safetensors.index.json or "
        f"pytorch_model.bin; found {files}"
    )


def _read_safetensors(file: str) -> dict[str, np.ndarray]:
    from safetensors.flax import load_file  # jax arrays: also reads bfloat16, which the numpy loader cannot

    try:
        return {k: np.asarray(v) for k, v in load_file(file).items()}
    except Exception as e:
        raise CheckpointError(f"{file}: cannot read safetensors ({e})") from e


def _read_torch_bin(file: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{file} is a PyTorch pickle: install torch to read it, or convert it to safetensors") from e
    state = torch.load(file, map_location="cpu", weights_only=True)
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}


def _strip_prefix(weights: dict[str, np.ndarray], prefixes: Iterable[str], probe: str) -> tuple[dict, str]:
    """Picks the prefix under which `probe` exists and strips it from every key that has it."""
    for prefix in prefixes:
        if prefix + probe in weights:
            if not prefix:
                return weights, prefix
            return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}, prefix
    return weights, ""


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
    for name in path:
        tree = tree[name]
    return tree


def _expected_shapes(module: nn.Module, *args) -> dict:
    return nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), *args)))["params"]


def import_params(
    weights: dict[str, np.ndarray], entries: list[Entry], shapes: dict, source: str, ignore: Callable[[str], bool]
) -> dict:
    """Builds a Flax param tree from HF tensors; one CheckpointError lists every missing/unexpected/mis-shaped key."""
    params, missing, misshaped = {}, [], []
    for path, key, to_flax, to_hf in entries:
        if key not in weights:
            missing.append(key)
            continue
        value = to_flax(np.asarray(weights[key]))
        want = tuple(_get(shapes, path).shape)
        if tuple(value.shape) != want:
            expected = tuple(to_hf(np.empty(want, np.float32)).shape)
            misshaped.append(f"{key}: checkpoint {tuple(np.shape(weights[key]))}, model expects {expected}")
            continue
        _set(params, path, value.astype(np.float32))  # bfloat16/float16 checkpoints load as float32 params
    used = {key for _, key, _, _ in entries}
    unexpected = sorted(k for k in weights if k not in used and not ignore(k))
    if missing or unexpected or misshaped:
        lines = [f"checkpoint {source} does not match the model:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                shown = "\n    ".join(keys[:40]) + (f"\n    ... and {len(keys) - 40} more" if len(keys) > 40 else "")
                lines.append(f"  {len(keys)} {title}:\n    {shown}")
        raise CheckpointError("\n".join(lines))
    return params


def export_tensors(params: dict, entries: list[Entry], prefix: str = "") -> dict[str, np.ndarray]:
    """Flax params -> {hf key: array}, the inverse of `import_params`."""
    params = nn.meta.unbox(params)
    return {prefix + key: np.ascontiguousarray(to_hf(np.asarray(_get(params, path))))
            for path, key, _, to_hf in entries}


def save_folder(path: str, tensors: dict[str, np.ndarray], config: dict) -> None:
    """Writes model.safetensors + config.json (each atomically)."""
    from safetensors.numpy import save_file

    with files.atomic_path(os.path.join(path, "model.safetensors")) as tmp:
        save_file(tensors, tmp, metadata={"format": "np"})
    files.write_json(os.path.join(path, "config.json"), config)


# ------------------------------------------------------------------------------------------------- SigLIP
def siglip_config_from_hf(hf: dict, source: str = "config.json", **overrides) -> SiglipConfig:
    """SigLIP sizes from a `SiglipVisionModel` or `SiglipModel` config.json (vision_config)."""
    if hf.get("model_type") == "siglip":
        hf = hf.get("vision_config", {})
    if hf.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        raise CheckpointError(f"{source}: model_type {hf.get('model_type')!r} is not a SigLIP vision model")
    act = hf.get("hidden_act", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_new"):
        raise CheckpointError(f"{source}: hidden_act {act!r} unsupported (SigLIP uses gelu_pytorch_tanh)")
    extra = hf.get("qtl_jax", {})
    fields = {
        "width": hf.get("hidden_size", 768), "depth": hf.get("num_hidden_layers", 12),
        "num_heads": hf.get("num_attention_heads", 12), "mlp_dim": hf.get("intermediate_size", 3072),
        "patch_size": hf.get("patch_size", 16), "image_size": hf.get("image_size", 224),
        "layer_norm_eps": hf.get("layer_norm_eps", 1e-6),
        **{k: extra[k] for k in ("select_layer", "select") if k in extra},
    }
    return SiglipConfig(**{**fields, **overrides})


def load_siglip(path: str, config: SiglipConfig | None = None) -> tuple[SiglipConfig, dict]:
    """Loads a SigLIP vision tower folder. Returns (config, params) for `SiglipVisionTower`.

    `config` defaults to the sizes in config.json with TinyLLaVA's selection (layer -2, drop token 0); the
    layers after the selected one, post_layernorm and the pooling head are skipped.
    """
    hf = read_config(path)
    config = config or siglip_config_from_hf(hf, os.path.join(path, "config.json"))
    weights, _ = _strip_prefix(read_weights(path), SIGLIP_PREFIXES, "embeddings.patch_embedding.weight")
    return config, _import_siglip(weights, config, path)


def _import_siglip(weights: dict, config: SiglipConfig, source: str) -> dict:
    """HF tensors -> the tower's parameters, in the layout `config` builds (unrolled or `scan_layers`)."""
    from qtl_jax.models.siglip import SiglipVisionTower, stack_layers

    unrolled = dataclasses.replace(config, scan_layers=False)
    shapes = _expected_shapes(SiglipVisionTower(unrolled), np.zeros((1, config.image_size, config.image_size, 3)))
    built = config.layers_used

    def ignore(key: str) -> bool:
        if key.startswith(("post_layernorm.", "head.", "text_model.", "logit_")) or key.endswith("position_ids"):
            return True
        parts = key.split(".")
        return key.startswith("encoder.layers.") and parts[2].isdigit() and int(parts[2]) >= built

    params = import_params(weights, siglip_entries(config), shapes, source, ignore)
    return jax.tree.map(np.asarray, stack_layers(params, config)) if config.scan_layers else params


def export_siglip(params: dict, config: SiglipConfig, path: str) -> None:
    """Writes a transformers `SiglipVisionModel` folder with the built layers (post-LN as identity, no head).

    The exported model's last hidden state before post-LN equals this tower's selected layer; config.json
    carries `qtl_jax.select` so that `load_siglip` rebuilds the same tower.
    """
    from qtl_jax.models.siglip import unstack_layers

    if config.scan_layers:
        params = unstack_layers(nn.meta.unbox(params), config)
    tensors = export_tensors(params, siglip_entries(config), "vision_model.")
    tensors["vision_model.post_layernorm.weight"] = np.ones(config.width, np.float32)
    tensors["vision_model.post_layernorm.bias"] = np.zeros(config.width, np.float32)
    hf = {
        "architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model",
        "hidden_size": config.width, "num_hidden_layers": config.layers_used,
        "num_attention_heads": config.num_heads, "intermediate_size": config.mlp_dim,
        "patch_size": config.patch_size, "image_size": config.image_size, "num_channels": 3,
        "layer_norm_eps": config.layer_norm_eps, "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False,
        "qtl_jax": {"select_layer": -1, "select": config.select},
    }
    save_folder(path, tensors, hf)


# ------------------------------------------------------------------------------------------------ OpenELM
def load_openelm(path: str) -> tuple[OpenELMConfig, dict]:
    """Loads an OpenELM folder (config.json + weights). Returns (config, params) for `OpenELM`."""
    hf, source = read_config(path), os.path.join(path, "config.json")
    if hf.get("model_type", "openelm") != "openelm":
        raise CheckpointError(f"{source}: model_type {hf.get('model_type')!r} is not openelm")
    config = OpenELMConfig.from_hf(hf, source)
    weights, _ = _strip_prefix(read_weights(path), OPENELM_PREFIXES, "token_embeddings.weight")
    return config, _import_openelm(weights, config, path)


def _import_openelm(weights: dict, config: OpenELMConfig, source: str) -> dict:
    from qtl_jax.models.openelm import OpenELM

    shapes = _expected_shapes(OpenELM(config), np.zeros((1, 2), np.int32))
    return import_params(weights, openelm_entries(config), shapes, source,
                         lambda k: k.endswith(("inv_freq", "causal_mask", "_sin", "_cos")))


def export_openelm(params: dict, config: OpenELMConfig, path: str) -> None:
    """Writes an OpenELM folder (`transformer.*` keys, tied head, config.json)."""
    save_folder(path, export_tensors(params, openelm_entries(config), "transformer."), config.to_hf())


# ----------------------------------------------------------------------------------------------- TinyLLaVA
def load_tinyllava(path: str, config) -> dict:
    """Loads the pretrained parts of a TinyLLaVA checkpoint into {"client": ..., "server": ...} subtrees.

    Args:
      path: a full checkpoint folder (one weights file with `language_model.`, `vision_tower._vision_tower.`
        and `connector._connector.` keys) or a stage folder with `language_model/`, `vision_tower/` and
        `connector/` subfolders.
      config: the `TinyLlavaConfig` to load into (its SigLIP and OpenELM sizes must match the checkpoint).

    Returns:
      A partial parameter tree: client {vision_tower, connector, token_embeddings (quantized_embeddings: the
      client's own copy: `client_token_embeddings.safetensors` when the folder has one, as our export
      writes, else the LM's)} and server {language_model}; from a qtl_jax export (`compressors.safetensors`)
      also the compressors' in_proj (client) and out_proj (server). Elsewhere the compressors are new and keep
      their initialisation: merge with `merge_params`.
    """
    path = _check_dir(path)
    parts = ("language_model", "vision_tower", "connector")
    if all(os.path.isdir(os.path.join(path, p)) for p in parts):
        lm = read_weights(os.path.join(path, "language_model"))
        vt = read_weights(os.path.join(path, "vision_tower"))
        cn = read_weights(os.path.join(path, "connector"))
        source = {p: os.path.join(path, p) for p in parts}
    else:
        weights = read_weights(path)
        lm = {k[len("language_model."):]: v for k, v in weights.items() if k.startswith("language_model.")}
        vt = {k[len("vision_tower._vision_tower."):]: v for k, v in weights.items()
              if k.startswith("vision_tower._vision_tower.")}
        cn = {k[len("connector."):]: v for k, v in weights.items() if k.startswith("connector.")}
        other = sorted(k for k in weights if not k.startswith(("language_model.", "vision_tower.", "connector.")))
        if not lm or not vt or not cn or other:
            raise CheckpointError(
                f"{path}: not a TinyLLaVA checkpoint: expected keys under language_model., "
                f"vision_tower._vision_tower. and connector.; found {len(lm)}, {len(vt)}, {len(cn)} of them"
                + (f" and {len(other)} others, e.g. {other[:5]}" if other else "")
            )
        source = {p: f"{path} ({p}.*)" for p in parts}
    lm, _ = _strip_prefix(lm, OPENELM_PREFIXES, "token_embeddings.weight")
    vt, _ = _strip_prefix(vt, SIGLIP_PREFIXES, "embeddings.patch_embedding.weight")
    from qtl_jax.models.connector import Connector

    lm_params = _import_openelm(lm, config.lm, source["language_model"])
    client = {
        "vision_tower": _import_siglip(vt, config.vision, source["vision_tower"]),
        "connector": import_params(
            cn, connector_entries(),
            _expected_shapes(Connector(config.lm.model_dim), np.zeros((1, 1, config.vision.width))),
            source["connector"], lambda k: False),
    }
    if config.quantized_text:
        # The client's own input embedding: from our export when it was trained apart from the server's tied
        # head, else a copy of the checkpoint's (the paper's initialisation).
        own = os.path.join(path, CLIENT_EMBEDDINGS_FILE)
        embedding = (_read_safetensors(own)["token_embeddings.weight"] if os.path.isfile(own)
                     else lm_params["token_embeddings"]["embedding"].copy())
        want = lm_params["token_embeddings"]["embedding"].shape
        if embedding.shape != want:
            raise CheckpointError(f"{own}: token_embeddings.weight has shape {embedding.shape}, expected {want}")
        client["token_embeddings"] = {"embedding": embedding.astype(np.float32)}
    loaded = {"client": client, "server": {"language_model": lm_params}}
    file = os.path.join(path, COMPRESSORS_FILE)
    entries = _matching_compressors(path, config)
    if os.path.isfile(file) and entries:  # a qtl_jax export: the trained compressors too
        from qtl_jax.compress import Compressor

        dim = config.lm.model_dim
        shapes = {"client": {}, "server": {}}
        for modality, codec in (("image", config.image_codec), ("text", config.text_codec)):
            proj = _expected_shapes(Compressor(codec, dim), np.zeros((1, 1, dim), np.float32))
            shapes["client"][f"{modality}_compressor"] = {"in_proj": proj.get("in_proj")}
            shapes["server"][f"{modality}_compressor"] = {"out_proj": proj.get("out_proj")}
        used = {key for _, key, _, _ in entries}
        compressors = import_params(_read_safetensors(file), entries, shapes, file, lambda k: k not in used)
        for half in ("client", "server"):
            loaded[half].update(compressors.get(half, {}))
    return loaded


def merge_params(params: dict, loaded: dict, where: str = "params", ignore_extra: bool = False) -> dict:
    """Replaces subtrees of `params` (e.g. freshly initialised, possibly boxed) with `loaded` arrays.

    Raises CheckpointError when a loaded leaf has another shape, or has no counterpart in the model (unless
    `ignore_extra`: then it is left out, e.g. a stage-1 text compressor when stage 2 sends token ids).
    """
    params = nn.meta.unbox(params)
    out = dict(params)
    for key, value in loaded.items():
        if key not in params:
            if ignore_extra:
                continue
            raise CheckpointError(f"{where}/{key}: loaded, but the model has no such parameter")
        if isinstance(value, dict):
            out[key] = merge_params(params[key], value, f"{where}/{key}", ignore_extra)
        else:
            if tuple(np.shape(value)) != tuple(params[key].shape):
                raise CheckpointError(f"{where}/{key}: loaded shape {np.shape(value)}, model {params[key].shape}")
            out[key] = jax.numpy.asarray(value, params[key].dtype)
    return out


def _matching_compressors(path: str, config) -> list[Entry]:
    """The compressor entries of `config` whose codec is the one the export at `path` was trained with (the
    same name, bits and options; RD-FSQ's statistics mode aside): a model with another codec keeps its own
    initialisation for that modality, as it would from a plain TinyLLaVA checkpoint."""
    from qtl_jax.compress import codec_to_dict

    note_file = os.path.join(path, EXPORT_NOTE)
    if not os.path.isfile(note_file):
        return []
    with open(note_file) as f:
        note = json.load(f)
    # RD-FSQ's statistics mode is an inference setting; exports from before `scale` existed used "tensor".
    settings = lambda d: {k: v for k, v in d.items() if k != "statistics" and (k, v) != ("scale", "tensor")}
    same = {m for m, codec in (("image", config.image_codec), ("text", config.text_codec))
            if settings(note.get(f"{m}_codec", {})) == settings(codec_to_dict(codec))}
    if note.get("text_transport") != config.text_transport:
        same.discard("text")
    return [e for e in compressor_entries(config) if e[0][1].split("_")[0] in same]


def compressor_entries(config) -> list[Entry]:
    """Flax path (inside params) <-> key of `compressors.safetensors` for the projected codecs' Linear layers:
    `{image,text}_compressor.in_proj.{weight,bias}` (client) and `...out_proj.{weight,bias}` (server), in
    PyTorch's nn.Linear layout."""
    entries: list[Entry] = []
    for modality, codec in (("image", config.image_codec), ("text", config.text_codec)):
        if not codec.projected or (modality == "text" and not config.quantized_text):
            continue
        for half, proj in (("client", "in_proj"), ("server", "out_proj")):
            for p in ("kernel", "bias"):
                entries.append(((half, f"{modality}_compressor", proj, p),
                                f"{modality}_compressor.{proj}.{'weight' if p == 'kernel' else 'bias'}",
                                *(_linear if p == "kernel" else _copy)))
    return entries


def export_tinyllava(params: dict, config, path: str) -> None:
    """Writes everything needed to run the trained model, in the Hugging Face layout where there is one:

      language_model/  vision_tower/  connector/     TinyLLaVA's stage folders (model.safetensors + config.json)
      compressors.safetensors    the compressors' in_proj (client) and out_proj (server), nn.Linear layout;
                                 the language model was trained on out_proj(q) rows, so it is part of the model
      client_token_embeddings.safetensors   (quantized_embeddings) the client's input embedding, trained apart
                                 from the server's tied output head
      qtl_jax.json               the codec settings (name, bits, options), text transport, commitment weight
                                 and how the pieces fit together

    `load_export(path)` rebuilds the same model (config and parameters) from the folder."""
    from safetensors.numpy import save_file

    from qtl_jax.compress import codec_to_dict

    params = nn.meta.unbox(params)
    export_openelm(params["server"]["language_model"], config.lm, os.path.join(path, "language_model"))
    export_siglip(params["client"]["vision_tower"], config.vision, os.path.join(path, "vision_tower"))
    save_folder(os.path.join(path, "connector"),
                export_tensors(params["client"]["connector"], connector_entries()),
                {"connector_type": "mlp2x_gelu", "hidden_size": config.lm.model_dim,
                 "vision_hidden_size": config.vision.width})
    entries = compressor_entries(config)
    if entries:
        save_file(export_tensors(params, entries), os.path.join(path, COMPRESSORS_FILE))
    if config.quantized_text:
        save_file({"token_embeddings.weight": np.asarray(params["client"]["token_embeddings"]["embedding"])},
                  os.path.join(path, CLIENT_EMBEDDINGS_FILE))
    note = {
        "format_version": 1,
        "image_codec": codec_to_dict(config.image_codec), "text_codec": codec_to_dict(config.text_codec),
        "text_transport": config.text_transport, "commitment_weight": config.commitment_weight,
        "untied_client_embedding": config.quantized_text,
        # The tower as trained: vision_tower/ holds only the layers it runs (depth - 1 for select_layer -2).
        "vision": {"depth": config.vision.depth, "select_layer": config.vision.select_layer,
                   "select": config.vision.select},
        "pipeline": "client: vision_tower (hidden state before the last layer, token 0 dropped) -> connector -> "
                    "image_compressor.in_proj -> codec quantize; text: client_token_embeddings -> "
                    "text_compressor.in_proj -> codec quantize. server: codec dequantize -> *_compressor.out_proj "
                    "-> rows spliced at the image placeholder -> language_model",
    }
    files.write_json(os.path.join(path, EXPORT_NOTE), note)


def load_export(path: str):
    """(TinyLlavaConfig, {"client", "server"} params) of a folder written by `export_tinyllava`."""
    from qtl_jax.compress import codec_from_dict
    from qtl_jax.models.openelm import OpenELMConfig
    from qtl_jax.models.tinyllava import TinyLlava, TinyLlavaConfig

    note_file = os.path.join(_check_dir(path), EXPORT_NOTE)
    if not os.path.isfile(note_file):
        raise FileNotFoundError(f"{path!r} has no {EXPORT_NOTE}: not a qtl_jax export")
    with open(note_file) as f:
        note = json.load(f)
    vision_dir, lm_dir = os.path.join(path, "vision_tower"), os.path.join(path, "language_model")
    config = TinyLlavaConfig(
        vision=siglip_config_from_hf(read_config(vision_dir), os.path.join(vision_dir, "config.json"),
                                     **note["vision"]),
        lm=OpenELMConfig.from_hf(read_config(lm_dir), os.path.join(lm_dir, "config.json")),
        image_codec=codec_from_dict(note["image_codec"]), text_codec=codec_from_dict(note["text_codec"]),
        text_transport=note["text_transport"], commitment_weight=note["commitment_weight"])
    size = config.vision.image_size
    ids = np.ones((1, 4), np.int32)
    example = (np.zeros((1, size, size, 3), np.float32), ids, np.ones((1, 4), bool), ids)
    params = nn.meta.unbox(jax.eval_shape(TinyLlava(config).init, jax.random.key(0), *example))["params"]
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), params)
    return config, merge_params(params, load_tinyllava(path, config))
