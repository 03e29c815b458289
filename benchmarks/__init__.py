"""jaxbp's benchmark suite: ``python -m benchmarks`` (see ``benchmarks/README.md``).

Cases live in ``benchmarks/cases_*.py`` and register themselves with
:func:`benchmarks.harness.register`; the harness times them side by side (docs/performance.md).
"""
