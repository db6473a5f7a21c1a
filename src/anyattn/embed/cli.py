"""The ``anyattn embed`` subcommand (registered by ``anyattn.cli`` through :func:`add_parser`).

    anyattn embed INPUT.fasta --model PATH_OR_REPO --out OUT [--pooling P [P ...]]
                  [--layers N [N ...] | all] [--dtype auto|bf16|fp16|fp32] [--store-dtype float16|float32]
                  [--max-tokens N] [--backend NAME] [--devices cuda:0,cuda:1] [--compile]
                  [--long-policy error|truncate|split] [--unknown error|x] [--tokenizer DIR]
                  [--shard-size 2GB] [--append] [--no-progress]

Exit status: 0 done (the summary is printed on stdout); 2 bad input: a bad option, an input file
that is missing, unreadable or malformed (the message names the file and line), a model path that
is not a checkpoint, a store of other settings (the message names each differing setting); 1 the
run failed: a full disk, a dead worker, another job writing the same store, a missing optional
package (the message says which ``pip install 'anyattn[embed]'``). One line on stderr; ``anyattn
--debug embed ...`` adds the traceback.
"""

from __future__ import annotations

import importlib.util

__all__ = ["add_parser", "run_from_args"]

HELP = "embed the sequences of a FASTA file with a protein language model (resumable; see docs/embed.md)"


def add_parser(sub) -> None:
    """Add ``embed`` to the ``anyattn`` subcommands."""
    from .fasta import UNKNOWN_POLICIES
    from .job import LONG_POLICIES
    from .pooling import POOLERS

    p = sub.add_parser("embed", help=HELP, description=HELP)
    p.add_argument("input", help="FASTA file (.gz too)")
    p.add_argument("--model", required=True, help="checkpoint directory or hub id (anyattn.models)")
    p.add_argument("--out", required=True, help="output: *.sqlite (default format, resumable), *.safetensors or *.npz")
    p.add_argument("--pooling", nargs="+", default=["mean"], metavar="POOLER",
                   help=f"one or more of {', '.join(POOLERS)} (or 'mean,max'); several are concatenated in that order; "
                   "none = one vector per residue (default mean)")  # fmt: skip
    p.add_argument("--layers", nargs="+", default=None, metavar="N",
                   help="hidden-state indices (0 = embeddings, -1 = last) or 'all'; two or more: arrays get a leading layer axis")  # fmt: skip
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"), help="compute dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--store-dtype", default=None, choices=("float16", "float32"), help="stored dtype (default: float32 for fp32, else float16)")
    p.add_argument("--max-tokens", type=int, default=32768, help="tokens per packed batch (default 32768)")
    p.add_argument("--backend", default=None,
                   help="anyattn attention backend of every layer (default: the one an anyattn checkpoint saved, else auto)")  # fmt: skip
    p.add_argument("--devices", default=None, help="comma-separated devices, one process each (e.g. cuda:0,cuda:1 or cpu,cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile the layers; batches padded to --max-tokens")
    p.add_argument("--long-policy", choices=LONG_POLICIES, default="error", help="sequences longer than the model's maximum (default error)")
    p.add_argument("--unknown", choices=UNKNOWN_POLICIES, default="error", help="characters outside the alphabet: error or map to X")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory or hub id (default: the model's own; ANKH checkpoints without tokenizer files)")  # fmt: skip
    p.add_argument("--shard-size", default=None,
                   help="*.safetensors output: bytes of rows per shard, e.g. 2GB or 500MB (default 2GiB); larger sets are "
                   "written as name-0000k-of-0000n.safetensors + name.safetensors.index.json")  # fmt: skip
    p.add_argument("--append", action="store_true",
                   help="an existing SQLite --out made from another input takes this input's new ids (else it is refused)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar / log lines")
    p.set_defaults(func=run_from_args)


# what the job imports on top of torch (the extra ``embed`` installs them)
_NEEDS = ("transformers", "numpy")


def run_from_args(args, command: str) -> int:
    """Run the job; errors propagate to ``anyattn.cli.main``, which prints one line and picks
    the exit status."""
    missing = [m for m in _NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"anyattn embed needs {' and '.join(missing)}, not installed here: pip install 'anyattn[embed]'")
    from .job import embed

    summary = embed(
        args.input, model=args.model, out=args.out, pooling=_poolers(args.pooling), layers=_layers(args.layers),
        dtype=args.dtype, store_dtype=args.store_dtype, max_tokens=args.max_tokens, backend=args.backend,
        devices=args.devices, long_policy=args.long_policy, unknown=args.unknown, compile=args.compile,
        progress=not args.no_progress, tokenizer=args.tokenizer, shard_size=args.shard_size, append=args.append,
    )  # fmt: skip
    print(summary)
    return 0


def _poolers(values):
    """``--pooling mean max`` or ``--pooling mean,max`` -> "mean,max" (checked by embed)."""
    return ",".join(v for value in values for v in value.split(",") if v) or ",".join(values)


def _layers(values):
    """``--layers`` strings -> None, "all", an int (one value) or a list of ints (two or more)."""
    from ..errors import bad_value

    if values is None:
        return None
    if values == ["all"]:
        return "all"
    try:
        ints = [int(v) for v in values]
    except ValueError:
        raise bad_value("--layers", "integers (hidden-state indices, -1 = last) or 'all'", " ".join(values)) from None
    return ints[0] if len(ints) == 1 else ints
