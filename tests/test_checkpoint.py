"""Checkpoints of ``jaxbp train`` (orbax-checkpoint): a run interrupted by SIGINT, SIGTERM or
SIGKILL, or killed during a save, resumes to exactly the uninterrupted run's curve; a
half-written checkpoint is never loaded; a checkpoint of another configuration or a folder
holding none is a usage error before any work; ``jaxbp generate`` samples what the trained
parameters sample. The oracle is always the uninterrupted run (or the in-memory parameters)."""

import contextlib
import json
import os
import pathlib
import queue
import shutil
import signal
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("orbax.checkpoint")  # the `checkpoint` extra; `make test` installs it

from jaxbp import checkpoint, train, train_gpt  # noqa: E402
from jaxbp.cli import main  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKER = str(ROOT / "tests" / "ckpt_worker.py")
TINY = dict(d=16, heads=2, layers=1, context=8, batch_size=4, eval_batches=1, steps=8,
            log_every=2, sample_chars=0)  # fmt: skip
GPT_ARGS = ["--model", "gpt", *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]]
MLP = dict(sizes=(64, 16, 10), epochs=4, batch_size=256, lr=1e-2)
MLP_ARGS = ["--sizes", "64,16,10", "--epochs", "4", "--batch-size", "256", "--lr", "0.01"]


@pytest.fixture(scope="module")
def gpt_curve():
    """The uninterrupted run, without checkpoints: the oracle of every resumed GPT run."""
    return train_gpt.train_gpt(**TINY)


@pytest.fixture(scope="module")
def mlp_curve():
    return train.train(**MLP)


def _json(path) -> dict:
    return json.loads(pathlib.Path(path).read_text())


def _resume(args, tmp_path, *extra) -> dict:
    out = tmp_path / "resumed.json"
    assert main(["train", *args, "--checkpoint-dir", str(tmp_path / "ck"), "--resume",
                 "--json", str(out), *extra]) == 0  # fmt: skip
    return _json(out)


# Generous: on a machine shared by many jobs a tiny run's first compile can take minutes.
TIMEOUT = 900


@contextlib.contextmanager
def _worker(mode, n, args, tmp_path):
    """A worker running ``jaxbp train ARGS --checkpoint-dir tmp/ck``, and its stdout lines in
    a queue (read on a thread, so the test can wait for READY with a timeout); killed on the
    way out if it is still running."""
    cmd = [sys.executable, WORKER, mode, str(n), "--", *args,
           "--checkpoint-dir", str(tmp_path / "ck")]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)  # fmt: skip
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        yield proc, lines
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _wait_for(lines, word, proc, timeout=TIMEOUT):
    seen = []
    while True:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no {word} line from the worker within {timeout} s: {seen}")
        seen.append(line)
        if line.startswith(word):
            return seen


def _stderr(proc) -> str:
    """The worker's standard error once it has ended (stdout is read by the queue's thread)."""
    proc.wait(timeout=TIMEOUT)
    return proc.stderr.read()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL],
                         ids=lambda s: signal.Signals(s).name)  # fmt: skip
def test_gpt_killed_mid_run_resumes_to_the_uninterrupted_curve_exactly(signum, tmp_path, gpt_curve):
    with _worker("wait-at", 4, GPT_ARGS, tmp_path) as (proc, lines):
        _wait_for(lines, "READY", proc)  # step 4 done, its checkpoint handed to orbax
        proc.send_signal(signum)
        err = _stderr(proc)
    if signum == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:  # the pending save is finished first, then the message and 128 + signum
        assert proc.returncode == 128 + signum, err
        name = signal.Signals(signum).name
        assert f"interrupted by {name} at step 4 of 8; the last checkpoint (step 4)" in err
        assert "--resume" in err and "Traceback" not in err
    data = _resume(GPT_ARGS, tmp_path)
    # SIGKILL may have cut the save of step 4; the one of step 2 is complete by then.
    assert data["resumed_from"] in ((2, 4) if signum == signal.SIGKILL else (4,))
    assert data["step_losses"] == list(gpt_curve.step_losses)  # exactly, float32
    assert [tuple(v) for v in data["validation"]] == list(gpt_curve.validation)


def test_mlp_terminated_mid_run_resumes_to_the_uninterrupted_curve_exactly(tmp_path, mlp_curve):
    with _worker("wait-at", 2, MLP_ARGS, tmp_path) as (proc, lines):
        _wait_for(lines, "READY", proc)
        proc.send_signal(signal.SIGTERM)
        err = _stderr(proc)
    assert proc.returncode == 143 and "interrupted by SIGTERM at epoch 2 of 4" in err, err
    data = _resume(MLP_ARGS, tmp_path)
    assert data["resumed_from"] == 2
    assert data["step_losses"] == list(mlp_curve.step_losses)
    assert data["test_accuracy"] == list(mlp_curve.test_accuracy)


