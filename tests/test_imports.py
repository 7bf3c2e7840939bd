import subprocess
import sys


def test_compress_imports_neither_tensorflow_nor_torch():
    code = (
        "import sys, qtl_jax.compress;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'torch'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "[]"
