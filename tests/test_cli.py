"""The `dts-llm` entry points and the README's main job (the offline demo)."""

import json
import subprocess
import sys
from pathlib import Path

from dts_llm.cli import main


def test_console_script_and_module_print_help():
    console_script = str(Path(sys.executable).parent / "dts-llm")
    for command in ([console_script, "--help"], [sys.executable, "-m", "dts_llm", "--help"]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "demo" in done.stdout


def test_demo_distils_a_student_towards_its_teacher(tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "validation: student CE" in printed
    history = json.loads((tmp_path / "log_history.json").read_text())
    train = [entry for entry in history if "kd_loss" in entry]
    final = history[-1]
    # DTS: the temperature starts at T_init = 3 and ends near T_min = 1 (cosine factor 0 in the last epoch).
    assert train[0]["temperature"] > 2.9
    assert 1.0 <= train[-1]["temperature"] < 1.1
    assert train[-1]["ce_loss"] < 0.5 * train[0]["ce_loss"]
    assert final["eval_ce_loss"] < 1.25 * final["eval_teacher_ce_loss"]
