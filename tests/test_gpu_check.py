"""bench/gpu_check.py --dry-run: the GPU check's whole code path on CPU with tiny sizes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about 30 s of CPU (2 minutes on the loaded 2-core machine): torchrun, 5 short trainings
def test_gpu_check_dry_run_prints_every_row_and_passes(tmp_path):
    out = tmp_path / "report.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    checks = [r["check"] for r in report["rows"]]
    assert [c.split()[0] for c in checks] == ["extraction", "extraction", "bf16", "2", "fine-tune", "resume", "2"]
    assert all(r["ok"] for r in report["rows"]) and report["environment"]["device"] == "cpu"
    for check in checks:
        assert check in proc.stdout
