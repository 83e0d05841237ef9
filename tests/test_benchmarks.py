"""The benchmark scripts report bad input as the CLI does: one ``error:`` line on stderr, exit code 2."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.mark.parametrize("script, args", [
    ("sam_faces.py", ["--photos", "nobody"]),
    ("feedforward_faces.py", ["--model", "missing-model-dir"]),
    ("edit_faces.py", ["--model", "missing-model-dir"]),
])
def test_benchmark_bad_input_is_one_line_and_exit_2(script, args, tmp_path):
    run = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1, run.stderr
    assert "Traceback" not in run.stderr
