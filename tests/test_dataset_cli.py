"""`chronoedit-lora dataset check`: one report, exit code 1 on fatal problems."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from chronoedit_lora.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "data" / "example_dataset"


def test_example_dataset_has_no_errors(capsys):
    assert main(["dataset", "check", str(EXAMPLE), "--max-pixels", "4096"]) == 0
    assert "No problems found" in capsys.readouterr().out
    assert main(["dataset", "check", str(EXAMPLE)]) == 0  # at 1024x1024 the small images only warn
    assert "0 errors, 12 warnings" in capsys.readouterr().out


def test_broken_dataset_reports_rows_and_fails(tmp_path):
    shutil.copytree(EXAMPLE, tmp_path / "ds")
    csv_path = tmp_path / "ds" / "metadata.csv"
    lines = csv_path.read_text().splitlines()
    lines[2] = lines[2].replace("after/001.png", "after/missing.png")
    lines[3] = "before/002.png,after/002.png,"
    csv_path.write_text("\n".join(lines) + "\n")
    (tmp_path / "ds" / "before" / "004.png").write_bytes(b"")
    result = subprocess.run([sys.executable, "-m", "chronoedit_lora.cli", "dataset", "check", str(csv_path)],
                            capture_output=True, text=True)
    assert result.returncode == 1
    report = result.stdout
    assert "row 3" in report and "missing.png" in report
    assert "row 4" in report and "prompt" in report.lower()
    assert "row 6" in report and "004.png" in report
