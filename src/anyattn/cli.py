"""The ``anyattn`` command line.

    anyattn [--debug] doctor [--json PATH] [--backend NAME ...] [--device cuda|cpu] [--full]
    anyattn [--debug] bench kernels [--preset h200 | --quick] [--variants ...] [--out DIR] ...
    anyattn [--debug] embed INPUT.fasta --model PATH_OR_REPO --out OUT ...
    python -m anyattn ...            (the same)

Exit status: 0 on success; 2 on bad input (a bad option, an unreadable or malformed input file, a
model path that is not a checkpoint, a store of other settings); 1 when the run failed (a check or
a benchmark row failed, a backend asked for with ``--backend`` is unavailable, the disk filled up,
a worker died, an optional package is missing); 130 when interrupted. Every error is one line on
stderr naming the file or option, what was expected and what came; ``--debug`` adds the
traceback.

``anyattn --help`` and every sub-command's ``--help`` need torch only: a sub-command whose optional
packages are missing is still listed, and running it says which ``pip install 'anyattn[...]'``
to run. ``bench`` subcommands are modules ``anyattn.bench.<name>`` exposing ``HELP``,
``add_arguments(parser)`` and ``run_from_args(args, command) -> int``; ``kernels`` is always
there, other names in ``_BENCH`` are listed when their module exists.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import shlex
import sys
import traceback

__all__ = ["main"]

_BENCH = ("kernels", "model", "serving")
# optional package (import name) -> the extra that installs it (pyproject.toml)
_EXTRA_OF = {
    "transformers": "models", "safetensors": "models", "huggingface_hub": "models", "numpy": "embed",
    "matplotlib": "bench", "yaml": "bench", "tqdm": "cli", "peft": "test", "hypothesis": "test",
}  # fmt: skip


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error printed as one line (the option, what was wrong, where to
    look) instead of the usage block followed by the error."""

    def error(self, message):  # noqa: D102 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _missing_extra_message(e: ImportError) -> str:
    """The ImportError's message, with the pip command when it does not name one."""
    msg = str(e)
    if "pip install" in msg:
        return msg
    top = (getattr(e, "name", None) or "").split(".")[0]
    extra = _EXTRA_OF.get(top)
    return f"{msg}: pip install 'anyattn[{extra}]'" if extra else msg


def _unavailable(sub, name: str, help_: str | None, why: str) -> None:
    """List ``name`` although its optional packages are missing: its --help says so, running it
    fails with ``why`` (which names the pip command)."""
    text = f"{help_ + ' ' if help_ else ''}[not installed here: {why}]"
    bp = sub.add_parser(name, help=text, description=text)

    def run(args, command, _why=why):
        raise ImportError(_why)

    bp.set_defaults(func=run, _takes_any=True)  # its real options are unknown here: any are taken


def _add_bench(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks (see docs/benchmarks.md)")
    names = [n for n in _BENCH if importlib.util.find_spec(f"anyattn.bench.{n}") is not None]
    bsub = b.add_subparsers(dest="bench_command", metavar="{" + ",".join(names) + "}", parser_class=_Parser)
    for name in names:
        try:
            mod = importlib.import_module(f"anyattn.bench.{name}")
        except ImportError as e:  # the module itself needs an optional package
            _unavailable(bsub, name, None, _missing_extra_message(e))
            continue
        if not (hasattr(mod, "add_arguments") and hasattr(mod, "run_from_args")):
            continue
        help_ = getattr(mod, "HELP", None)
        try:  # building the options may import an optional package (bench model: the ESM2 presets)
            mod.add_arguments(_Parser(prog=f"anyattn bench {name}", add_help=False))
        except ImportError as e:
            _unavailable(bsub, name, help_, _missing_extra_message(e))
            continue
        bp = bsub.add_parser(name, help=help_, description=help_)
        mod.add_arguments(bp)
        bp.set_defaults(func=lambda a, cmd, _m=mod: _m.run_from_args(a, cmd))
    b.set_defaults(func=None, _bench_names=names)


def build_parser(prog: str = "anyattn") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="anyattn: one attention call over every PyTorch attention backend.")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error (for bug reports)")
    sub = p.add_subparsers(dest="command", metavar="{doctor,bench,embed}", parser_class=_Parser)

    d = sub.add_parser("doctor", help="environment, backends, correctness vs the float64 oracle, a speed probe")
    from .bench import doctor

    doctor.add_arguments(d)
    d.set_defaults(func=lambda a, cmd: doctor.run_from_args(a, cmd))
    _add_bench(sub)
    from .embed.cli import add_parser as add_embed

    add_embed(sub)
    for leaf in _leaves(sub):  # "--debug" after the sub-command works too
        try:
            leaf.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        except argparse.ArgumentError:  # the sub-command has its own --debug
            pass
    return p


def _leaves(sub):
    for parser in dict.fromkeys(sub.choices.values()):
        inner = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if inner:
            yield from _leaves(inner[0])
        else:
            yield parser


def _one_line(msg: str) -> str:
    return "; ".join(s.strip() for s in str(msg).splitlines() if s.strip())


def _classify(e: BaseException) -> tuple[int, str]:
    """(exit status, message) of an exception that ended a command: 2 for bad input, 1 for a
    failed run; an exception anyattn does not raise on purpose is reported as an internal error."""
    from .bench import UsageError
    from .errors import AnyAttnError, UnsupportedError

    # bad input: a bad option value, a malformed input file, a store of other settings (anyattn's
    # errors that are ValueError / TypeError too), a backend that cannot serve the call
    if isinstance(e, (UsageError, UnsupportedError)) or isinstance(e, AnyAttnError) and isinstance(e, (ValueError, TypeError)):
        return 2, str(e)
    if isinstance(e, ImportError):
        return 1, _missing_extra_message(e)
    if isinstance(e, AnyAttnError):  # a failed run anyattn diagnosed (a full disk, a dead worker, ...)
        return 1, str(e)
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return 1, f"out of memory ({type(e).__name__}: {_one_line(e)[:300]}); use smaller batches (e.g. --max-tokens)"
    if isinstance(e, OSError):
        where = f" {e.filename!r}" if getattr(e, "filename", None) else ""
        return 1, f"{e.strerror or type(e).__name__}{where}" if e.strerror else f"{type(e).__name__}: {e}"
    return 1, f"internal error {type(e).__name__}: {_one_line(e)[:500]} (rerun with --debug for the traceback and report it)"


def main(argv=None, prog: str = "anyattn") -> int:
    """Entry point of the ``anyattn`` script and ``python -m anyattn``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "_takes_any", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # argparse already printed the usage error (or --help)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.command is None:
        print(f"{prog}: error: a command is required: doctor, bench or embed (see '{prog} --help')", file=sys.stderr)
        return 2
    if args.func is None:  # "anyattn bench" without a subcommand
        names = ", ".join(args._bench_names)
        print(f"{prog} bench: error: a benchmark is required: {names} (see '{prog} bench --help')", file=sys.stderr)
        return 2
    command = " ".join([prog, shlex.join(argv)]).strip()
    sub = args.command + (f" {args.bench_command}" if getattr(args, "bench_command", None) else "")
    try:
        return int(args.func(args, command))
    except KeyboardInterrupt:
        print(f"{prog} {sub}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error becomes one line (and a traceback with --debug)
        code, msg = _classify(e)
        if args.debug:
            traceback.print_exc(file=sys.stderr)
            detail = getattr(e, "detail", None)  # e.g. a worker process's own traceback
            if detail:
                print(detail, file=sys.stderr)
        print(f"{prog} {sub}: error: {_one_line(msg)}", file=sys.stderr)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
