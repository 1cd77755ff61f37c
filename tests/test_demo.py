"""`make demo`, the README's main command, end to end on CPU: its figures must show what they claim."""
import json
import os
import subprocess

import pytest

from conftest import ROOT


@pytest.mark.timeout(2400)  # about 6 minutes on a quiet 2-core machine; far longer when it is shared
def test_make_demo_runs_the_pipeline_and_small_d_memorises_while_large_d_generalises(tmp_path):
    env = {**os.environ, "CACHE_DIR": str(tmp_path)}
    result = subprocess.run(["make", "--no-print-directory", "demo"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training 3 run(s) as one pack" in result.stdout  # the sweep trains as one pack (conf/experiment/demo.yaml)
    out = tmp_path / "experiments" / "balls_and_urns" / "demo" / "analysis"
    assert f"figures and summary.json in {out}" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    final = summary["final_w_M"]["id"]
    assert set(final) == {"4", "64", "1024"}
    assert final["4"] > 0.8, final  # near M
    assert final["1024"] < 0.2, final  # near G
    assert final["4"] > final["64"] > final["1024"], final
    assert summary["fit"]["pearson_r_all"] > 0.9, summary["fit"]
    for name in summary["figures"]:
        assert (out / name).stat().st_size > 10_000, name