def test_killed_during_a_save_the_half_written_checkpoint_is_never_loaded(tmp_path, gpt_curve):
    with _worker("kill-in-save", 4, GPT_ARGS, tmp_path) as (proc, _):
        err = _stderr(proc)
    if proc.returncode == 3:
        pytest.skip("this orbax-checkpoint finalises saves in a way the worker cannot hook")
    assert proc.returncode == -signal.SIGKILL, err
    ck = tmp_path / "ck"
    left = sorted(os.listdir(ck))
    assert left == ["2", "4.orbax-checkpoint-tmp"], left  # step 4: written, never renamed
    assert os.listdir(ck / "4.orbax-checkpoint-tmp")  # its files are there, half a checkpoint
    data = _resume(GPT_ARGS, tmp_path)
    assert data["resumed_from"] == 2
    assert data["step_losses"] == list(gpt_curve.step_losses)
    assert "4.orbax-checkpoint-tmp" not in os.listdir(ck) and "4" in os.listdir(ck)


def test_a_damaged_temporary_folder_beside_complete_checkpoints_is_ignored(tmp_path, gpt_curve):
    """Without hooking orbax: a later step's temporary folder, truncated, as a kill leaves it."""
    ck = tmp_path / "ck"
    train_gpt.train_gpt(**{**TINY, "steps": 8}, checkpoint_dir=str(ck), checkpoint_every=2)
    for step in ("6", "8"):
        shutil.rmtree(ck / step)
    shutil.copytree(ck / "4", ck / "6.orbax-checkpoint-tmp")
    os.remove(ck / "6.orbax-checkpoint-tmp" / "commit_success.txt")
    for path in (ck / "6.orbax-checkpoint-tmp").rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    result = train_gpt.train_gpt(**TINY, checkpoint_dir=str(ck), checkpoint_every=2, resume=True)
    assert result.resumed_from == 4
    assert result.step_losses == gpt_curve.step_losses
    assert sorted(os.listdir(ck)) == ["4", "6", "8"]  # the damaged folder is gone, keep=3


def test_mlp_resume_may_extend_the_epochs_and_matches_the_longer_run(tmp_path, mlp_curve):
    ck = str(tmp_path / "ck")
    short = train.train(**{**MLP, "epochs": 2}, checkpoint_dir=ck)
    assert short.step_losses == mlp_curve.step_losses[: len(short.step_losses)]
    longer = train.train(**MLP, checkpoint_dir=ck, resume=True)
    assert longer.resumed_from == 2 and longer.step_losses == mlp_curve.step_losses
    for a, b in zip(jax.tree.leaves(longer.params), jax.tree.leaves(mlp_curve.params),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# -- bad input: usage errors (exit 2) before any work -------------------------------------


def _no_work(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the work started before the arguments were checked")

    for name in ("train", "train_gpt", "generate"):
        for module in ("jaxbp.cli.train", "jaxbp.cli.generate"):
            monkeypatch.setattr(f"{module}.{name}", forbidden, raising=False)


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert f"usage: jaxbp {argv[0]}" in err and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def gpt_ckpt(tmp_path_factory):
    """A folder with the tiny GPT's checkpoints at steps 4 and 8."""
    ck = tmp_path_factory.mktemp("gpt") / "ck"
    result = train_gpt.train_gpt(**TINY, checkpoint_dir=str(ck), checkpoint_every=4)
    return ck, result


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--d", "32"], "--d: the checkpoint in '{ck}' was trained with 16, this run asks for 32"),
        (["--context", "16"], "--context: the checkpoint in '{ck}' was trained with 8"),
        (["--lr", "0.01"], "--lr: the checkpoint in '{ck}' was trained with 0.003, this run "
         "asks for 0.01"),
        (["--model", "mlp"], "--model: the checkpoint in '{ck}' was trained with 'gpt', this "
         "run asks for 'mlp'"),
    ],
)  # fmt: skip
def test_resume_with_another_configuration_names_the_field_and_both_values(
    argv, needle, gpt_ckpt, capsys, monkeypatch
):
    ck, _ = gpt_ckpt
    _no_work(monkeypatch)
    base = ["--model", "gpt"] if "--model" not in argv else []
    err = _usage_error(["train", *base, *argv, "--checkpoint-dir", str(ck), "--resume"], capsys)
    assert needle.format(ck=ck) in err, err


