"""``jaxbp train --model gpt`` and ``jaxbp explain --model gpt``: they run, check, write JSON;
flags of the other model and bad values are usage errors before any work."""

import json

import pytest

import jaxbp
from jaxbp import train_gpt
from jaxbp.cli import main

TINY = ["--d", "16", "--heads", "2", "--layers", "1", "--context", "8", "--batch-size", "4",
        "--eval-batches", "1"]  # fmt: skip


def test_train_gpt_runs_checks_and_writes_json_to_stdout(capsys):
    status = main(["train", "--model", "gpt", *TINY, "--steps", "4", "--log-every", "2",
                   "--sample-chars", "10", "--check", "--json", "-"])  # fmt: skip
    captured = capsys.readouterr()
    data = json.loads(captured.out)  # stdout holds the JSON alone
    assert status == 0
    assert len(data["step_losses"]) == 4 and [v[0] for v in data["validation"]] == [2, 4]
    assert len(data["sample"]) == 10 and data["check"]["passed"]
    assert data["config"]["d"] == 16 and data["config"]["num_params"] > 0
    assert "check at step 0" in captured.err and "validation loss" in captured.err


def test_a_wrong_backward_rule_fails_the_step_0_check(monkeypatch):
    right = jaxbp.attention.bwd

    def wrong(res, g, **kw):
        dq, dk, dv, dw = right(res, g, **kw)
        return dq, dk, 1.01 * dv, dw

    # The loop reads the rule from the op object; its compiled step is keyed on the rules,
    # so no cache needs clearing for the wrong rule to be traced.
    monkeypatch.setattr(jaxbp.attention, "bwd", wrong)
    tiny = dict(d=8, heads=2, layers=1, context=4, batch_size=2, steps=1, log_every=1)
    result = train_gpt.train_gpt(**tiny, eval_batches=1, sample_chars=0, check=True)
    assert not result.check["passed"]
    assert result.check["max_rel_error"] > 1e-3  # dv feeds every parameter below it


def _no_work(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the work started before the arguments were checked")

    # The CLI imported both by name: patch them where it looks them up.
    monkeypatch.setattr("jaxbp.cli.train.train_gpt", forbidden)
    monkeypatch.setattr("jaxbp.cli.train.train", forbidden)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--model", "gpt", "--sizes", "64,10"], "--sizes: only for --model mlp"),
        (["--model", "gpt", "--epochs", "3"], "--epochs: only for --model mlp"),
        (["--model", "gpt", "--noise", "1"], "--noise"),
        (["--steps", "3"], "--steps: only for --model gpt"),
        (["--model", "mlp", "--context", "8"], "--context: only for --model gpt"),
        (["--model", "gpt", "--steps", "0"], "--steps"),
        (["--model", "gpt", "--temperature", "0"], "--temperature"),
        (["--model", "gpt", "--warmup", "-1"], "--warmup"),
        (["--model", "gpt", "--d", "16", "--heads", "3"], "heads"),
        (["--model", "transformer"], "--model"),
    ],
)
def test_flags_of_the_other_model_and_bad_values_are_usage_errors(argv, needle, capsys,
                                                                   monkeypatch):  # fmt: skip
    _no_work(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "usage: jaxbp train" in err and "Traceback" not in err


def test_explain_gpt_walks_one_head_and_refuses_mlp_flags(capsys):
    assert main(["explain", "--model", "gpt", "--positions", "3", "--head-dim", "2"]) == 0
    out = capsys.readouterr().out
    assert "J = diag(P) − P Pᵀ per row  (3, 3, 3)" in out and "PASSED" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", "--model", "gpt", "--full-jacobian"])
    assert exit_info.value.code == 2
    assert "--full-jacobian: not for --model gpt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["explain", "--positions", "3"])
    assert "--positions: not for --model mlp" in capsys.readouterr().err


def test_train_gpt_with_dropout_runs_checks_and_records_the_rate(capsys):
    status = main(["train", "--model", "gpt", *TINY, "--steps", "2", "--log-every", "2",
                   "--sample-chars", "0", "--dropout", "0.2", "--check",
                   "--json", "-"])  # fmt: skip
    data = json.loads(capsys.readouterr().out)
    assert status == 0 and data["check"]["passed"]
    assert data["config"]["dropout"] == 0.2


def test_dropout_on_a_mesh_and_bad_rates_are_errors_before_any_work(capsys, monkeypatch):
    _no_work(monkeypatch)
    with pytest.raises(ValueError, match="dropout: the mesh step"):
        train_gpt.check_config({**train_gpt.GPT_DEFAULTS, "dropout": 0.1}, {"data": 2})
    with pytest.raises(ValueError, match=r"dropout: expected a rate in \[0, 1\)"):
        train_gpt.check_config({**train_gpt.GPT_DEFAULTS, "dropout": 1.0})
    for bad in ("1", "-0.1", "nan"):
        with pytest.raises(SystemExit):
            main(["train", "--model", "gpt", "--dropout", bad])
        assert "--dropout" in capsys.readouterr().err
