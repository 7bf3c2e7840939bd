"""Feature compressors as pure JAX functions, plus Flax modules that wrap them with their projections.

Pure functions (no Flax needed):
  straight_through, round_ste                 the straight-through estimator (`jax.custom_vjp`)
  robust_scale, quantize_levels, dequantize_levels, levels_ste, commitment_loss, rd_fsq    RD-FSQ
  fsq_tanh, fsq_tanh_quantize                 the paper's FSQ baseline (tanh bound)
  fsq_bound, fsq_quantize, fsq_codes_to_indices, fsq_indices_to_codes, fsq_codebook        canonical FSQ
  nf_table, nf_quantize, nf_dequantize, nf_ste                                             b-bit NF blocks
  identity_quantize, identity_ste             fp32 / bf16 / fp16 baselines
  pack, unpack, Payload                       bit packing and what crosses the wire
  kde_entropy, index_entropy, select_bits, entropy_encode, entropy_decode                  entropy tools

Codecs and modules:
  make_codec(name, bits)                      one interface over all of the above (`Codec`)
  Compressor                                  Linen module: in_proj | codec | out_proj, client/server halves
"""

from qtl_jax.compress.codecs import (
    COMPRESSORS,
    FSQ,
    NF,
    RDFSQ,
    Codec,
    FSQTanh,
    Identity,
    Quantized,
    codec_from_dict,
    codec_to_dict,
    make_codec,
)
from qtl_jax.compress.entropy import (
    BitSelection,
    entropy_decode,
    entropy_encode,
    index_entropy,
    kde_entropy,
    select_bits,
)
from qtl_jax.compress.fsq import (
    fsq_bound,
    fsq_codebook,
    fsq_codes_to_indices,
    fsq_digits,
    fsq_from_digits,
    fsq_indices_to_codes,
    fsq_quantize,
    fsq_tanh,
    fsq_tanh_encode,
    fsq_tanh_quantize,
)
from qtl_jax.compress.identity import IDENTITY_DTYPES, identity_quantize, identity_ste
from qtl_jax.compress.modules import ClientOutput, Compressor, client_apply, server_apply, split_params
from qtl_jax.compress.nf import nf_bits_per_element, nf_dequantize, nf_quantize, nf_ste, nf_table
from qtl_jax.compress.pack import pack, packed_nbytes, unpack
from qtl_jax.compress.payload import Payload
from qtl_jax.compress.rd_fsq import (
    commitment_loss,
    dequantize_levels,
    levels_ste,
    quantize_levels,
    rd_fsq,
    robust_scale,
)
from qtl_jax.compress.ste import round_ste, straight_through

__all__ = [
    "COMPRESSORS", "FSQ", "IDENTITY_DTYPES", "NF", "RDFSQ", "BitSelection", "ClientOutput", "Codec",
    "Compressor", "FSQTanh", "Identity", "Payload", "Quantized", "client_apply", "codec_from_dict",
    "codec_to_dict", "commitment_loss",
    "dequantize_levels", "entropy_decode", "entropy_encode", "fsq_bound", "fsq_codebook",
    "fsq_codes_to_indices", "fsq_digits", "fsq_from_digits", "fsq_indices_to_codes", "fsq_quantize",
    "fsq_tanh", "fsq_tanh_encode", "fsq_tanh_quantize", "identity_quantize", "identity_ste",
    "index_entropy", "kde_entropy", "levels_ste", "make_codec", "nf_bits_per_element", "nf_dequantize",
    "nf_quantize", "nf_ste", "nf_table", "pack", "packed_nbytes", "quantize_levels", "rd_fsq",
    "robust_scale", "round_ste", "select_bits", "server_apply", "split_params", "straight_through",
    "unpack",
]