def test_resume_fills_the_flags_not_given_from_the_checkpoint(gpt_ckpt, tmp_path):
    ck, result = gpt_ckpt
    copy = tmp_path / "ck"
    shutil.copytree(ck, copy)
    out = tmp_path / "r.json"
    assert main(["train", "--model", "gpt", "--checkpoint-dir", str(copy), "--resume",
                 "--json", str(out)]) == 0  # fmt: skip
    data = _json(out)
    assert data["config"]["d"] == 16 and data["config"]["steps"] == 8
    assert data["resumed_from"] == 8 and data["step_losses"] == list(result.step_losses)


def test_meta_is_what_it_was_when_the_save_started(tmp_path):
    """The save finishes in the background while training goes on appending to the loss
    history it was given: the checkpoint holds the history of its own step (a resume from
    it once repeated the later steps' losses)."""
    saver = checkpoint.Checkpointer(str(tmp_path / "ck"))
    history = {"step_losses": [1.0, 2.0]}
    saver.save(2, {"x": jnp.zeros(2)}, {"done": 2, "history": history})
    history["step_losses"] += [3.0, 4.0]  # the next steps, before the save has finished
    saver.close()
    assert checkpoint.read_meta(str(tmp_path / "ck"))[1]["history"] == {"step_losses": [1.0, 2.0]}


def test_a_checkpoint_of_another_vocabulary_is_refused(tmp_path, capsys, monkeypatch):
    ck = tmp_path / "ck"
    config = {**train_gpt.GPT_DEFAULTS, **TINY, "vocab": 66}
    saver = checkpoint.Checkpointer(str(ck))
    saver.save(2, {"x": jnp.zeros(2)}, {"model": "gpt", "config": config, "done": 2})
    saver.close()
    _no_work(monkeypatch)
    err = _usage_error(["train", *GPT_ARGS, "--checkpoint-dir", str(ck), "--resume"], capsys)
    assert f"vocab: the checkpoint in '{ck}' has a vocabulary of 66" in err
    with pytest.raises(checkpoint.CheckpointError, match="vocab: .* with 66, this run asks for 65"):
        train_gpt.train_gpt(**TINY, checkpoint_dir=str(ck), resume=True)


def _foreign(tmp_path, kind):
    ck = tmp_path / "ck"
    ck.mkdir()
    if kind == "a file":
        (ck / "notes.txt").write_text("not a checkpoint")
    elif kind == "a step folder of another program":
        (ck / "3").mkdir()
        (ck / "3" / "weights.bin").write_bytes(b"\0" * 16)
    elif kind == "a damaged meta item":
        (ck / "3" / "meta").mkdir(parents=True)
        (ck / "3" / "meta" / "metadata").write_text("{not json")
    return ck


@pytest.mark.parametrize(
    ("kind", "resume", "needle"),
    [
        ("empty", True, "--checkpoint-dir: no checkpoint in '{ck}'"),
        ("a file", True, "--checkpoint-dir: '{ck}' holds files that are not jaxbp checkpoints "
         "('notes.txt')"),
        ("a file", False, "holds files that are not jaxbp checkpoints ('notes.txt')"),
        ("a step folder of another program", True, "--checkpoint-dir: '{ck}/3' is not a jaxbp "
         "training checkpoint (no 'meta' item"),
        ("a damaged meta item", True, "--checkpoint-dir: '{ck}/3' is not a"),
        ("missing", True, "--checkpoint-dir: no folder '{ck}', so no checkpoint in it"),
    ],
)  # fmt: skip
def test_a_folder_with_no_checkpoint_or_foreign_files_is_a_clear_usage_error(
    kind, resume, needle, tmp_path, capsys, monkeypatch
):
    ck = tmp_path / "ck" if kind == "missing" else _foreign(tmp_path, kind)
    _no_work(monkeypatch)
    err = _usage_error(["train", *GPT_ARGS, "--checkpoint-dir", str(ck),
                        *(["--resume"] if resume else [])], capsys)  # fmt: skip
    assert needle.format(ck=ck) in err, err
    assert "orbax" not in err.replace("orbax-checkpoint", "")  # no traceback from deep inside


