"""One interface over every compressor, so that models and the split runtime treat them alike.

A `Codec` is a frozen (hashable, static) description of a compressor's math between the projections:

    m    = codec.moments(z, mask)       client: statistics the code depends on across rows (RD-FSQ), else None
    code = codec.encode(z, mask, m)     client: continuous code (RD-FSQ: 3-sigma scaling; FSQ: tanh bound)
    qz   = codec.quantize(code)         client: `Quantized(values, side)`, integer indices + side info
    p    = codec.to_payload(qz)         client: bit-packed `Payload`, the bytes that cross the wire
    qz   = codec.from_payload(p)        server
    q    = codec.dequantize(qz)         server: float32 values
    q    = codec.ste(code)              single program: the same values as the server's, differentiable
    L    = codec.loss(code, q, mask, z, m)  client: RD-FSQ's loss term (0 for the others)
    s    = codec.stats(z, mask, m)      client: diagnostics, e.g. RD-FSQ's clipped fraction ({} for most)

The gradient contract of the split runtime: the server returns dL/dq; the client pulls it back through
`ste`, whose forward values equal the server's `dequantize` (bit for bit when both run eagerly or in
separate programs; inside one fused jit XLA may round a division differently by one ulp). So
single-program and split training compute the same gradients.

Inference (`codec.for_inference()`): RD-FSQ's statistics are taken per sample, over that sample's real rows,
instead of over the batch, so an answer does not depend on which other samples share its batch; generated
tokens are quantized with their prompt's statistics (`moments`). The other codecs work row by row already.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp

from qtl_jax.compress import fsq as fsq_lib
from qtl_jax.compress import nf as nf_lib
from qtl_jax.compress import rd_fsq as rd_fsq_lib
from qtl_jax.compress.checks import check_bits, check_mask
from qtl_jax.compress.identity import IDENTITY_DTYPES, identity_quantize, identity_ste
from qtl_jax.compress.pack import pack, unpack
from qtl_jax.compress.payload import Payload
from qtl_jax.compress.ste import straight_through

STATISTICS = ("batch", "sample")  # RD-FSQ: over the batch's real rows (training), per sample (inference)
SCALES = ("tensor", "channel")  # RD-FSQ: one mean and std over all channels (the paper), one per channel


@flax.struct.dataclass
class Quantized:
    """A quantized tensor before packing.

    Attributes:
      values: uint8[..., N, C] indices (or the cast features for the identity baselines).
      side: dict of side-information arrays (NF block scales and minima), empty for most codecs.
    """

    values: Any
    side: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Codec:
    """Base class; see the module docstring for the interface."""

    name: ClassVar[str]
    projected: ClassVar[bool] = True  # wrapped by in_proj (client) and out_proj (server) in the module

    @property
    def bits(self) -> int:
        raise NotImplementedError

    def code_width(self, features: int) -> int:
        """Width C of the continuous code for D = `features` input features."""
        return features

    def moments(self, z: jax.Array, mask: jax.Array | None = None) -> Any:
        """Statistics the code of a row depends on beyond the row itself (None for row-wise codecs)."""
        del z, mask
        return None

    def encode(self, z: jax.Array, mask: jax.Array | None = None, moments: Any = None) -> jax.Array:
        raise NotImplementedError

    def for_inference(self) -> Codec:
        """The codec as evaluation and generation run it (see the module docstring)."""
        return self

    def quantize(self, code: jax.Array) -> Quantized:
        raise NotImplementedError

    def dequantize(self, quantized: Quantized) -> jax.Array:
        raise NotImplementedError

    def ste(self, code: jax.Array) -> jax.Array:
        raise NotImplementedError

    def loss(self, code: jax.Array, q: jax.Array, mask: jax.Array | None = None, z: jax.Array | None = None,
             moments: Any = None) -> jax.Array:
        """The client's loss term on the code (`z` and `moments`: the input of `encode` and its statistics)."""
        del code, q, mask, z, moments
        return jnp.zeros((), jnp.float32)

    def stats(self, z: jax.Array, mask: jax.Array | None = None, moments: Any = None) -> dict[str, jax.Array]:
        """Training diagnostics of the encoding of `z` (float32 scalars, no gradient); {} when none."""
        del z, mask, moments
        return {}

    def to_payload(self, quantized: Quantized) -> Payload:
        idx = quantized.values
        return Payload(codes=pack(idx, self.bits), side=quantized.side, codec=self.name, bits=self.bits,
                       shape=tuple(idx.shape))

    def from_payload(self, payload: Payload) -> Quantized:
        if payload.codec != self.name or payload.bits != self.bits:
            raise ValueError(
                f"payload was made by {payload.codec!r} at {payload.bits} bits, this codec is "
                f"{self.name!r} at {self.bits} bits"
            )
        return Quantized(values=unpack(payload.codes, self.bits, payload.shape), side=payload.side)

    def payload_nbytes(self, shape: Sequence[int]) -> int:
        """Bytes on the wire for features of `shape` = (..., N, D), computed without running anything."""
        code = jax.ShapeDtypeStruct((*tuple(shape[:-1]), self.code_width(shape[-1])), jnp.float32)
        return jax.eval_shape(lambda c: self.to_payload(self.quantize(c)), code).nbytes


