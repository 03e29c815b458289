"""jaxbp.explain: the walk's shapes, the Jacobian identities, the elementwise case, the text."""

import json

import jax
import numpy as np
import pytest

import jaxbp
from jaxbp.cli import main


@pytest.fixture(scope="module")
def default():
    return jaxbp.explain(full_jacobian=True)


def test_forward_and_backward_shapes_of_the_default_network(default):
    e = default
    assert e.sizes == (4, 5, 3) and e.batch == 2 and e.dtype == "float64"
    forward = [s.outputs[0][1] for s in e.forward]
    assert forward == [(2, 4), (2, 5), (2, 5), (2, 3), (2, 3), (2,), ()]
    steps = {s.title.split(":")[0]: s for s in e.backward}
    assert list(steps) == [
        "mean over the batch", "cross-entropy", "softmax", "dense 2", "relu",
        "dense 1 (the first layer)",
    ]  # fmt: skip
    assert dict(steps["softmax"].inputs)["J = diag(p) − p pᵀ"] == (2, 3, 3)
    assert dict(steps["softmax"].inputs)["∂L/∂p"] == (2, 3)
    assert steps["softmax"].outputs[0][1] == (2, 3)
    assert "ncd,nd->nc" in steps["softmax"].rule
    assert dict(steps["dense 2"].outputs) == {"∂L/∂W2": (5, 3), "∂L/∂b2": (3,), "∂L/∂a1": (2, 5)}
    assert dict(steps["dense 1 (the first layer)"].outputs) == {"∂L/∂W1": (4, 5), "∂L/∂b1": (5,)}
    assert "ni,no->io" in steps["dense 2"].rule and "no,io->ni" in steps["dense 2"].rule


def test_softmax_step_jacobian_times_upstream_is_p_minus_y(default):
    sm = default.softmax
    p, y = np.asarray(sm["p"]), np.asarray(sm["y"])
    J = np.asarray(sm["jacobian"])
    assert J.shape == (2, 3, 3) and np.asarray(sm["upstream"]).shape == (2, 3)
    # Independent of the code under test: the Jacobian formula and the product.
    expected_J = np.stack([np.diag(pn) - np.outer(pn, pn) for pn in p])
    np.testing.assert_allclose(J, expected_J, atol=1e-15)
    np.testing.assert_allclose(sm["upstream"], -y / p, atol=1e-15)
    np.testing.assert_allclose(sm["product"], np.einsum("ncd,nd->nc", J, -y / p), atol=1e-15)
    np.testing.assert_allclose(sm["p_minus_y"], p - y, atol=0)
    assert sm["max_difference"] <= 1e-15
    assert sm["jacobian_from_softmax_bwd_max_difference"] <= 1e-15
    np.testing.assert_allclose(sm["delta"], (p - y) / 2, atol=1e-15)  # g = 1/n
    assert sm["labels"] == np.argmax(y, axis=-1).tolist()


def test_every_gradient_of_the_walk_matches_jax_grad(default):
    assert set(default.gradient_check) == {"W1", "b1", "W2", "b2"}
    assert max(default.gradient_check.values()) <= 1e-14


def test_elementwise_case_sigmoid_jacobian_is_diagonal_softmax_is_not(default):
    el = default.elementwise
    J = np.asarray(el["sigmoid_jacobian"])
    assert J.shape == (2, 3, 3)
    assert el["sigmoid_off_diagonal_max_abs"] == 0.0
    np.testing.assert_allclose(el["sigmoid_diagonal"], el["sigmoid_prime"], atol=1e-16)
    assert el["sigmoid_max_difference"] <= 1e-16
    # For softmax the elementwise product differs from J·g by far more than round-off.
    assert el["softmax_max_difference"] > 0.1
    assert el["softmax_p_minus_y_max_difference"] <= 1e-15
    wrong, right = np.asarray(el["softmax_elementwise"]), np.asarray(el["softmax_matvec"])
    np.testing.assert_allclose(right, np.asarray(default.softmax["p_minus_y"]), atol=1e-15)
    assert not np.allclose(wrong, right)


def test_full_jacobian_route_equals_the_fused_rules(default):
    fj = default.full_jacobian
    shapes = dict((k, tuple(s)) for k, s in fj["jacobians"])
    assert shapes["∂p/∂z (softmax)"] == (2, 3, 3)
    assert shapes["∂z2/∂W2"] == (2, 3, 5, 3) and shapes["∂a1/∂z1"] == (2, 5, 5)
    assert fj["entries"] == sum(int(np.prod(s)) for s in shapes.values())
    assert max(fj["max_difference"].values()) <= 1e-14


def test_text_shows_shapes_as_tuples_and_the_answer(default):
    text = default.text()
    for piece in ("(2, 5)", "(2, 3, 3)", "(2,)", '"ncd,nd->nc"', "p − y", "diag(J)", ".*",
                  "Full-Jacobian route", "not computed"):  # fmt: skip
        assert piece in text, piece
    assert "nan" not in text.lower()


def test_deeper_network_and_other_activation():
    e = jaxbp.explain((3, 4, 6, 2), batch=3, activation="tanh", seed=1)
    titles = [s.title for s in e.backward]
    assert sum(t.startswith("tanh") for t in titles) == 2
    assert sum(t.startswith("dense") for t in titles) == 3
    assert e.softmax["jacobian"].shape == (3, 2, 2)
    assert max(e.gradient_check.values()) <= 1e-14 and e.full_jacobian is None


def test_to_dict_is_json(default):
    d = json.loads(json.dumps(default.to_dict()))
    assert d["sizes"] == [4, 5, 3]
    assert np.asarray(d["softmax"]["jacobian"]).shape == (2, 3, 3)
    assert d["backward"][2]["inputs"][0][1] == [2, 3, 3]


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="batch"):
        jaxbp.explain(batch=0)
    with pytest.raises(ValueError, match="activation"):
        jaxbp.explain(activation="mish")


def test_cli_explain_with_json(tmp_path, capsys):
    path = tmp_path / "explain.json"
    assert main(["explain", "--full-jacobian", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "softmax: δ2 = J·∂L/∂p" in out and "(2, 3, 3)" in out
    assert json.loads(path.read_text())["full_jacobian"]["entries"] > 0
    assert jax.config.jax_enable_x64


def test_full_jacobian_refuses_sizes_whose_jacobians_would_not_fit():
    from jaxbp.explain import FULL_JACOBIAN_MAX_BYTES, full_jacobian_bytes

    need, name, shape = full_jacobian_bytes((64, 256, 256, 10), 64)
    # By hand: ∂z2/∂W2 alone is 64·256·256·256 float64 entries = 8 GiB.
    assert (name, shape) == ("∂z2/∂W2", (64, 256, 256, 256))
    assert need > 64 * 256**3 * 8 > FULL_JACOBIAN_MAX_BYTES
    with pytest.raises(ValueError, match=r"full_jacobian: .*would need 10\.2 GiB"):
        jaxbp.explain((64, 256, 256, 10), 64, full_jacobian=True)
    small, _, _ = full_jacobian_bytes((4, 5, 3), 2)
    # (2,3,3) + (2,3,5,3) + (2,3,3) + (2,3,5) + (2,5,5) + (2,5,4,5) + (2,5,5) entries
    assert small == 8 * (18 + 90 + 18 + 30 + 50 + 200 + 50)


def test_full_jacobian_size_estimate_counts_exactly_the_jacobians_formed(default):
    from jaxbp.explain import full_jacobian_bytes

    need, _, _ = full_jacobian_bytes(default.sizes, default.batch)
    assert need == 8 * default.full_jacobian["entries"]
