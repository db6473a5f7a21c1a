"""Checking a benchmark row against the float64 oracle before it is timed (DESIGN.md section 7).

    err(row vs float64 eager) <= 2 x err(eager in the row's dtype vs float64 eager) + 1e-5   (out)
    err(row vs float64 eager) <= 3 x (the same) + 1e-4                                       (grads)

:class:`Reference` holds the oracle of one ``bench kernels`` case, computed on the last ``R``
query rows when the full case is too big for float64 eager; :func:`bound` and :func:`maxdiff` are
the rule itself, shared with the new-packing mode (which builds its oracle per document).
"""

from __future__ import annotations

import math

import torch

from .. import attention

__all__ = ["Reference", "bound", "check_rows", "maxdiff", "verdict"]


def bound(ref_err: float, grad: bool = False) -> float:
    """The tolerance for a row whose same-dtype eager reference is ``ref_err`` off the oracle."""
    return 3 * ref_err + 1e-4 if grad else 2 * ref_err + 1e-5


def maxdiff(a, b, rows=None) -> float:
    """Max-abs difference in float64 (NaN when either side has a NaN); ``rows`` (a bool mask
    broadcasting to ``a``) limits it to those entries."""
    d = (a.detach().double() - b.detach().double()).abs()
    if rows is not None:
        d = torch.where(rows, d, torch.zeros_like(d))
    if torch.isnan(d).any():
        return math.nan
    return float(d.max()) if d.numel() else 0.0


class Reference:
    """The float64 oracle and same-dtype eager on the last ``R`` query rows of a case.

    With bottom-right alignment the last R queries of a call with Sq = R and the full keys are
    exactly the last R rows of the full call, so the backend under test runs at the full shape
    (the kernel that is timed, no extra compilation) and only the reference is small. Gradients:
    the upstream gradient is nonzero only on those rows, so dk and dv of the full call equal
    those of the sliced reference, and dq is zero elsewhere. R = S when the full oracle fits.
    """

    def __init__(self, inp, R: int, grad: bool):
        q, k, v = inp.q.detach(), inp.k.detach(), inp.v.detach()
        self.S, self.R, self.grad, self.kw = q.shape[2], R, grad, inp.kwargs()
        g = torch.Generator().manual_seed(1)
        self.dout = torch.randn(q.shape[:2] + (R, v.shape[-1]), generator=g, dtype=torch.float64).to(q.device)
        res = {}
        for name, dt in (("oracle", torch.float64), ("ref", q.dtype)):
            qs = q[:, :, self.S - R :].to(dt).requires_grad_(grad)
            ks, vs = k.to(dt).requires_grad_(grad), v.to(dt).requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                r = attention(qs, ks, vs, backend="eager", return_lse=True, **self.kw)
            grads = torch.autograd.grad(r.out, (qs, ks, vs), self.dout.to(dt)) if grad else ()
            res[name] = (r.out.detach(), r.lse.detach(), [x.detach() for x in grads])
        self.out, self.lse, self.grads = res["oracle"]
        self.ref_out, _, self.ref_grads = res["ref"]
        self.rows = torch.isfinite(self.lse)[..., None]

    @property
    def where(self) -> str:
        return "full shape" if self.R == self.S else f"last {self.R} query rows of the full shape"

    def check(self, out, grads=(), rows_only=False) -> list[tuple[str, float, float]]:
        """(name, err, bound) for the output (and q, k, v gradients) of the full-shape call."""
        rows = self.rows if rows_only else None
        res = []
        err = maxdiff(out[:, :, self.S - self.R :], self.out, rows)
        res.append(("out", err, bound(maxdiff(self.ref_out, self.out, rows))))
        for i, n in enumerate(("dq", "dk", "dv")[: len(grads)]):
            got = grads[i]
            if n == "dq":  # rows outside the slice had zero upstream gradient
                outside = got[:, :, : self.S - self.R]
                spill = float(outside.abs().max()) if outside.numel() else 0.0
                got = got[:, :, self.S - self.R :]
            err = maxdiff(got, self.grads[i])
            if n == "dq" and spill == spill:
                err = max(err, spill) if err == err else err
            res.append((n, err, bound(maxdiff(self.ref_grads[i], self.grads[i]), grad=True)))
        return res

    def full_dout(self, out):
        d = torch.zeros_like(out)
        d[:, :, self.S - self.R :] = self.dout.to(out.dtype)
        return d


def verdict(comps) -> tuple[float, float, str]:
    """(worst err, its bound, "" or the failure message) of a list of (name, err, bound)."""
    worst = max(comps, key=lambda c: (c[1] / c[2]) if c[1] == c[1] else math.inf)
    bad = [c for c in comps if not c[1] <= c[2]]  # NaN never passes
    msg = "; ".join(f"{n} err {e:.3g} > bound {b:.3g}" for n, e, b in bad)
    return worst[1], worst[2], (f"wrong result vs float64 oracle: {msg}" if bad else "")


def check_rows(cfg, max_elems: int) -> int:
    """Query rows the float64 reference covers: all when B*Hq*S*S <= max_elems, else the last R."""
    per_row = cfg.B * cfg.Hq * cfg.S
    return max(1, min(cfg.S, max_elems // per_row))