@dataclasses.dataclass(frozen=True)
class _LevelCodec(Codec):
    """Shared by RD-FSQ and the FSQ-tanh baseline: codes in [-1, 1] on 2^b evenly spaced levels."""

    num_bits: int = 2

    def __post_init__(self):
        check_bits(self.num_bits)

    @property
    def bits(self) -> int:
        return self.num_bits

    def quantize(self, code):
        return Quantized(values=rd_fsq_lib.quantize_levels(code, self.num_bits), side={})

    def dequantize(self, quantized):
        return rd_fsq_lib.dequantize_levels(quantized.values, self.num_bits)

    def ste(self, code):
        return rd_fsq_lib.levels_ste(code, self.num_bits)


@dataclasses.dataclass(frozen=True)
class RDFSQ(_LevelCodec):
    """RD-FSQ (SPEC §3.1): 3-sigma robust scaling over real rows, 2^b levels, and a loss term: `commitment`
    "distortion" (our default, `rd_fsq.distortion_loss`) or "cosine" (the paper's `rd_fsq.commitment_loss`)."""

    name: ClassVar[str] = "rd_fsq"
    width: float = 3.0
    statistics: str = "batch"  # "batch" (training, the paper) or "sample" (inference)
    scale: str = "tensor"  # "tensor": one mean and std over all channels (the paper); "channel": one per channel
    commitment: str = "distortion"
    usage_weight: float = 0.0  # > 0 adds this times `rd_fsq.usage_loss` (a code-usage term) to the loss term

    def __post_init__(self):
        super().__post_init__()
        if self.statistics not in STATISTICS:
            raise ValueError(f"statistics must be one of {STATISTICS}, got {self.statistics!r}")
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {self.scale!r}")
        if self.commitment not in rd_fsq_lib.LOSSES:
            raise ValueError(f"commitment must be one of {rd_fsq_lib.LOSSES}, got {self.commitment!r}")

    def moments(self, z, mask=None):
        return rd_fsq_lib.masked_moments(z, check_mask(mask, z), per_sample=self.statistics == "sample",
                                         per_channel=self.scale == "channel")

    def encode(self, z, mask=None, moments=None):
        moments = self.moments(z, mask) if moments is None else moments
        return rd_fsq_lib.robust_scale(z, mask, self.width, moments=moments)

    def for_inference(self):
        return dataclasses.replace(self, statistics="sample")

    def loss(self, code, q, mask=None, z=None, moments=None):
        usage = 0.0
        if self.usage_weight:
            usage = self.usage_weight * rd_fsq_lib.usage_loss(code, self.num_bits, mask)
        if moments is None and z is not None:
            moments = self.moments(z, mask)
        return rd_fsq_lib.loss_term(self.commitment, code, q, mask, z, self.width, moments=moments) + usage

    def stats(self, z, mask=None, moments=None):
        moments = self.moments(z, mask) if moments is None else moments
        return {"clipped": rd_fsq_lib.clipped_fraction(z, mask, self.width, moments)}


@dataclasses.dataclass(frozen=True)
class FSQTanh(_LevelCodec):
    """The paper's FSQ baseline (SPEC §3.2): tanh bound, 2^b levels, no loss."""

    name: ClassVar[str] = "fsq_tanh"

    def encode(self, z, mask=None, moments=None):
        del mask, moments
        return fsq_lib.fsq_tanh_encode(z)


