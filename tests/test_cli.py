"""The jaxbp command line: each subcommand with --json, in-process; python -m jaxbp once."""

import json
import os
import subprocess
import sys

import pytest

from jaxbp.cli import main


def test_compare_with_json_exits_0(tmp_path, capsys):
    path = tmp_path / "compare.json"
    assert main(["compare", "--sizes", "6,7,4", "--batch", "5", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "PASSED" in out and "[1]['w']" in out and "(7, 4)" in out
    data = json.loads(path.read_text())
    assert data["passed"] is True and len(data["reports"]) == 1
    report = data["reports"][0]
    assert report["sizes"] == [6, 7, 4] and report["batch"] == 5 and report["dtype"] == "float32"
    assert {row["check"] for row in report["rows"]} == {
        "loss", "jax.grad", "custom_vjp", "finite diff",
    }  # fmt: skip


def test_compare_passes_for_every_activation_and_loss_in_float32(capsys):
    # (float64, with finite differences, is swept in test_gradcheck.py)
    status = main([
        "compare", "--activation", "all", "--loss", "all", "--dtype", "float32",
        "--sizes", "4,5,3", "--batch", "4", "--no-fd",
    ])  # fmt: skip
    assert "24 of 24 configurations passed" in capsys.readouterr().out  # swish = silu counts
    assert status == 0


def test_compare_on_the_digits_with_loss_options(capsys):
    args = ["compare", "--dataset", "digits", "--sizes", "64,12,10", "--batch", "16",
            "--label-smoothing", "0.1", "--z-loss", "0.001", "--dtype", "float64"]  # fmt: skip
    assert main(args) == 0
    assert "batch=16" in capsys.readouterr().out


def test_compare_bad_arguments_exit_2(capsys):
    assert main(["compare", "--activation", "mish"]) == 2
    assert "--activation" in capsys.readouterr().err
    assert main(["compare", "--dataset", "digits", "--sizes", "8,3"]) == 2
    assert "digits" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["compare", "--sizes", "64"])
    assert e.value.code == 2


def test_explain_with_json(tmp_path, capsys):
    path = tmp_path / "explain.json"
    assert main(["explain", "--sizes", "3,4,2", "--batch", "3", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "(3, 2, 2)" in out and "(3, 4)" in out
    data = json.loads(path.read_text())
    assert data["sizes"] == [3, 4, 2] and data["batch"] == 3 and data["full_jacobian"] is None


def test_train_with_json(tmp_path, capsys):
    path = tmp_path / "train.json"
    args = ["train", "--sizes", "64,16,10", "--epochs", "2", "--batch-size", "128",
            "--lr", "0.01", "--json", str(path)]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "epoch   2/2" in out and "test accuracy" in out
    data = json.loads(path.read_text())
    assert len(data["losses"]) == 2 and 0.0 <= data["accuracy"] <= 1.0
    assert data["config"]["sizes"] == [64, 16, 10]


def test_train_check_reports_agreement(capsys):
    args = ["train", "--sizes", "64,16,10", "--epochs", "1", "--batch-size", "256", "--check"]
    assert main(args) == 0
    assert "loss curves agree" in capsys.readouterr().out


def test_no_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


def test_python_dash_m_jaxbp_compare_runs():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "jaxbp", "compare", "--sizes", "5,6,3", "--batch", "4"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "PASSED" in proc.stdout
