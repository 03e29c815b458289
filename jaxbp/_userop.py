"""``jaxbp.Op``: an op on jaxbp's contract built from a user's rules (:mod:`jaxbp._op` holds
the contract, the registries and the built-in ops' ``declare``; this is the user's side of
it, registered there so that its rules key the transforms' compiled steps)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from . import _contract
from ._op import (
    _USER_OPS,
    CURVATURE_RULES,
    _check_example_ndim,
    _check_per_example,
    _user_count,
    op_vjp,
    positional_names,
)

__all__ = ["Op"]


class Op:
    """An op on jaxbp's contract, built from your ``fwd``, ``bwd`` and ``reference``.

    Args:
      fwd: ``fwd(*args, **options) -> (out, res)``.
      bwd: ``bwd(res, g, **options) -> tuple`` of one cotangent per positional argument.
      reference: ``reference(*args, **options)``, plain ``jax.numpy``; its signature is the
        op's (positional parameter names name the arguments in reports and errors).
      name: the op's name (in jaxprs, reports, error messages); default ``reference``'s.
      per_example: names of the positional parameters that carry the batch (one row per
        example, ``(n..., k)``); the others are parameters shared by all examples. Default:
        the first positional parameter only.
      options: the keyword options and their defaults, e.g. ``{"scale": 1.0}``: static
        (hashable; each value compiles anew) unless named in ``traced_options``.
      example_ndim: trailing axes per example of the first per-example argument (default 1).
      example_grads: the per-example rule, for an op with parameters used inside a model
        (per-example gradients, their norms, DP-SGD): ``example_grads(res, g, *, examples,
        **options)`` → ``{parameter name: contribution}`` (``jaxbp.per_example.Outer``,
        ``Rows``, ``OneHot``, ``Full``); see docs/per_example.md. Without it, a per-example
        transform that meets the op raises a ``TypeError`` naming it.
      traced_options: the options the rules take as traced values (numbers that only scale
        values, as the built-in ops' ``label_smoothing``): a new value compiles nothing new,
        and a value traced under ``jit`` is accepted (a static option refuses one).
      jvp: the forward-mode rule ``jvp(res, tangents, **options) -> tangent``: from ``fwd``'s
        residuals and one tangent per positional argument (``None`` for an integer one), the
        output's tangent, linear in the tangents. With it, ``jaxbp.forward_mode.of(op)`` runs
        under ``jax.jvp``/``jacfwd``/``hessian``, :func:`jaxbp.check` checks it and
        ``jaxbp.jacobian(op, ..., mode="fwd")`` builds Jacobians from it; without it
        ``op.jvp`` is ``None``.
      curvature: for a loss, its curvature rules at the logits, ``{"ggn_vp": ...,
        "hessian_factor": ..., "logits_bwd": ..., "sample_bwd": ..., "sample_logits": ...}``
        (any of them; the signatures of :mod:`jaxbp._losscurv`), jitted like ``fwd`` and
        ``bwd`` and carried as ``op.ggn_vp``, …; ``None`` for each one not given.

    A rule that breaks the contract is an error naming the op, the rule, what was expected
    and what came (:mod:`jaxbp._contract`): a signature that cannot take the op's arguments
    and options, here; a traced value for a static option, at the call; a ``fwd`` that does
    not return ``(out, res)``, a ``bwd`` that does not return one cotangent per positional
    argument of that argument's shape and dtype, a ``jvp`` that does not return one array of
    the output's shape and dtype, when JAX first traces them.

    Calling ``op(*args, **options)`` runs a ``jax.custom_vjp``: ``jax.grad``, ``jax.vjp`` and
    everything built on them run your ``bwd``; ``jax.jit`` and ``jax.vmap`` compose.
    ``op.fwd``/``op.bwd`` are the jitted rules (options filled with their defaults),
    ``op.reference`` the plain twin; the op carries the same attributes as jaxbp's own ops
    (:data:`OP_ATTRIBUTES`), so :func:`jaxbp.jacobian` and :func:`jaxbp.check` accept it.

    Example (squared ReLU, saving its input)::

      >>> import jax, jax.numpy as jnp, jaxbp
      >>> sqrelu = jaxbp.Op(
      ...     fwd=lambda z: (jnp.maximum(z, 0) ** 2, (z,)),
      ...     bwd=lambda res, g: (2 * g * jnp.maximum(res[0], 0),),
      ...     reference=lambda z: jnp.maximum(z, 0) ** 2,
      ...     name="sqrelu",
      ... )
      >>> jax.grad(lambda z: sqrelu(z).sum())(jnp.array([-1.0, 3.0])).tolist()
      [0.0, 6.0]
    """

    def __init__(
        self,
        fwd: Callable,
        bwd: Callable,
        reference: Callable,
        *,
        name: str | None = None,
        per_example: Sequence[str] | None = None,
        options: dict[str, Any] | None = None,
        example_ndim: int = 1,
        example_grads: Callable | None = None,
        traced_options: Sequence[str] = (),
        jvp: Callable | None = None,
        curvature: Mapping[str, Callable] | None = None,
    ):
        for what, fn in (("fwd", fwd), ("bwd", bwd), ("reference", reference)):
            if not callable(fn):
                raise TypeError(f"{what}: expected a callable, got {fn!r}")
        for what, fn in (("example_grads", example_grads), ("jvp", jvp)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{what}: expected a callable rule or None, got {fn!r}")
        self.name = str(name or getattr(reference, "__name__", "op"))
        self.__name__ = self.__qualname__ = self.name
        self.__doc__ = getattr(reference, "__doc__", None) or f"The user op {self.name!r}."
        self.__signature__ = inspect.signature(reference)
        self.__wrapped__ = reference
        names = positional_names(reference)
        if not names:
            raise ValueError("reference: expected positional parameters (the op's arguments)")
        per_example = (names[0],) if per_example is None else tuple(per_example)
        _check_per_example(self.name, names, per_example)
        self.arg_names = names
        self.per_example_args = per_example
        self.example_ndim = _check_example_ndim(example_ndim)
        self.example_grads = example_grads
        self.defaults = dict(options or {})
        for key, value in self.defaults.items():
            try:
                hash(value)
            except TypeError:
                raise TypeError(
                    f"options: {key!r} must be hashable (static); arrays are positional "
                    f"arguments, got {type(value).__name__}"
                ) from None
        self.traced_options = tuple(traced_options)
        _contract.check_signatures(
            self.name, fwd, bwd, reference, names, self.defaults, self.traced_options, jvp
        )
        static = tuple(k for k in self.defaults if k not in self.traced_options)
        self._fwd = jax.jit(_named(fwd, self.name + "_fwd"), static_argnames=static)
        self._bwd = jax.jit(_named(bwd, self.name + "_bwd"), static_argnames=static)
        self._jvp = None if jvp is None else jax.jit(_named(jvp, self.name + "_jvp"),
                                                     static_argnames=static)  # fmt: skip
        self.jvp = None if jvp is None else self._jvp_rule
        self.reference = reference
        curvature = _contract.check_curvature(curvature, CURVATURE_RULES)
        for rule_name in CURVATURE_RULES:
            rule = curvature.get(rule_name)
            if rule is not None:
                rule = self._with_options(
                    jax.jit(_named(rule, f"{self.name}_{rule_name}"), static_argnames=static)
                )
            setattr(self, rule_name, rule)
        self._core = op_vjp(self)  # reads self.fwd / self.bwd (self.jvp) when traced
        _USER_OPS[next(_user_count)] = self  # its rules key the transforms' compiled steps

    def _options(self, options: dict) -> dict:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise TypeError(
                f"{self.name}: unexpected option(s) {unknown}; options are {list(self.defaults)}"
            )
        options = {**self.defaults, **options}
        _contract.check_options(self.name, options, self.traced_options)
        return options

    def __call__(self, *args, **options):
        opts = self._options(options)
        if len(args) != len(self.arg_names):
            raise TypeError(
                f"{self.name}: expected {len(self.arg_names)} positional arguments "
                f"{self.arg_names}, got {len(args)}"
            )
        return self._core(*args, **opts)

    def _with_options(self, rule: Callable) -> Callable:
        """``rule`` called with the op's options filled in and checked."""

        def call(*args, **options):
            return rule(*args, **self._options(options))

        call.__name__ = call.__qualname__ = rule.__name__
        return call

    def fwd(self, *args, **options):
        """The jitted forward rule: ``(out, res)``."""
        return self._fwd(*args, **self._options(options))

    def bwd(self, res, g, **options):
        """The jitted backward rule: one cotangent per positional argument."""
        cts = self._bwd(res, g, **self._options(options))
        return _contract.check_count(self.name, cts, self.arg_names)

    def _jvp_rule(self, res, tangents, **options):
        """The jitted forward-mode rule (``op.jvp``): the output's tangent."""
        tangents = _contract.check_tangent_count(self.name, tangents, self.arg_names)
        return self._jvp(res, tangents, **self._options(options))

    @property
    def batched(self) -> tuple[bool, ...]:
        """Per positional argument: True when it is per-example (see ``per_example``)."""
        return tuple(n in self.per_example_args for n in self.arg_names)

    def __repr__(self) -> str:
        return f"jaxbp.Op({self.name!r}, args={self.arg_names}, options={self.defaults})"


def _named(fn: Callable, name: str) -> Callable:
    """``fn`` under a name JAX shows in jaxprs and profiles (a lambda would show '<lambda>')."""

    def rule(*args, **kwargs):
        return fn(*args, **kwargs)

    rule.__name__ = rule.__qualname__ = name
    return rule
