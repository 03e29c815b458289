"""The jaxbp command line: each subcommand with --json, in-process; python -m jaxbp once."""

import io
import json
import os
import re
import subprocess
import sys

import pytest

import jaxbp
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
    k = len(jaxbp.ACTIVATIONS) * len(jaxbp.nn.LOSSES)
    assert f"{k} of {k} configurations passed" in capsys.readouterr().out
    assert status == 0


def test_compare_on_the_digits_with_loss_options(capsys):
    args = ["compare", "--dataset", "digits", "--sizes", "64,12,10", "--batch", "16",
            "--label-smoothing", "0.1", "--z-loss", "0.001", "--dtype", "float64"]  # fmt: skip
    assert main(args) == 0
    assert "batch=16" in capsys.readouterr().out


# (subcommand, arguments, what the message must name)
BAD = [
    ("compare", ["--activation", "mish"], "--activation"),
    ("compare", ["--sizes", "64"], "--sizes"),
    ("compare", ["--dataset", "digits", "--sizes", "8,3"], "digits data set needs 64 inputs"),
    ("compare", ["--batch", "0"], "--batch"),
    ("compare", ["--label-smoothing", "2"], "--label-smoothing: expected a number in [0, 1]"),
    ("compare", ["--label-smoothing", "nan"], "--label-smoothing"),
    ("compare", ["--z-loss", "-1"], "--z-loss: expected a finite number ≥ 0"),
    ("compare", ["--z-loss", "inf"], "--z-loss"),
    ("compare", ["--fd-directions", "0"], "--fd-directions: expected a positive integer"),
    ("compare", ["--no-fd", "--fd-directions", "3"], "--fd-directions: does not apply"),
    ("compare", ["--loss", "mse", "--label-smoothing", "0.1"],
     "--label-smoothing: only for --loss softmax_cross_entropy, got --loss mse"),
    ("compare", ["--loss", "sigmoid_binary_cross_entropy,mse", "--z-loss", "0.1"],
     "--z-loss: only for --loss softmax_cross_entropy"),
    ("compare", ["--json", "/no/such/directory/out.json"], "--json: cannot write"),
    ("compare", ["--bogus"], "unrecognized arguments: --bogus"),
    ("explain", ["--batch", "0"], "--batch"),
    ("explain", ["--json", "/no/such/directory/out.json"], "no directory"),
    ("explain", ["--full-jacobian", "--sizes", "64,256,256,10", "--batch", "64"],
     "would need 10.2 GiB (10919710720 bytes) for its Jacobians (the largest, ∂z2/∂W2, "
     "has shape (64, 256, 256, 256))"),
    ("explain", ["--bogus"], "unrecognized arguments: --bogus"),
    ("train", ["--lr", "-1"], "--lr: expected a finite number > 0"),
    ("train", ["--lr", "0"], "--lr"),
    ("train", ["--epochs", "0"], "--epochs"),
    ("train", ["--batch-size", "0"], "--batch-size"),
    ("train", ["--batch-size", "5000"], "batch_size: expected an int from 1 to 1438"),
    ("train", ["--sizes", "8,3"], "sizes: the digits need 64 inputs"),
    ("train", ["--noise", "1.0"], "--noise 1.0 needs --dp-clip"),
    ("train", ["--dp-clip", "0"], "--dp-clip"),
    ("train", ["--noise", "-1", "--dp-clip", "1"], "--noise"),
    ("train", ["--json", "/no/such/directory/out.json"], "--json: cannot write"),
    ("train", ["--bogus"], "unrecognized arguments: --bogus"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("command", "args", "message"), BAD, ids=lambda v: " ".join(v) if isinstance(v, list) else v
)
def test_bad_values_are_usage_errors_of_the_subcommand_before_any_work(
    command, args, message, capsys, monkeypatch
):
    import importlib

    module = importlib.import_module(f"jaxbp.cli.{command}")  # the subcommand's module

    def no_work(args):
        raise AssertionError("the work started before the arguments were checked")

    monkeypatch.setattr(module, "run", no_work)
    with pytest.raises(SystemExit) as e:
        main([command, *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: jaxbp {command}" in err, err  # the subcommand's usage, not jaxbp's
    assert message in err, err
    assert "Traceback" not in err


def test_a_directory_as_json_path_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["compare", "--json", str(tmp_path)])
    assert e.value.code == 2 and "is a directory" in capsys.readouterr().err


def test_label_smoothing_with_all_losses_applies_to_cross_entropy(capsys):
    args = ["compare", "--loss", "all", "--label-smoothing", "0.1", "--sizes", "4,3",
            "--batch", "3", "--no-fd"]  # fmt: skip
    assert main(args) == 0
    assert "3 of 3 configurations passed" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args",
    [
        ["compare", "--sizes", "4,5,3", "--batch", "3", "--no-fd"],
        ["explain", "--sizes", "3,4,2", "--batch", "2", "--full-jacobian"],
        ["train", "--sizes", "64,8,10", "--epochs", "1", "--batch-size", "512"],
    ],
    ids=lambda a: a[0],
)
def test_json_dash_writes_only_json_to_stdout_and_the_text_to_stderr(args, capsys):
    assert main([*args, "--json", "-"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)  # all of stdout is one JSON document
    assert isinstance(data, dict) and data
    assert captured.err.strip(), "the human-readable text goes to stderr"


def test_python_dash_m_jaxbp_train_bogus_shows_train_usage_and_exits_2():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "jaxbp", "train", "--bogus"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "usage: jaxbp train" in proc.stderr and "--bogus" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


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


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_terminal_is_a_tqdm_bar_with_eta_and_the_lines_above_it():
    from jaxbp.cli._progress import Progress

    screen = _Terminal()
    with Progress(screen, "step") as bar:
        bar(0, 8, "compiling the training step", begin=True)
        assert "0/8 steps" in screen.getvalue() and "compiling" in screen.getvalue()
        bar(4, 8, "loss 2.0")
        bar.write("step 4/8  train loss 2.0")
        bar(8, 8, "loss 1.0")
    shown = screen.getvalue()
    assert "\r" in shown and "ETA" in shown and "elapsed" in shown  # a bar redrawn in place
    assert "8/8 steps" in shown and "100%" in shown and "loss 1.0" in shown
    assert "step 4/8  train loss 2.0\n" in shown


def test_progress_elsewhere_is_plain_lines_with_elapsed_time_and_eta():
    from jaxbp.cli._progress import Progress

    log = io.StringIO()
    bar = Progress(log, "step")  # not a terminal
    bar(2, 10, "compiling the training step", begin=True)  # a resumed run: from step 2
    bar(6, 10, "")
    bar.write("step 6/10")
    bar(8, 10, "")
    bar.write("step 8/10")
    bar(10, 10, "")
    bar.write("step 10/10")
    bar.close()
    lines = log.getvalue().splitlines()
    assert lines[0] == "compiling the training step (step 2/10) …"
    assert re.fullmatch(r"step 6/10  \[elapsed \d+:\d\d, ETA \d+:\d\d\]", lines[1]), lines
    assert re.fullmatch(r"step 10/10  \[elapsed \d+:\d\d\]", lines[3]), lines
    assert "\r" not in log.getvalue()


def test_train_on_a_terminal_shows_the_bar_and_with_json_dash_plain_lines(monkeypatch, capsys):
    args = ["train", "--sizes", "64,8,10", "--epochs", "2", "--batch-size", "512"]
    screen = _Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    assert main(args) == 0
    assert "2/2 epochs" in screen.getvalue() and "ETA" in screen.getvalue()
    monkeypatch.undo()
    assert main([*args, "--json", "-"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "compiling the epoch (epoch 0/2) …" in err
    assert re.search(r"epoch   2/2 .*\[elapsed \d+:\d\d\]", err), err


# --json places that cannot be written, for root too (which os.access says yes to): the
# kernel's process folder and sysfs refuse to create a file; a read-only file (not for root).
UNWRITABLE = ["/proc/jaxbp-out.json", "/sys/jaxbp-out.json"]


def _read_only_file(tmp_path):
    path = tmp_path / "read-only.json"
    path.write_text("{}")
    path.chmod(0o444)
    if os.access(path, os.W_OK) and os.geteuid() == 0:
        pytest.skip("root writes read-only files")
    return str(path)


@pytest.mark.parametrize("command", ["compare", "train"])
@pytest.mark.parametrize("where", [*UNWRITABLE, "read-only file"])
def test_an_unwritable_json_path_is_a_usage_error_before_any_work(
    command, where, tmp_path, capsys, monkeypatch
):
    import importlib

    path = _read_only_file(tmp_path) if where == "read-only file" else where
    if not os.path.isdir(os.path.dirname(path)):
        pytest.skip(f"no {os.path.dirname(path)} on this system")

    def no_work(args):
        raise AssertionError("the work started before --json was checked")

    monkeypatch.setattr(importlib.import_module(f"jaxbp.cli.{command}"), "run", no_work)
    with pytest.raises(SystemExit) as e:
        main([command, "--json", path])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"usage: jaxbp {command}" in err, err
    assert f"--json: cannot write {path!r}" in err and "Traceback" not in err, err


def test_checking_the_json_path_changes_nothing(tmp_path, capsys, monkeypatch):
    import jaxbp.cli.compare

    monkeypatch.setattr(jaxbp.cli.compare, "run", lambda args: 0)
    new, old = tmp_path / "new.json", tmp_path / "old.json"
    old.write_text("kept")
    before = old.stat().st_mtime_ns
    assert main(["compare", "--json", str(new)]) == 0
    assert main(["compare", "--json", str(old)]) == 0
    assert not new.exists(), "the check created the file and left it"
    assert old.read_text() == "kept" and old.stat().st_mtime_ns == before


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")
@pytest.mark.parametrize(
    ("args", "printed"),
    [
        (["compare", "--sizes", "4,5,3", "--batch", "3", "--no-fd"], "PASSED"),
        (["train", "--sizes", "64,8,10", "--epochs", "2", "--batch-size", "512"], "done in"),
    ],
    ids=lambda a: a[0] if isinstance(a, list) else None,
)
def test_a_json_write_failing_at_the_end_is_one_line_and_exit_1_after_the_results(
    args, printed, capsys
):
    # /dev/full opens like any file and fails every write: "No space left on device".
    assert main([*args, "--json", "/dev/full"]) == 1
    captured = capsys.readouterr()
    assert printed in captured.out, "the results are printed before the write"
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith(f"jaxbp {args[0]}: error: --json: could not write '/dev/full'")
    assert "No space left on device" in lines[0]


@pytest.mark.parametrize("command", ["compare", "explain", "train"])
def test_each_subcommands_help_describes_it_in_whole_sentences(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    description = capsys.readouterr().out.split("\n\n")[1]  # after the usage
    assert description.startswith(f"jaxbp {command}:") and description.endswith("."), description
