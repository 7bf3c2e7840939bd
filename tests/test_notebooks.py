"""Executes the notebooks so that they cannot rot: any failing cell (and its asserts) fails the test.

They run on small settings (`QTL_NOTEBOOK_QUICK=1`); the notebooks that analyse a trained run get the
session's (`trained` in conftest, `QTL_RUN`) instead of training their own."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["compressors.ipynb", "entropy.ipynb", "privacy.ipynb", "training.ipynb"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("notebook_tfds"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch, request, data_dir):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("QTL_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("QTL_DATA_DIR", data_dir)
    if path.name in ("entropy.ipynb", "privacy.ipynb"):
        monkeypatch.setenv("QTL_RUN", str(request.getfixturevalue("trained")[0]))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
