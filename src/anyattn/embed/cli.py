"""The ``anyattn embed`` subcommand (registered by ``anyattn.cli`` through :func:`add_parser`).

    anyattn embed INPUT.fasta --model PATH_OR_REPO --out OUT [--pooling mean|cls|max|none]
                  [--layers N [N ...]] [--dtype auto|bf16|fp16|fp32] [--store-dtype float16|float32]
                  [--max-tokens N] [--backend NAME] [--devices cuda:0,cuda:1] [--compile]
                  [--long-policy error|truncate|split] [--unknown error|x] [--no-progress]

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
    from .job import LONG_POLICIES, POOLINGS

    p = sub.add_parser("embed", help=HELP, description=HELP)
    p.add_argument("input", help="FASTA file (.gz too)")
    p.add_argument("--model", required=True, help="checkpoint directory or hub id (anyattn.models)")
    p.add_argument("--out", required=True, help="output: *.sqlite (default format, resumable), *.safetensors or *.npz")
    p.add_argument("--pooling", choices=POOLINGS, default="mean", help="mean/max over residues, cls token, none = per residue (default mean)")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="hidden-state indices (0 = embeddings, -1 = last); two or more: arrays get a leading layer axis")  # fmt: skip
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"), help="compute dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--store-dtype", default=None, choices=("float16", "float32"), help="stored dtype (default: float32 for fp32, else float16)")
    p.add_argument("--max-tokens", type=int, default=32768, help="tokens per packed batch (default 32768)")
    p.add_argument("--backend", default=None,
                   help="anyattn attention backend of every layer (default: the one an anyattn checkpoint saved, else auto)")  # fmt: skip
    p.add_argument("--devices", default=None, help="comma-separated devices, one process each (e.g. cuda:0,cuda:1 or cpu,cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile the layers; batches padded to --max-tokens")
    p.add_argument("--long-policy", choices=LONG_POLICIES, default="error", help="sequences longer than the model's maximum (default error)")
    p.add_argument("--unknown", choices=UNKNOWN_POLICIES, default="error", help="characters outside the alphabet: error or map to X")
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
        args.input, model=args.model, out=args.out, pooling=args.pooling,
        layers=args.layers if args.layers is None or len(args.layers) > 1 else args.layers[0],
        dtype=args.dtype, store_dtype=args.store_dtype, max_tokens=args.max_tokens, backend=args.backend,
        devices=args.devices, long_policy=args.long_policy, unknown=args.unknown, compile=args.compile,
        progress=not args.no_progress,
    )  # fmt: skip
    print(summary)
    return 0
