"""Benchmarks and health checks behind the ``anyattn`` command line.

    anyattn doctor           environment, every backend vs the float64 oracle, a speed probe
    anyattn bench kernels    variants x modes x dtypes x backends, anyattn next to raw torch calls

Modules: ``cases`` (variants as Configs, inputs, the one FLOP formula), ``timing`` (the one
timing function), ``raw`` (the raw torch calls anyattn is compared with), ``kernels`` (the
matrix runner), ``report`` (table, JSON, CSV, Markdown, plot), ``doctor``. See docs/benchmarks.md.
"""


class UsageError(ValueError):
    """A bad command-line option or sweep file; the CLI prints it and exits with status 2."""
