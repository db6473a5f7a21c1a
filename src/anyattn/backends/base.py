"""The one shape every backend has.

    class AttentionBackend:
        name: str                                   # "sdpa", "flex", ...
        facts: Facts                                # what it can do, known without a call
        available() -> None | reason                # can it run on this machine at all
        supports(signature) -> None | reason        # can it compute this call exactly
        reads_pages(signature) -> bool              # paged KV: reads the page table itself?
        run(call) -> (out, lse | None)              # compute (may refuse on values: Refusal)
        clear() -> None                             # drop every cache it owns

``supports`` is the cheap capability query: it reads a :class:`anyattn.call.Signature` (shapes,
dtype, options, the *structure* of the terms) and never tensor values, never a lowered mask. The
resolver caches its answer per signature, so a new packing or a fresh mask tensor is never
re-ranked. A backend whose exactness depends on the values (a padding keep-mask with holes under a
window, on the varlen kernels) says so by raising :class:`Refusal` from ``run`` before it computes
anything; ``auto`` then takes the next backend, an explicit request raises.

Each backend owns its caches (lowered forms keyed by the call's content key) and its kernels:
the functions it calls are constructor arguments, so a test builds an instance around a stand-in
kernel and installs it with ``anyattn.testing.use_backend`` (no patching of private names).
Backends never import each other; shared lowering lives in ``_varlen`` (used unchanged by two).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedError


@dataclass(frozen=True)
class Facts:
    """What a backend can do, known without a call: what models and layers decide on before
    they build a batch (instead of lists of backend names kept above the backends)."""

    # serves documents(...) masks natively (varlen metadata or a block-sparse mask), without a
    # dense (T, T) mask: models run padded batches as one packed row on it
    packed_documents: bool = False
    # attention-weight dropout (dropout_p > 0)
    dropout: bool = False
    # arbitrary score functions (score_fn), e.g. a per-head logit clip
    score_fn: bool = False
    # dispatched through torch's SDPA ops, which torch.distributed context parallel intercepts
    context_parallel: bool = False
    # compiles one kernel per sequence length: a packed row is padded to a few bucketed lengths
    # (anyattn.packing) so that a stream of batches shares kernels instead of compiling each
    static_shapes: bool = False


class Refusal(UnsupportedError):
    """Raised by ``run`` before computing: the call's *values* put it outside what this backend
    computes exactly (its signature alone did not tell)."""


class AttentionBackend:
    """Base class: every backend in the registry is an instance of a subclass."""

    name: str = ""
    facts: Facts = Facts()

    def available(self) -> str | None:
        return None

    def supports(self, sig) -> str | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def reads_pages(self, sig) -> bool:
        """For a paged-KV call (``sig.paged``): whether ``run`` reads the keys through the page
        table (``call.kv``) itself. False: the caller gathers the pages into contiguous keys and
        runs an ordinary call (what every backend can do)."""
        return False

    def run(self, call):  # pragma: no cover - abstract
        raise NotImplementedError

    def clear(self) -> None:
        """Drop every cache this backend owns (``anyattn.clear_caches``)."""

    def __repr__(self) -> str:
        return f"<backend {self.name}>"
