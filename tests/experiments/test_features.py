"""Codec quality without training, on features with a known distribution."""

import numpy as np

from qtl_jax.experiments import features, report


def test_reconstruction_quality_on_gaussian_features():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((512, 64)) * rng.uniform(0.5, 2.0, 64) + rng.standard_normal(64)).astype(np.float32)
    nmse = {}
    for codec in ("rd_fsq", "fsq_tanh", "nf"):
        for bits in (1, 2, 3, 4):
            q = features.reconstruction_quality(x, codec, bits)
            nmse[codec, bits] = q["nmse"]
            assert q["nmse"] > 0 and 0 < q["cosine"] <= 1  # (NF at 1 bit maps to block min/max: NMSE > 1)
        assert nmse[codec, 1] > nmse[codec, 2] > nmse[codec, 3] > nmse[codec, 4]
    # 4-bit uniform levels over +-3 std (one range for every channel): ~2% of the variance.
    assert nmse["rd_fsq", 4] < 0.03
    exact = features.reconstruction_quality(x, "rd_fsq", 2)
    assert exact["bits_per_element"] == 2.0
    # NF at G = 64, D = 64: 2 + 8/64 (scales) + 32/64 (fp32 minima) + 64/64 (each row's two fp32 bounds).
    assert features.reconstruction_quality(x, "nf", 2)["bits_per_element"] == 3.625
    table = report.quality_markdown(features.quality_table({"image": features.ModalityFeatures(x, x, None)},
                                                             codecs=("rd_fsq",), bits=(2,)))
    assert table.splitlines()[2].startswith("| image | rd_fsq | 2 | ")