@dataclasses.dataclass(frozen=True)
class FSQ(Codec):
    """Canonical FSQ (Mentzer et al.): in_proj to C = len(levels) channels, per-channel levels.

    The code is bound(z) (values in (-L/2, L/2)); quantization rounds it and sends the per-channel digits
    round(code) + L // 2 at ceil(log2(max L)) bits; the dequantized value is round(code) / (L // 2).
    """

    name: ClassVar[str] = "fsq"
    levels: tuple[int, ...] = (8, 5, 5, 5)

    def __post_init__(self):
        object.__setattr__(self, "levels", fsq_lib.check_levels(self.levels))

    @property
    def bits(self) -> int:
        return fsq_lib.fsq_bits(self.levels)

    def code_width(self, features):
        return len(self.levels)

    def _half_width(self):
        return jnp.asarray([level // 2 for level in self.levels], jnp.float32)

    def encode(self, z, mask=None, moments=None):
        del mask, moments
        return fsq_lib.fsq_bound(z, self.levels)

    def quantize(self, code):
        digits = jnp.round(code) + self._half_width()
        return Quantized(values=digits.astype(jnp.uint8), side={})

    def dequantize(self, quantized):
        return fsq_lib.fsq_from_digits(quantized.values, self.levels)

    def ste(self, code):
        return straight_through(jnp.round, code) / self._half_width()


@dataclasses.dataclass(frozen=True)
class NF(Codec):
    """b-bit NF block quantizer with double-quantized scales (SPEC §3.3); no projections, no loss."""

    name: ClassVar[str] = "nf"
    projected: ClassVar[bool] = False
    num_bits: int = 2
    block_size: int = nf_lib.DEFAULT_BLOCK
    mins_bits: int = 32

    def __post_init__(self):
        check_bits(self.num_bits)
        if self.mins_bits not in (32, 8):
            raise ValueError(f"mins_bits must be 32 or 8, got {self.mins_bits!r}")

    @property
    def bits(self) -> int:
        return self.num_bits

    def encode(self, z, mask=None, moments=None):
        del mask, moments
        return z.astype(jnp.float32)

    def quantize(self, code):
        idx, side = nf_lib.nf_quantize(code, self.num_bits, self.block_size, self.mins_bits)
        return Quantized(values=idx, side=side)

    def dequantize(self, quantized):
        return nf_lib.nf_dequantize(quantized.values, quantized.side, self.num_bits, self.block_size)

    def ste(self, code):
        return nf_lib.nf_ste(code, self.num_bits, self.block_size, self.mins_bits)


@dataclasses.dataclass(frozen=True)
class Identity(Codec):
    """Uncompressed baseline: features cast to float32, bfloat16 or float16 (SPEC §3.4)."""

    projected: ClassVar[bool] = False
    kind: str = "none_fp16"

    def __post_init__(self):
        if self.kind not in IDENTITY_DTYPES:
            raise ValueError(f"identity kind must be one of {sorted(IDENTITY_DTYPES)}, got {self.kind!r}")

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.kind

    @property
    def dtype(self):
        return IDENTITY_DTYPES[self.kind]

    @property
    def bits(self) -> int:
        return jnp.dtype(self.dtype).itemsize * 8

    def encode(self, z, mask=None, moments=None):
        del mask, moments
        return z.astype(jnp.float32)

    def quantize(self, code):
        return Quantized(values=identity_quantize(code, self.dtype), side={})

    def dequantize(self, quantized):
        return quantized.values.astype(jnp.float32)

    def ste(self, code):
        return identity_ste(code, self.dtype)

    def to_payload(self, quantized):
        x = quantized.values
        return Payload(codes=x, side={}, codec=self.name, bits=self.bits, shape=tuple(x.shape))

    def from_payload(self, payload):
        if payload.codec != self.name:
            raise ValueError(f"payload was made by {payload.codec!r}, this codec is {self.name!r}")
        return Quantized(values=payload.codes, side={})


COMPRESSORS = ("rd_fsq", "fsq_tanh", "fsq", "nf", *IDENTITY_DTYPES)


def codec_to_dict(codec: Codec) -> dict[str, Any]:
    """A codec as JSON-able settings: {"name", "bits", **options}; `codec_from_dict` rebuilds it."""
    options = {f.name: getattr(codec, f.name) for f in dataclasses.fields(codec) if f.name not in ("num_bits", "kind")}
    return {"name": codec.name, "bits": codec.bits, **{k: list(v) if isinstance(v, tuple) else v
                                                        for k, v in options.items()}}


def codec_from_dict(settings: dict[str, Any]) -> Codec:
    """The inverse of `codec_to_dict`."""
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items() if k not in ("name", "bits")}
    return make_codec(settings["name"], settings["bits"], **options)


def make_codec(name: str, bits: int = 2, **kwargs) -> Codec:
    """Builds a codec by name: one of `COMPRESSORS`.

    Args:
      name: "rd_fsq", "fsq_tanh", "fsq" (canonical; pass `levels=`), "nf" (`block_size=`, `mins_bits=`),
        "none_fp32", "none_bf16" or "none_fp16".
      bits: bits per element for rd_fsq, fsq_tanh and nf (1..8); ignored by the others.
      **kwargs: codec-specific options (RD-FSQ `width`, `statistics`, `scale`, `commitment` and `usage_weight`,
        FSQ `levels`, NF `block_size` and `mins_bits`).
    """
    if name == "rd_fsq":
        return RDFSQ(num_bits=bits, **kwargs)
    if name == "fsq_tanh":
        return FSQTanh(num_bits=bits, **kwargs)
    if name == "fsq":
        return FSQ(**kwargs)
    if name == "nf":
        return NF(num_bits=bits, **kwargs)
    if name in IDENTITY_DTYPES:
        return Identity(kind=name, **kwargs)
    raise ValueError(f"unknown compressor {name!r}; expected one of {', '.join(COMPRESSORS)}")
