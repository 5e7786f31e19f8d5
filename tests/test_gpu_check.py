"""scripts/gpu_check.py, the GPU path's check, in its CPU mode: every section on 2-layer models. On a GPU the same
code times PolyLM-shaped models; here it must run through, and its correctness checks must pass."""

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_gpu_check_runs_every_section_on_cpu(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--tiny",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = result["sections"]
    assert set(sections) == {"A", "B", "C", "D"} and not any(s["error"] for s in sections.values())
    assert sections["A"]["results"]["copy_gb_s"] > 0 and sections["A"]["results"]["matmul_tflops"] > 0
    checks = sections["B"]["results"]
    assert len(checks) == 7 and all(c["ok"] for c in checks.values()), checks
    for key, shape in (("C", "polylm-1.7b"), ("D", "polylm-13b")):
        runs = sections[key]["results"]["runs"]
        paths = {(row["path"], row["batch"]) for row in runs}
        assert {("bare eager loop", 1), ("engine", 1), ("engine", 8), ("generate, sequential", 1)} <= paths
        assert all(row["model"] == shape and row["tokens_s"] > 0 and 0 < row["roofline_fraction"] for row in runs)
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| polylm-13b | engine | 8 |" in table
    assert "goal, batch-1 fraction of roofline (polylm-1.7b)" in table and "rows vs sequential generate" in table