def test_a_new_run_into_a_folder_of_checkpoints_is_refused(gpt_ckpt, capsys, monkeypatch):
    ck, _ = gpt_ckpt
    _no_work(monkeypatch)
    err = _usage_error(["train", *GPT_ARGS, "--checkpoint-dir", str(ck)], capsys)
    assert f"'{ck}' already holds checkpoints (the latest at step 8)" in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--resume"], "--resume: needs --checkpoint-dir DIR"),
        (["--keep", "2"], "--keep: needs --checkpoint-dir DIR"),
        (["--checkpoint-every", "2"], "--checkpoint-every: needs --checkpoint-dir DIR"),
        (["--keep", "0", "--checkpoint-dir", "x"], "--keep: expected a positive integer"),
        (["--max-nonfinite", "0"], "--max-nonfinite: expected a positive integer"),
    ],
)
def test_checkpoint_flags_without_a_folder_or_out_of_range_are_usage_errors(
    argv, needle, capsys, monkeypatch
):
    _no_work(monkeypatch)
    assert needle in _usage_error(["train", *argv], capsys)


def test_gpt_checkpoint_every_must_end_a_stretch(tmp_path, capsys, monkeypatch):
    _no_work(monkeypatch)
    err = _usage_error(["train", *GPT_ARGS, "--checkpoint-dir", str(tmp_path / "ck"),
                        "--checkpoint-every", "3"], capsys)  # fmt: skip
    assert "--checkpoint-every: expected a positive multiple of log_every = 2" in err


def test_mlp_resume_with_fewer_epochs_than_done_is_a_usage_error(tmp_path, capsys, monkeypatch):
    ck = str(tmp_path / "ck")
    train.train(**{**MLP, "epochs": 2}, checkpoint_dir=ck)
    _no_work(monkeypatch)
    err = _usage_error(["train", *MLP_ARGS[:-4], "--epochs", "1", "--checkpoint-dir", ck,
                        "--resume"], capsys)  # fmt: skip
    assert "--epochs: the checkpoint in" in err and "is at epoch 2, this run asks for 1" in err


@pytest.mark.parametrize("command", ["train", "generate"])
def test_without_orbax_checkpoint_dir_is_a_usage_error_naming_the_extra(
    command, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)  # `import` now fails
    _no_work(monkeypatch)
    err = _usage_error([command, "--checkpoint-dir", str(tmp_path / "ck")], capsys)
    assert "--checkpoint-dir: checkpoints need orbax-checkpoint" in err
    assert 'pip install "jaxbp[checkpoint]"' in err


# -- jaxbp generate -------------------------------------------------------------------------


def test_generate_samples_what_the_trained_parameters_sample(gpt_ckpt, capsys):
    ck, result = gpt_ckpt
    argv = ["generate", "--checkpoint-dir", str(ck), "--prompt", "ROMEO:", "--chars", "12",
            "--temperature", "0.7", "--seed", "3", "--json", "-"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    text = train_gpt.load_shakespeare()
    model = train_gpt.check_config({**train_gpt.GPT_DEFAULTS, **TINY})
    ids = model.generate(result.params, jax.random.PRNGKey(3), text.encode("ROMEO:"), 12,
                         temperature=0.7)  # fmt: skip
    assert data["text"] == text.decode(ids[6:]) and len(data["text"]) == 12
    assert data["step"] == 8 and data["prompt"] == "ROMEO:"
    assert "ROMEO:" + data["text"] in captured.err  # the text, on stderr with --json -


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--prompt", "ROMEO é"], "--prompt: characters ['é'] are not in the vocabulary"),
        (["--prompt", ""], "--prompt: expected at least one character"),
        (["--chars", "-1"], "--chars: expected an integer ≥ 0"),
        (["--temperature", "0"], "--temperature: expected a finite number > 0"),
    ],
)
def test_generate_bad_values_are_usage_errors(argv, needle, gpt_ckpt, capsys, monkeypatch):
    ck, _ = gpt_ckpt
    _no_work(monkeypatch)
    assert needle in _usage_error(["generate", "--checkpoint-dir", str(ck), *argv], capsys)


def test_generate_from_an_mlp_checkpoint_or_an_empty_folder_is_a_usage_error(
    tmp_path, capsys, monkeypatch
):
    ck = tmp_path / "mlp"
    train.train(**{**MLP, "epochs": 1}, checkpoint_dir=str(ck))
    (tmp_path / "empty").mkdir()
    _no_work(monkeypatch)
    err = _usage_error(["generate", "--checkpoint-dir", str(ck)], capsys)
    assert "holds a checkpoint of --model mlp; generate samples from a GPT" in err
    err = _usage_error(["generate", "--checkpoint-dir", str(tmp_path / "empty")], capsys)
    assert "--checkpoint-dir: no checkpoint in" in err
