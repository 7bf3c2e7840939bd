import pytest

from qtl_jax.data import builders

SMALL = builders.ShapesVqaConfig(name="test_small", image_size=32, num_qa=80, num_captions=24, num_eval=20)


@pytest.fixture(scope="session")
def small_shapes(tmp_path_factory):
    """A small Shapes-VQA (32 px, 80 QA, 24 captions, 20 validation/test) and its tokenizer folder."""
    return builders.prepare_shapes(str(tmp_path_factory.mktemp("tfds")), SMALL)
