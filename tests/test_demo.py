"""A short end-to-end demo on the shipped world: the erased concept's accuracy drops, the others' do not."""

import json

import pytest

from hirm_jax.config_lib import ConfigError


@pytest.mark.slow(seconds=70)
def test_demo_erases_the_concept_and_keeps_the_rest(tmp_path):
    # As `make demo` runs it: its own process, one CPU device (the test process's 8 fake devices
    # made it about twice as slow on 2 cores).
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, "-m", "hirm_jax.cli", "demo", "--concept=heart", "--seeds-per-cell=1",
                           f"--workdir={tmp_path / 'demo'}"], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(root)}, cwd=root, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "demo" / "demo_report.json").read_text())
    before, after = report["before"], report["after"]
    assert before["UA"] <= 0.2  # the world draws hearts before erasure
    assert after["UA"] >= before["UA"] + 0.6
    assert after["IRA"] >= before["IRA"] - 0.1
    assert after["CRA"] >= before["CRA"] - 0.1
    saved = json.loads((tmp_path / "demo" / "demo_report.json").read_text())
    for key in ("concept", "kind", "method", "UA", "IRA", "CRA", "before", "timings"):
        assert key in saved
    assert all(0.0 <= saved[m] <= 1.0 for m in ("UA", "IRA", "CRA"))
    assert (tmp_path / "demo" / "demo_grid.png").stat().st_size > 1000


def test_unknown_concept_lists_the_available_ones(tmp_path):
    from hirm_jax.world.demo import run_demo
    with pytest.raises(ConfigError, match=r"one of the world's objects \['circle'"):
        run_demo("unicorn", "hirm_s", tmp_path / "demo")
    assert not (tmp_path / "demo").exists()
