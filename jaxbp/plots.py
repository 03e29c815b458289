"""Figures of what jaxbp's tools return (matplotlib: ``pip install "jaxbp[plots]"``).

Index letters::

    n  batch      c, d  classes (d the Jacobian's columns)
    t  query positions      s  key positions (t = s in a causal head)

Each function takes a tool's result and returns a ``matplotlib.figure.Figure`` — the figure
``--plot PATH`` writes — so a notebook draws the same picture::

    explain_figure(jaxbp.explain())          the (c, c) softmax Jacobian times ∂loss/∂p (c,)
                                             is p − y (c,), for one example
    attention_figure(explain_attention())    one head: P ⊙ (dP − rowsum(dP ⊙ P)) = dS (t, s)
    train_figure(jaxbp.train.train(...))     loss and accuracy against steps (and --check)
    compare_figure(jaxbp.compare(...))       every leaf's max relative error vs its tolerance

Signed matrices use a colour map centred at 0 (blue below, red above); probabilities a
sequential one from 0 to 1; masked entries are grey. matplotlib is imported inside the
functions, never when this module loads, so ``import jaxbp`` does not import it; without it
they raise ``ImportError`` naming the ``plots`` extra.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._draw import (
    ANNOTATE_MAX,
    cell_inches,
    column_widths,
    footer,
    heat,
    new_figure,
    outline_row,
    require_matplotlib,
    row_of,
    save_figure,
    supported_formats,
    symbol,
    wrap,
)

__all__ = [
    "attention_figure",
    "compare_figure",
    "explain_figure",
    "require_matplotlib",
    "save_figure",
    "supported_formats",
    "train_figure",
]

# --------------------------------------------------------------------------- explain


def explain_figure(explanation, example: int = 0):
    """The softmax step of :func:`jaxbp.explain` for one example, as four arrays:

    ``J = diag(p) − p pᵀ (c, c)`` · ``∂loss/∂p = −y/p (c,)`` = ``J·∂loss/∂p (c,)`` =
    ``p − y (c,)``: the Jacobian met by the loss's gradient in a matrix-vector product
    (einsum ``"ncd,nd->nc"`` for the batch), which collapses to ``p − y``.

    Args:
      explanation: what :func:`jaxbp.explain` returned (``.softmax`` holds the arrays).
      example: which example of the batch, ``0 ≤ example < n``.

    Returns:
      A ``matplotlib.figure.Figure``; ``save_figure(fig, "explain.png")`` writes it.

    Example:
      >>> import jaxbp
      >>> fig = jaxbp.plots.explain_figure(jaxbp.explain())   # doctest: +SKIP
    """
    sm = explanation.softmax
    J = np.asarray(sm["jacobian"], np.float64)  # (n, c, c)
    n, c = J.shape[0], J.shape[-1]
    if not isinstance(example, int) or isinstance(example, bool) or not 0 <= example < n:
        raise ValueError(f"example: expected an int from 0 to {n - 1}, got {example!r}")
    g = np.asarray(sm["upstream"], np.float64)[example]  # ∂loss/∂p (c,)
    prod = np.asarray(sm["product"], np.float64)[example]  # J·∂loss/∂p (c,)
    pmy = np.asarray(sm["p_minus_y"], np.float64)[example]  # p − y (c,)
    p = np.asarray(sm["p"], np.float64)[example]
    label = int(sm["labels"][example])

    col, op = column_widths(c)  # a (c,) column's and an operator's width, in cells
    widths = [c, op, col, op, col, op, col]
    u = cell_inches(sum(widths), c)
    right = 1.3 if c <= ANNOTATE_MAX else 0.2  # p=…, ← label
    width = u * sum(widths) + 0.9 + right
    note, note_h = wrap(
        f"max |J·(−y/p) − (p − y)| over the batch = {sm['max_difference']:.1e}.  Training never "
        "forms J: softmax_cross_entropy_bwd returns g·(p − y).",
        width,
    )
    fig = new_figure(width, u * c + 1.45 + note_h)
    fig.get_layout_engine().set(h_pad=0.02, w_pad=0.02)
    top, foot = fig.add_gridspec(2, 1, height_ratios=[u * c + 1.2, note_h])
    aJ, s1, aG, s2, aP, s3, aY = row_of(fig, top, widths)
    title = f"J = diag(p) − p pᵀ\n(c, c) = {(c, c)}"
    heat(aJ, J[example], title, rows="c (class)", cols="d (class)")
    symbol(s1, "·", "matrix ·\nvector")
    heat(aG, g[:, None], f"∂loss/∂p = −y/p\n(c,) = ({c},)", wide=col)
    symbol(s2, "=", '"cd,d->c"')
    lim = float(np.max(np.abs(np.concatenate([prod, pmy])), initial=0.0))
    heat(aP, prod[:, None], f"J·∂loss/∂p\n(c,) = ({c},)", limit=lim, wide=col)
    symbol(s3, "=", "when\nΣ y = 1")
    heat(aY, pmy[:, None], f"p − y\n(c,) = ({c},)", limit=lim, wide=col)
    for ax in (aG, aP, aY):
        ax.set_yticks([])
    if c <= ANNOTATE_MAX:
        aY.yaxis.tick_right()
        aY.set_yticks(range(c))
        aY.set_yticklabels(
            [f"p={p[k]:.2f}" + (", y=1 ← label" if k == label else "") for k in range(c)]
        )
        aY.tick_params(labelsize=7, length=0)
    fig.suptitle(
        f"Softmax + cross-entropy backward, example {example} of n = {n} (label {label}):\n"
        f"the ({c}, {c}) Jacobian times the ({c},) gradient is a ({c},) vector, p − y",
        fontsize=10,
    )
    footer(fig, foot, note)
    return fig


def attention_figure(walk):
    """One attention head's softmax backward from :func:`explain_attention`, two rows:

    * the head: ``P (t, s) ⊙ (dP (t, s) − rowsum(dP ⊙ P) (t, 1)) = dS (t, s)``, masked keys
      (``s > t``) grey;
    * its last query row ``i = t − 1`` through the explicit Jacobian:
      ``Jᵢ = diag(Pᵢ) − Pᵢ Pᵢᵀ (s, s)`` · ``dPᵢ (s,)`` = ``dSᵢ (s,)`` — the MLP's picture.

    Args:
      walk: what :func:`jaxbp.explain_attention.explain_attention` returned.

    Returns:
      A ``matplotlib.figure.Figure``.
    """
    a = walk.arrays
    P, dP, dS, J = (np.asarray(a[k], np.float64) for k in ("P", "dP", "dS", "J"))
    t, s = P.shape
    masked = np.triu(np.ones((t, s), bool), k=1)  # key after the query
    r = np.sum(dP * P, axis=-1, keepdims=True)  # (t, 1)
    i = t - 1

    col, op = column_widths(t)
    widths = [s, op + 0.2, s, op * 0.7, col, op + 0.2, s]
    u = cell_inches(sum(widths), 2 * t)
    width = u * sum(widths) + 1.0
    note, note_h = wrap(
        f"Below: row {i} (outlined above), the last query, through its explicit Jacobian "
        f"gives row {i} of dS.  Grey: keys after the query, where P = 0, so dS = 0 "
        f"whatever dP is.\nLargest difference between J·dP and the rule: "
        f"{walk.checks['J·dP vs P ⊙ (dP − rowsum(dP ⊙ P))']:.1e}.",
        width,
    )
    fig = new_figure(width, 2 * u * t + 2.6 + note_h)
    fig.get_layout_engine().set(h_pad=0.04, w_pad=0.02)
    head, row, foot = fig.add_gridspec(3, 1, height_ratios=[u * t + 1.2, u * t + 1.2, note_h])
    lim = float(np.max(np.abs(np.concatenate([dP.ravel(), r.ravel()])), initial=0.0))
    aP, o1, adP, o2, ar, o3, adS = row_of(fig, head, widths)
    heat(aP, P, f"P = softmax(S)\n(t, s) = {(t, s)}", signed=False, mask=masked,
          rows="t (query)", cols="s (key)")  # fmt: skip
    symbol(o1, "⊙ (", "elementwise")
    heat(adP, dP, f"dP = dO·vᵀ\n(t, s) = {(t, s)}", limit=lim, cols="s")
    symbol(o2, "−")
    heat(ar, r, "rowsum(dP ⊙ P)\n(t, 1)", limit=lim, wide=col)
    symbol(o3, ") =", "broadcast\nover s")
    lim_s = float(np.max(np.abs(dS), initial=0.0))
    heat(adS, dS, f"dS\n(t, s) = {(t, s)}", mask=masked, cols="s", limit=lim_s)
    for ax in (adP, ar, adS):
        ax.set_yticks([])
    for ax, k in ((aP, s), (adP, s), (ar, 1), (adS, s)):
        outline_row(ax, i, k)

    ji, dpi, dsi = J[i], dP[i], dS[i]
    bJ, q1, bP, q2, bS = row_of(fig, row, [s, op + 0.2, col, op + 0.2, col], sum(widths))
    heat(bJ, ji, f"J{i} = diag(P{i}) − P{i} P{i}ᵀ\n(s, s) = {(s, s)}", rows="s", cols="s")
    symbol(q1, "·", "matrix ·\nvector")
    heat(bP, dpi[:, None], f"dP{i}\n(s,) = ({s},)", limit=lim, wide=col)
    symbol(q2, "=", '"sr,r->s"')
    heat(bS, dsi[:, None], f"dS{i} = J{i}·dP{i}\n(s,) = ({s},)", limit=lim_s, wide=col)
    for ax in (bP, bS):
        ax.set_yticks([])
    fig.suptitle(
        f"One causal attention head's softmax backward (t = {t}, e = {walk.e}): each row of P "
        f"is a softmax over s,\nand its ({s}, {s}) Jacobian collapses to dS = P ⊙ (dP − "
        "rowsum(dP ⊙ P))",
        fontsize=10,
    )
    footer(fig, foot, note)
    return fig


# --------------------------------------------------------------------------- training


def train_figure(result):
    """Loss (and accuracy) against steps, from :func:`jaxbp.train.train` (the digits MLP) or
    :func:`jaxbp.train_gpt.train_gpt` (the character-level GPT).

    MLP: every minibatch's training loss, each epoch's mean and the held-out loss; the
    held-out accuracy below. With ``check=True`` the ``jax.grad`` run's curves are drawn over
    the hand-written run's, and a last axes shows ``|manual − jax.grad|`` per step (log
    scale) against the check's tolerance. GPT: training loss per step and validation loss
    (nats per character), with the uniform guess ``log v`` for scale.

    Returns:
      A ``matplotlib.figure.Figure``.
    """
    if hasattr(result, "validation"):
        return _train_gpt_figure(result)
    cfg, check = result.config, result.check
    steps = np.arange(1, len(result.step_losses) + 1)
    epochs = len(result.losses)
    per_epoch = len(result.step_losses) // max(epochs, 1)
    ends = per_epoch * np.arange(1, epochs + 1)  # the step that ends each epoch
    rows = 3 if check is not None else 2
    fig = new_figure(7.5, 2.6 * rows + 0.6)
    axes = fig.subplots(rows, 1, sharex=True, height_ratios=[3, 2, 2][:rows])
    loss, acc = axes[0], axes[1]
    manual, ref = "C0", "C1"
    loss.plot(steps, result.step_losses, color=manual, lw=1.0, alpha=0.45,
              label="train, each minibatch (hand-written)")  # fmt: skip
    loss.plot(ends, result.losses, "o-", color=manual, ms=3, lw=1.2, label="train, epoch mean")
    if result.test_losses:
        loss.plot(ends, result.test_losses, "s-", color="C2", ms=3, lw=1.2,
                  label="held-out (test) loss")  # fmt: skip
    acc.plot(ends, result.test_accuracy, "s-", color="C2", ms=3, lw=1.2,
             label="held-out (test) accuracy")  # fmt: skip
    if check is not None:
        ref_steps = np.asarray(check["reference_step_losses"], np.float64)
        loss.plot(steps, ref_steps, color=ref, lw=0.8, ls=(0, (3, 3)),
                  label="train, each minibatch (jax.grad)")  # fmt: skip
        loss.plot(ends, check["reference_losses"], "x--", color=ref, ms=4, lw=1.0,
                  label="train, epoch mean (jax.grad)")  # fmt: skip
        acc.plot(ends, check["reference_test_accuracy"], "x--", color=ref, ms=4, lw=1.0,
                 label="held-out accuracy (jax.grad)")  # fmt: skip
        _difference_axes(axes[2], steps, np.asarray(result.step_losses), ref_steps, check)
    loss.set_yscale("log")
    loss.set_ylabel("mean cross-entropy (nats, log)")
    loss.legend(fontsize=7, ncol=2 if check is not None else 1)
    acc.set_ylabel("accuracy")
    acc.axhline(1.0, color="0.6", lw=0.6)
    acc.annotate(f"{result.accuracy:.4f}", (ends[-1], result.accuracy), fontsize=7,
                 xytext=(-4, -12), textcoords="offset points", ha="right")  # fmt: skip
    acc.legend(fontsize=7, loc="lower right")
    for ax in axes:
        ax.grid(True, alpha=0.3, which="both")
    axes[-1].set_xlabel(f"step (minibatches of {cfg['batch_size']}; markers: end of an epoch)")
    sizes = "-".join(map(str, cfg["sizes"]))
    extra = ""
    if cfg.get("dp_clip") is not None:
        extra = f", DP-SGD clip {cfg['dp_clip']:g} noise {cfg.get('noise', 0):g}"
    fig.suptitle(
        f"MLP {sizes} ({cfg['activation']}) on the digits, {cfg['optimizer']} lr {cfg['lr']:g}"
        f"{extra}: held-out accuracy {result.accuracy:.4f} after {epochs} epochs",
        fontsize=10,
    )
    return fig


def _difference_axes(ax, steps, a, b, check) -> None:
    """``|a − b|`` per step on a log axis, exact agreement marked, against the tolerance."""
    diff = np.abs(a - b)
    exact = diff == 0
    ax.plot(steps[~exact], diff[~exact], ".", color="C3", ms=3,
            label="|hand-written − jax.grad| per step (0 not drawn)")  # fmt: skip
    tol = check["tolerance"] * float(np.max(np.abs(b)))
    ax.axhline(tol, color="C3", ls=":", lw=1.2,
               label=f"tolerance {check['tolerance']:.0e} × max|loss| = {tol:.1e}")  # fmt: skip
    ax.set_yscale("log")
    ax.set_ylabel("|difference| (log)")
    verdict = "within" if check["passed"] else "OUTSIDE"
    ax.set_title(
        f"the two training-loss curves differ by at most {check['max_abs_difference']:.1e} "
        f"({verdict} tolerance); exactly equal at {int(exact.sum())} of {len(steps)} steps",
        fontsize=8,
    )
    ax.legend(fontsize=7, loc="center right")


def _train_gpt_figure(result):
    cfg, check = result.config, result.check
    steps = np.arange(1, len(result.step_losses) + 1)
    fig = new_figure(7.5, 4.4)
    ax = fig.subplots()
    ax.plot(steps, result.step_losses, color="C0", lw=0.6, alpha=0.4, label="train, each step")
    k = max(1, len(steps) // 50)
    if k > 1:
        smooth = np.convolve(result.step_losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, color="C0", lw=1.4, label=f"train, mean of {k} steps")
    vs, vl = zip(*result.validation, strict=True) if result.validation else ((), ())
    ax.plot(vs, vl, "s-", color="C2", ms=3.5, lw=1.2, label="validation")
    if vl:
        ax.annotate(f"{vl[-1]:.3f}", (vs[-1], vl[-1]), fontsize=7, xytext=(0, -12),
                    textcoords="offset points", ha="center")  # fmt: skip
    v = cfg.get("vocab")
    if v:
        ax.axhline(math.log(v), color="0.5", ls=":", lw=1,
                   label=f"uniform guess, log {v} = {math.log(v):.2f}")  # fmt: skip
    ax.set_xlabel(f"step ({cfg['batch_size']} sequences × {cfg['context']} characters)")
    ax.set_ylabel("cross-entropy (nats per character)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    if check is not None:
        verdict = "agree" if check["passed"] else "DISAGREE"
        ax.set_title(
            f"--check: step-0 gradients {verdict} with jax.grad, largest relative error "
            f"{check['max_rel_error']:.1e} over {check['leaves']} leaves (tolerance "
            f"{check['tolerance']:.0e})",
            fontsize=8,
        )
    fig.suptitle(
        f"GPT d={cfg['d']} heads={cfg['heads']} layers={cfg['layers']} context={cfg['context']}"
        f" on Shakespeare:\nvalidation loss {result.validation_loss:.3f} nats per character "
        f"after {len(steps)} steps",
        fontsize=10,
    )
    return fig


# --------------------------------------------------------------------------- compare


def compare_figure(reports):
    """Every leaf's max relative error against its tolerance, from :func:`jaxbp.compare`.

    One axes per check — ``jax.grad`` (with the loss), ``custom_vjp``, ``finite diff`` —
    side by side on one log scale; a dot per leaf and report, coloured by dtype, each
    dtype's tolerance a dotted line of its colour; failures are red crosses (NaN and inf
    at the right edge), exact zeros hollow dots at the left edge.

    Args:
      reports: one :class:`jaxbp.gradcheck.Report` or a sequence of them (as ``jaxbp
        compare --activation all`` makes).

    Returns:
      A ``matplotlib.figure.Figure``.
    """
    reports = [reports] if not isinstance(reports, Sequence) else list(reports)
    if not reports:
        raise ValueError("reports: expected at least one report, got none")
    checks: list[str] = []
    leaves: dict[str, list[str]] = {}
    shown: dict[tuple[str, str], str] = {}  # (check, leaf) -> its tick label, with its shape
    for rep in reports:
        for row in rep.rows:
            check = "jax.grad" if row.check == "loss" else row.check
            if check not in checks:
                checks.append(check)
            names = leaves.setdefault(check, [])
            leaf = "loss" if row.check == "loss" else row.leaf
            if leaf not in names:
                names.append(leaf)
                shape = tuple(row.shape)
                shown[check, leaf] = (
                    f"{leaf}, {shape[0]} directions" if row.check == "finite diff"
                    else f"{leaf} {shape}"
                )  # fmt: skip
    errors = [r.max_rel_error for rep in reports for r in rep.rows]
    tols = [r.tolerance for rep in reports for r in rep.rows]
    finite = [e for e in errors if math.isfinite(e)]
    floor = 10.0 ** math.floor(math.log10(min([*(e for e in finite if e > 0), *tols]) / 10))
    top = 10.0 ** math.ceil(math.log10(max([*finite, *tols]) * 3))
    dtypes = list(dict.fromkeys(rep.dtype for rep in reports))
    colour = {d: f"C{k}" for k, d in enumerate(dtypes)}
    handles: dict[str, Any] = {}
    height = 1.4 + 0.28 * max(len(v) for v in leaves.values())
    fig = new_figure(3.6 * len(checks) + 0.8, max(3.4, height + 0.3))
    axes = np.atleast_1d(fig.subplots(1, len(checks), sharex=True))
    titles = {
        "jax.grad": "jax.grad\nhand-written loop vs jax.grad of plain jnp",
        "custom_vjp": "custom_vjp\njax.grad through jaxbp's ops vs the same",
        "finite diff": "finite diff (float64)\n⟨grad, d⟩ vs central differences along d",
    }
    for ax, check in zip(axes, checks, strict=True):
        names = leaves[check]
        seen: set = set()
        for k, rep in enumerate(reports):
            rows = [r for r in rep.rows if (r.check == "loss" and check == "jax.grad")
                    or r.check == check]  # fmt: skip
            jitter = (k / max(len(reports) - 1, 1) - 0.5) * 0.5 if len(reports) > 1 else 0.0
            fd = check == "finite diff"  # always float64, whatever the dtype
            c = "0.3" if fd else colour[rep.dtype]
            for r in rows:
                y = names.index("loss" if r.check == "loss" else r.leaf) + jitter
                # NaN or inf: a failure drawn at the right edge
                x = max(r.max_rel_error, floor) if math.isfinite(r.max_rel_error) else top / 1.5
                if not r.passed:
                    ax.plot(x, y, "x", color="red", ms=8, mew=2, zorder=4)
                elif r.max_rel_error == 0:
                    ax.plot(x, y, "o", mfc="none", mec=c, ms=5, zorder=3)
                else:
                    ax.plot(x, y, "o", color=c, ms=5, zorder=3)
                    if len(reports) == 1:
                        ax.hlines(y, floor, x, color=c, lw=1.5, alpha=0.5)
                key = "float64 finite differences" if fd else rep.dtype
                if key not in seen:
                    seen.add(key)
                    handles[f"{key}: tolerance {r.tolerance:.0e}"] = ax.axvline(
                        r.tolerance, color=c, ls=":", lw=1.3
                    )
        ax.set_xscale("log")
        ax.set_xlim(floor / 2, top)
        ax.set_yticks(range(len(names)), [shown[check, leaf] for leaf in names], fontsize=8)
        ax.set_ylim(len(names) - 0.5, -0.5)
        ax.set_title(titles.get(check, check), fontsize=9)
        ax.set_xlabel("max relative error (log)", fontsize=8)
        ax.grid(True, axis="x", which="major", alpha=0.3)
        ax.tick_params(axis="x", labelsize=7)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center",
               ncol=min(4, len(handles)), fontsize=7, frameon=False)  # fmt: skip
    passed = sum(rep.passed for rep in reports)
    first = reports[0]
    model = (f"MLP {'-'.join(map(str, first.sizes))}" if first.sizes
             else first.model.split("(", 1)[0] or "model")  # fmt: skip
    if len(reports) == 1:
        config = f", {first.activation}, {first.loss}" if first.sizes else ""
        what = f"{model}{config}, {first.dtype}, batch {first.batch}"
        verdict = (f"all {len(first.rows)} checks within tolerance" if first.passed
                   else f"{len(first.failures)} of {len(first.rows)} checks FAILED")  # fmt: skip
    else:
        what = f"{model}, {len(reports)} configurations"
        verdict = f"{passed} of {len(reports)} passed"
    fig.suptitle(
        f"jaxbp compare: {what} — {verdict}\n(hollow dots: exactly 0, drawn at the left edge; "
        "errors are relative to the reference's max-abs, per leaf)",
        fontsize=9.5,
    )
    return fig
