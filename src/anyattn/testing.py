"""Reference tools shipped with the package: the float64 oracle, input factories, the
tolerance rule every backend is held to (DESIGN.md section 7), and the supported seams for
testing code that sits on anyattn:

* :func:`record_calls` records every attention call (backend that ran, mask, shapes): prove
  which backend served a model's layers without patching anything;
* :func:`use_backend` installs a backend instance in place of the registered one of the same
  name, e.g. ``FlashTorchBackend(varlen=stand_in, cuda_only=False)`` to run the varlen packing
  logic on the CPU around a reference kernel;
* :func:`make_call` builds the validated :class:`anyattn.call.Call` a backend's ``run`` takes.

    err(backend vs oracle) <= 2 * err(eager in the same dtype vs oracle) + 1e-5    (forward)
    err(backend vs oracle) <= 3 * err(eager in the same dtype vs oracle) + 1e-4    (gradients)

where err is the max absolute difference. The oracle is the eager backend on float64 copies.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch

from . import api as _api
from .api import attention
from .backends import REGISTRY, AttentionBackend

__all__ = ["generate_qkv", "oracle", "Comparison", "compare_to_oracle", "record_calls", "use_backend", "make_call", "RecordedCall"]


@dataclass(frozen=True)
class RecordedCall:
    """One attention call as :func:`record_calls` saw it."""

    backend: str  # the backend that ran it
    mask: object  # the canonical mask term (None: no mask)
    scores: tuple
    q_shape: tuple
    k_shape: tuple
    dtype: torch.dtype
    requires_grad: bool
    scale: float
    dropout_p: float


@contextlib.contextmanager
def record_calls():
    """Record every ``attention`` / ``attention_with_weights`` call in the block (a list of
    :class:`RecordedCall`, filled as calls run)."""
    seen: list = []

    def observe(call, name):
        seen.append(RecordedCall(name, call.mask, call.scores, tuple(call.q.shape), tuple(call.k.shape), call.dtype,
                                 call.requires_grad, call.scale, call.dropout_p))  # fmt: skip

    _api._OBSERVERS.append(observe)
    try:
        yield seen
    finally:
        _api._OBSERVERS.remove(observe)


@contextlib.contextmanager
def flex_lowering(lowering: str | None):
    """flex with its lowering set inside the block (``"auto"``, ``"flash"``, ``"triton"``; None:
    ``ANYATTN_FLEX_LOWERING``), the previous one restored after it; decisions and lowered forms
    are dropped on entry and exit (they were taken under the other lowering). Yields flex."""
    flex = REGISTRY["flex"]
    prev = flex._lowering
    flex.lowering = lowering
    _api.clear_caches()
    try:
        yield flex
    finally:
        flex.lowering = prev
        _api.clear_caches()


@contextlib.contextmanager
def use_backend(impl: AttentionBackend):
    """Serve ``impl.name`` with ``impl`` inside the block (decisions and availability are
    recomputed on entry and exit). Yields ``impl``."""
    from . import resolve as _resolve

    if not isinstance(impl, AttentionBackend):
        raise TypeError(f"impl: expected an anyattn.backends.AttentionBackend, got {type(impl).__name__}")
    if impl.name not in REGISTRY:
        raise ValueError(f"impl.name: expected one of {list(REGISTRY)}, got {impl.name!r}")
    before = REGISTRY[impl.name]

    def reset():
        _api.clear_caches()
        _resolve._AVAILABILITY.pop(impl.name, None)

    REGISTRY[impl.name] = impl
    reset()
    try:
        yield impl
    finally:
        REGISTRY[impl.name] = before
        reset()


def make_call(q, k, v, *, mask=None, score=None, scale=None, dropout_p=0.0, return_lse=False, need_weights=False):
    """The validated :class:`anyattn.call.Call` that ``attention`` would hand a backend."""
    call, _, _, _ = _api._prepare(q, k, v, mask, score, scale, dropout_p, return_lse, need_weights, "eager")
    return call


def generate_qkv(
    B=2, Hq=4, Hkv=None, Sq=33, Sk=None, D=64, Dv=None, *, dtype=torch.float32, device="cpu",
    requires_grad=False, layout="bhsd", seed=0,
):  # fmt: skip
    """Random q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv).

    ``layout="bshd"`` returns transposed views of (B, S, H, D) memory (non-contiguous), the way
    models hold them.
    """
    Hkv = Hq if Hkv is None else Hkv
    Sk = Sq if Sk is None else Sk
    Dv = D if Dv is None else Dv
    g = torch.Generator(device="cpu").manual_seed(seed)

    def make(b, h, s, d):
        if layout == "bshd":
            t = torch.randn(b, s, h, d, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
        else:
            t = torch.randn(b, h, s, d, generator=g).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    return make(B, Hq, Sq, D), make(B, Hkv, Sk, D), make(B, Hkv, Sk, Dv)


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64).requires_grad_(t.requires_grad)


def oracle(q, k, v, **kw):
    """The eager backend on float64 copies (same kwargs as ``attention``)."""
    return attention(_f64(q), _f64(k), _f64(v), backend="eager", **kw)


@dataclass
class Comparison:
    name: str
    err: float
    ref_err: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.err <= self.bound  # NaN compares False: a NaN never passes

    def __str__(self) -> str:
        return f"{self.name}: err {self.err:.3e} vs bound {self.bound:.3e} (eager same-dtype err {self.ref_err:.3e})"


def _maxdiff(a, b) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("nan")
    if not torch.isfinite(a).all() and not torch.equal(torch.isinf(a), torch.isinf(b.to(a.dtype))):
        return float("nan")
    a64, b64 = a.detach().double(), b.detach().double()
    both_inf = torch.isinf(a64) & torch.isinf(b64) & (a64.sign() == b64.sign())
    d = torch.where(both_inf, torch.zeros_like(a64), (a64 - b64).abs())
    if d.numel() == 0:
        return 0.0
    return float(d.max())


def _learnable(score) -> list:
    """(term index, field name) of every score-term tensor that requires grad (bias, sink, ...)."""
    from .spec import canonical_scores

    out = []
    for i, t in enumerate(canonical_scores(score)):
        for f in t.__dataclass_fields__:
            x = getattr(t, f)
            if isinstance(x, torch.Tensor) and x.requires_grad:
                out.append((i, f))
    return out


def _score_with(score, learnable, cast):
    """``score`` with each learnable tensor replaced by a fresh leaf (cast by ``cast`` when given);
    returns (new score terms, the leaves in ``learnable``'s order)."""
    from .spec import canonical_scores

    terms = list(canonical_scores(score))
    leaves = []
    for i, f in learnable:
        x = getattr(terms[i], f).detach()
        leaf = (cast(x) if cast else x.clone()).requires_grad_(True)
        terms[i] = dataclasses.replace(terms[i], **{f: leaf})
        leaves.append(leaf)
    return tuple(terms), leaves


def compare_to_oracle(q, k, v, *, backend, grad=True, return_lse=False, **kw) -> list[Comparison]:
    """Run ``backend`` and the same-dtype eager reference against the float64 oracle.

    Returns one :class:`Comparison` for the output, the lse (if asked) and, with ``grad=True``,
    the gradients of q, k and v and of every score-term tensor that requires grad (a bias, sink
    logits: named ``d<term>``), backpropagating the same fixed random cotangent everywhere.
    """
    results = {}
    learnable = _learnable(kw.get("score")) if grad and kw.get("score") is not None else []
    for name, be, cast in (("oracle", "eager", _f64), ("ref", "eager", None), ("test", backend, None)):
        ins = [(cast(t) if cast else t).detach().requires_grad_(grad) for t in (q, k, v)]
        args = dict(kw)
        leaves = []
        if learnable:
            args["score"], leaves = _score_with(kw["score"], learnable, (lambda x: x.to(torch.float64)) if cast else None)
        r = attention(*ins, backend=be, return_lse=return_lse, **args)
        out, lse = (r.out, r.lse) if return_lse else (r, None)
        grads = []
        if grad:
            dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            gs = torch.autograd.grad(out, ins + leaves, dout.to(out.device, out.dtype), allow_unused=True)
            grads = list(gs)
        results[name] = (out, lse, grads)
    o_out, o_lse, o_g = results["oracle"]
    comps = []

    def add(name, test, ref, orc, fwd):
        e, r = _maxdiff(test, orc), _maxdiff(ref, orc)
        bound = (2 * r + 1e-5) if fwd else (3 * r + 1e-4)
        comps.append(Comparison(name, e, r, bound))

    add("out", results["test"][0], results["ref"][0], o_out, True)
    if return_lse:
        add("lse", results["test"][1], results["ref"][1], o_lse, True)
    if o_g:
        from .spec import canonical_scores

        terms = canonical_scores(kw.get("score"))
        names = ["dq", "dk", "dv"] + [f"d{terms[i]!r}" for i, _ in learnable]
        for i, n in enumerate(names):
            add(n, results["test"][2][i], results["ref"][2][i], o_g[i], False)
    return comps
