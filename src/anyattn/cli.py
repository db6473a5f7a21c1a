"""The ``anyattn`` command line.

    anyattn doctor [--json PATH] [--backend NAME ...] [--device cuda|cpu] [--full]
    anyattn bench kernels [--preset h200 | --quick] [--variants ...] [--out DIR] ...
    python -m anyattn ...            (the same)

Exit status: 0 on success; 1 when a check or a benchmark row failed (wrong numbers, an
unexpected exception) or a backend asked for with ``--backend`` is unavailable; 2 on a bad
option. ``bench`` subcommands are modules ``anyattn.bench.<name>`` exposing ``HELP``,
``add_arguments(parser)`` and ``run_from_args(args, command) -> int``; ``kernels`` is always
there, other names in ``_BENCH`` are listed when their module exists.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import shlex
import sys

__all__ = ["main"]

_BENCH = ("kernels", "model")


def _bench_modules() -> dict:
    mods = {}
    for name in _BENCH:
        modname = f"anyattn.bench.{name}"
        if importlib.util.find_spec(modname) is None:
            continue
        mod = importlib.import_module(modname)
        if hasattr(mod, "add_arguments") and hasattr(mod, "run_from_args"):
            mods[name] = mod
    return mods


def build_parser(prog: str = "anyattn") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="anyattn: one attention call over every PyTorch attention backend."
    )
    sub = p.add_subparsers(dest="command", metavar="{doctor,bench,embed}")

    d = sub.add_parser("doctor", help="environment, backends, correctness vs the float64 oracle, a speed probe")
    from .bench import doctor

    doctor.add_arguments(d)
    d.set_defaults(func=lambda a, cmd: doctor.run_from_args(a, cmd))

    b = sub.add_parser("bench", help="benchmarks (see docs/benchmarks.md)")
    bsub = b.add_subparsers(dest="bench_command", metavar="{" + ",".join(_bench_modules()) + "}")
    for name, mod in _bench_modules().items():
        bp = bsub.add_parser(name, help=getattr(mod, "HELP", None), description=getattr(mod, "HELP", None))
        mod.add_arguments(bp)
        bp.set_defaults(func=lambda a, cmd, _m=mod: _m.run_from_args(a, cmd))
    b.set_defaults(func=None, _bench_parser=b)
    from .embed.cli import add_parser as add_embed

    add_embed(sub)
    return p


def main(argv=None, prog: str = "anyattn") -> int:
    """Entry point of the ``anyattn`` script and ``python -m anyattn``; returns the exit status."""
    from .bench import UsageError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed the usage error (or --help)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.func is None:  # "anyattn bench" without a subcommand
        args._bench_parser.print_help(sys.stderr)
        return 2
    command = " ".join([prog, shlex.join(argv)]).strip()
    try:
        return int(args.func(args, command))
    except UsageError as e:
        sub = args.command + (f" {args.bench_command}" if getattr(args, "bench_command", None) else "")
        print(f"{prog} {sub}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
