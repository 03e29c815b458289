"""Walk one attention head's backward pass: every product, every shape, the ``(t, t)`` story.

Index letters::

    t  query positions      s  key positions (t = s in a causal head)      e  head width

One head of causal self-attention, ``q, k, v (t, e)``::

    S = q·kᵀ/√e      (t, s)   "te,se->ts"     scores
    P = softmax(S)   (t, s)   row by row, masked where s > t (a query sees no later key)
    O = P·v          (t, e)   "ts,se->te"

Every row ``Pᵢ`` of ``P`` is a softmax over the ``s`` keys, so its Jacobian is the ``(s, s)``
matrix ``Jᵢ = diag(Pᵢ) − Pᵢ Pᵢᵀ``: a ``(t, s, s)`` stack for the head. The backward meets it
exactly as softmax + cross-entropy does (:mod:`jaxbp.explain`): one matrix-vector product
per row, ``dSᵢ = Jᵢ·dPᵢ``, which collapses to ``dS = P ⊙ (dP − rowsum(dP ⊙ P))`` — the same
shape as ``S``, ``(t, s)``, and no Jacobian formed.

:func:`explain_attention` computes every step in float64 with explicit products, checks them
against :func:`jaxbp.attention_bwd` and ``jax.grad`` of a plain-jnp head, and returns an
:class:`AttentionExplanation`; ``.text()`` is what ``jaxbp explain --model gpt`` prints.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._text import Step, fmt_array, fmt_shape, io_lines, jsonable
from .attention import attention_bwd, attention_fwd
from .gradcheck import x64
from .softmax import softmax_jacobian

__all__ = ["AttentionExplanation", "explain_attention"]


@dataclasses.dataclass(frozen=True)
class AttentionExplanation:
    """The result of :func:`explain_attention`.

    ``forward`` / ``backward`` are the steps; ``arrays`` the head's values (``q, k, v, S, P,
    O, dO, dV, dP, J (t, s, s), dS, dQ, dK``); ``checks`` the largest difference of each
    identity the walk claims (all at float64 round-off).
    """

    t: int
    e: int
    forward: tuple[Step, ...]
    backward: tuple[Step, ...]
    arrays: dict[str, Any]
    checks: dict[str, float]

    @property
    def passed(self) -> bool:
        """True when every identity holds to 1e-12 (relative to the largest value shown)."""
        scale = max(1.0, *(float(np.max(np.abs(a), initial=0.0)) for a in self.arrays.values()))
        return all(v <= 1e-12 * scale for v in self.checks.values())

    def to_dict(self) -> dict[str, Any]:
        return jsonable(dataclasses.asdict(self))

    def text(self) -> str:
        return _render(self)


def _head(q, k, v):
    """A plain-jnp causal head (the oracle of the walk)."""
    t, e = q.shape
    s = q @ k.T / math.sqrt(e)
    p = jax.nn.softmax(s, axis=-1, where=jnp.tril(jnp.ones((t, t), bool)))
    return p @ v


def explain_attention(t: int = 4, e: int = 3, *, seed: int = 0) -> AttentionExplanation:
    """One causal attention head's backward pass with every shape, in float64.

    Args:
      t: positions (queries = keys = ``t``).
      e: head width.
      seed: seed of ``q, k, v`` and of the upstream gradient ``dO``.

    Returns:
      An :class:`AttentionExplanation`; ``.text()`` prints the walk, ``.passed`` says that
      every identity holds.

    Example:
      >>> from jaxbp.explain_attention import explain_attention
      >>> walk = explain_attention(t=3, e=2)
      >>> walk.arrays["J"].shape, walk.passed
      ((3, 3, 3), True)
    """
    for name, value in (("t", t), ("e", e)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    with x64():
        kq, kk, kv, kg = jax.random.split(jax.random.PRNGKey(seed), 4)
        f64 = jnp.float64
        q, k, v, dO = (jax.random.normal(key, (t, e), f64) for key in (kq, kk, kv, kg))
        causal = np.tril(np.ones((t, t), bool))
        S = jnp.einsum("te,se->ts", q, k) / math.sqrt(e)  # (t, s)
        S_masked = jnp.where(causal, S, -jnp.inf)
        P = jax.nn.softmax(S_masked, axis=-1)  # (t, s), 0 above the diagonal
        O = jnp.einsum("ts,se->te", P, v)  # (t, e)

        dV = jnp.einsum("ts,te->se", P, dO)  # Pᵀ·dO
        dP = jnp.einsum("te,se->ts", dO, v)  # dO·vᵀ
        J = softmax_jacobian(S_masked)  # (t, s, s): one (s, s) Jacobian per query row
        dS_explicit = jnp.einsum("tsr,tr->ts", J, dP)  # Jᵢ·dPᵢ per row
        dS = P * (dP - jnp.sum(dP * P, axis=-1, keepdims=True))  # the collapse
        dQ = jnp.einsum("ts,se->te", dS, k) / math.sqrt(e)
        dK = jnp.einsum("ts,te->se", dS, q) / math.sqrt(e)

        # Oracles: jaxbp's own rule on the head (a leading axis of one head), and jax.grad.
        out, res = attention_fwd(q[None], k[None], v[None], None, causal=True)
        rule = attention_bwd(res, dO[None], causal=True)[:3]
        _, vjp = jax.vjp(_head, q, k, v)
        auto = vjp(dO)

        def diff(a, b):
            return float(jnp.max(jnp.abs(jnp.asarray(a) - jnp.asarray(b)), initial=0.0))

        checks = {
            "O vs jaxbp.attention_fwd": diff(O, out[0]),
            "J·dP vs P ⊙ (dP − rowsum(dP ⊙ P))": diff(dS_explicit, dS),
            "dS above the diagonal (masked)": float(jnp.max(jnp.abs(jnp.where(causal, 0, dS)))),
            "dQ vs jaxbp.attention_bwd": diff(dQ, rule[0][0]),
            "dK vs jaxbp.attention_bwd": diff(dK, rule[1][0]),
            "dV vs jaxbp.attention_bwd": diff(dV, rule[2][0]),
            "dQ, dK, dV vs jax.grad of a plain head": max(
                diff(dQ, auto[0]), diff(dK, auto[1]), diff(dV, auto[2])
            ),
        }
        arrays = {
            name: np.asarray(a, np.float64)
            for name, a in dict(q=q, k=k, v=v, S=S, P=P, O=O, dO=dO, dV=dV, dP=dP, J=J, dS=dS,
                                dQ=dQ, dK=dK).items()
        }  # fmt: skip

    te, ts = (t, e), (t, t)
    forward = (
        Step("scores S = q·kᵀ/√e", (("q", te), ("k", te)), (("S", ts),), '"te,se->ts"'),
        Step("P = softmax(S), causal", (("S", ts),), (("P", ts),), "row by row over s ≤ t"),
        Step("O = P·v", (("P", ts), ("v", te)), (("O", te),), '"ts,se->te"'),
    )
    backward = (
        Step("dV = Pᵀ·dO", (("P", ts), ("dO", te)), (("dV", te),), '"ts,te->se"'),
        Step("dP = dO·vᵀ", (("dO", te), ("v", te)), (("dP", ts),), '"te,se->ts"'),
        Step(
            "softmax: dSᵢ = Jᵢ·dPᵢ for every query row i",
            (("J = diag(P) − P Pᵀ per row", (t, t, t)), ("dP", ts)),
            (("dS", ts),),
            '"tsr,tr->ts" (a matrix-vector product per row)',
            (
                f"Each row of P is a softmax over {t} keys: its Jacobian Jᵢ is ({t}, {t}), so",
                f"the head has {t} of them, J ({t}, {t}, {t}). Jᵢ times the row dPᵢ ({t},) is a",
                f"({t},) row again: dS has the shape of S, ({t}, {t}). No shape mismatch.",
                "It collapses: Jᵢ·dPᵢ = Pᵢ ⊙ (dPᵢ − ⟨Pᵢ, dPᵢ⟩), so the rule never forms J.",
                "Masked keys have Pᵢⱼ = 0, so their row and column of Jᵢ are 0: dS is 0 there.",
            ),
        ),
        Step("dQ = dS·k/√e", (("dS", ts), ("k", te)), (("dQ", te),), '"ts,se->te"'),
        Step("dK = dSᵀ·q/√e", (("dS", ts), ("q", te)), (("dK", te),), '"ts,te->se"'),
    )
    return AttentionExplanation(t, e, forward, backward, arrays, checks)


def _render(x: AttentionExplanation) -> str:
    t, a = x.t, x.arrays
    out = [
        "One attention head's backward pass, from dO down to q, k and v",
        "=" * 62,
        f"t = {t} positions, head width e = {x.e}, causal (query i sees keys j ≤ i), float64.",
        "Index letters: t query positions, s key positions, e head width.",
        "",
        "Forward pass",
    ]
    w = max(len(s.title) for s in x.forward)
    for s in x.forward:
        out.append(f"  {s.title.ljust(w)}  {fmt_shape(s.outputs[0][1]).ljust(8)}  {s.rule}")
    out += ["  P (0 above the diagonal: the mask):", fmt_array(a["P"], "    ")]
    out += ["", "Backward pass, from the upstream gradient dO " + fmt_shape(a["dO"].shape)]
    for n, s in enumerate(x.backward, start=1):
        out.append(f"{n:2d}. {s.title}")
        out += io_lines(s, "      ")
        out.append(f"      rule {s.rule}")
        out += [f"      {note}" for note in s.notes]
        if s.title.startswith("softmax"):
            last = t - 1
            rows = [
                (f"J{last} = diag(P{last}) − P{last} P{last}ᵀ", a["J"][last]),
                (f"dP{last}", a["dP"][last]),
                (f"dS{last} = J{last}·dP{last}", a["dS"][last]),
            ]
            wl = max(len(label) for label, _ in rows)
            out.append(f"      Row {last} (the last query, which sees every key):")
            for label, arr in rows:
                out += [
                    f"        {label.ljust(wl)}  {fmt_shape(arr.shape)}",
                    fmt_array(arr, "          "),
                ]
            out += [
                "      Row 0 sees only key 0: P0 = (1, 0, …), J0 = 0, so dS0 = 0 — a query with",
                "      one visible key cannot move its own attention.",
            ]
    out += ["", "Checks (largest absolute difference)"]
    wc = max(len(k) for k in x.checks)
    out += [f"  {k.ljust(wc)}  {v:.2e}" for k, v in x.checks.items()]
    out.append("PASSED: every identity holds" if x.passed else "FAILED: an identity does not hold")
    return "\n".join(out)
