"""The attention-head walkthrough: its identities hold, its shapes are the head's, and a wrong
attention rule shows up as a failed check."""

import numpy as np
import pytest

from jaxbp import explain_attention as walk_module
from jaxbp.explain_attention import explain_attention


@pytest.mark.parametrize(("t", "e"), [(1, 1), (4, 3), (5, 2)])
def test_every_identity_holds_and_the_jacobian_is_one_square_matrix_per_row(t, e):
    walk = explain_attention(t, e, seed=t)
    assert walk.passed, walk.checks
    a = walk.arrays
    assert a["J"].shape == (t, t, t) and a["dS"].shape == a["S"].shape == (t, t)
    assert a["dQ"].shape == a["dK"].shape == a["dV"].shape == (t, e)
    # Computed here from the arrays alone: each row's J·dP, and the mask's zeros.
    for i in range(t):
        p = a["P"][i]
        jac = np.diag(p) - np.outer(p, p)
        np.testing.assert_allclose(a["J"][i], jac, atol=1e-15)
        np.testing.assert_allclose(jac @ a["dP"][i], a["dS"][i], atol=1e-14)
    assert np.all(np.triu(a["P"], 1) == 0) and np.all(np.triu(a["dS"], 1) == 0)
    assert np.all(a["dS"][0] == 0)  # the first query sees one key: nothing to redistribute


def test_text_shows_each_step_with_its_shapes():
    text = explain_attention(4, 3).text()
    for line in ('"te,se->ts"', "J = diag(P) − P Pᵀ per row  (4, 4, 4)", "dS", "(4, 3)",
                 "PASSED"):  # fmt: skip
        assert line in text
    assert explain_attention(4, 3).to_dict()["arrays"]["J"][0][0][0] == 0.0


def test_a_wrong_attention_rule_fails_the_walk(monkeypatch):
    right = walk_module.attention_bwd

    def wrong(res, g, **kw):
        dq, dk, dv, dw = right(res, g, **kw)
        return dq, 1.01 * dk, dv, dw

    monkeypatch.setattr(walk_module, "attention_bwd", wrong)
    walk = explain_attention(4, 3)
    assert not walk.passed
    assert walk.checks["dK vs jaxbp.attention_bwd"] > 1e-6
    assert "FAILED" in walk.text()


def test_bad_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="t: expected a positive int"):
        explain_attention(0, 3)
    with pytest.raises(ValueError, match="e: expected a positive int"):
        explain_attention(3, True)
