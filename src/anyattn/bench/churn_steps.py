"""The steps of ``bench kernels --mode new-packing`` (``churn.py`` runs them): the random
packings, each row's step written the way a user writes it, and the float64 oracle of a packing.

Shape legend: leaves q, k, v are (B, S, H, D) memory; anyattn, flex and SDPA read their
(B, H, S, D) ``transpose(1, 2)`` views, varlen_attn the packed (S, H, D) view of row 0.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from .. import SeqInfo, attention, causal, documents, padding
from . import raw, verify
from .cases import doc_lengths

__all__ = ["FORMS", "RAW_ROWS", "Oracle", "Skip", "anyattn_forward", "packings", "pairs", "raw_forward", "segments", "stepper", "term"]

FORMS = {"packing": ("tensor", "list", "seqinfo"), "padding": ("lengths", "keep")}
RAW_ROWS = {"packing": ("raw:varlen", "raw:flex"), "padding": ("raw:sdpa",)}


# ---------------------------------------------------------------------------------------------
# packings


def packings(opts, case: str, n: int) -> list[list[int]]:
    """``n`` distinct random packings: document lengths summing to S (packing), or B row lengths
    in [S/4, S] (padding)."""
    g = torch.Generator().manual_seed(opts.seed + (0 if case == "packing" else 7919))
    out, seen = [], set()
    while len(out) < n:
        if case == "packing":
            lo, hi = opts.docs
            nd = int(torch.randint(lo, hi + 1, (1,), generator=g))
            p = list(doc_lengths(opts.pack_S, nd, seed=int(torch.randint(0, 2**31 - 1, (1,), generator=g))))
        else:
            p = torch.randint(max(1, opts.pad_S // 4), opts.pad_S + 1, (opts.pad_B,), generator=g).tolist()
        if tuple(p) not in seen:
            seen.add(tuple(p))
            out.append(p)
    return out


def segments(case: str, p: list[int]) -> list[tuple[int, int, int]]:
    """(row, start, length) of every independent block of a packing."""
    if case == "packing":
        starts = [0, *itertools.accumulate(p)][:-1]
        return [(0, s, n) for s, n in zip(starts, p)]
    return [(b, 0, n) for b, n in enumerate(p)]


def pairs(case: str, p: list[int], H: int) -> int:
    """Visible (b, h, i, j) pairs: doc-causal n(n+1)/2 per document; padding n^2 per row."""
    if case == "packing":
        return H * sum(n * (n + 1) // 2 for n in p)
    return H * sum(n * n for n in p)


# ---------------------------------------------------------------------------------------------
# the step of each row


class Skip(Exception):
    pass


def term(case: str, form: str, dev, S: int):
    """A function packing -> anyattn mask term, built the way a user writes it."""
    if case == "packing":
        if form == "tensor":
            return lambda p: documents(torch.tensor(p)) & causal()
        if form == "list":
            return lambda p: documents(p) & causal()
        if form == "seqinfo":
            return lambda p: documents(SeqInfo.from_lengths(p, device=dev)) & causal()
    elif case == "padding":
        if form == "lengths":
            return lambda p: padding(torch.tensor(p))
        if form == "keep":
            return lambda p: padding(mask=torch.arange(S, device=dev)[None, :] < torch.tensor(p, device=dev)[:, None])
    raise ValueError(f"no form {form!r} for case {case!r}; expected one of {FORMS.get(case)}")


_COMPILED_FLEX: dict = {}  # (case, grad) -> compiled function with its own code object
_FLEX: list = []  # torch's flex_attention, imported on first use


def _flex_template(q, k, v, block_mask):
    if not torch.compiler.is_compiling():  # dynamo fell back to eager: the unfused O(S^2) path
        raise RuntimeError("raw flex: torch.compile fell back to eager (recompile limit?); refusing the unfused path")
    return _FLEX[0](q, k, v, block_mask=block_mask)


def _compiled_flex(case: str, grad: bool):
    """torch.compile(flex_attention), one code object per case and mode: each has its own dynamo
    cache, so neither anyattn's compiled calls nor the other rows use up its recompile limit."""
    import types

    if not _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX.append(flex_attention)
    key = (case, grad)
    if key not in _COMPILED_FLEX:
        name = f"raw_flex_churn_{case}_{'fwdbwd' if grad else 'fwd'}"
        code = _flex_template.__code__.replace(co_name=name)
        fn = types.FunctionType(code, _flex_template.__globals__, name)
        _COMPILED_FLEX[key] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _COMPILED_FLEX[key]


def raw_forward(name: str, case: str, leaves, opts, grad: bool):
    """(forward(packing) -> native output, to (B, S, H, D)) for a raw row; raises _Skip."""
    q, k, v = leaves
    dev = q.device
    B, S = q.shape[:2]
    if name == "raw:varlen":
        if case != "packing":
            raise Skip("raw:varlen is the packing baseline")
        if dev.type != "cuda":
            raise Skip("varlen_attn runs on CUDA only")
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise Skip("varlen_attn takes float16/bfloat16 only")
        fn, params = raw.varlen_fn()
        if fn is None:
            raise Skip(params)
        kw = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
        if "window_size" not in params and "is_causal" not in params:
            raise Skip("this torch's varlen_attn has neither window_size nor is_causal")

        def fwd(p):
            cu = torch.tensor([0, *itertools.accumulate(p)], dtype=torch.int32, device=dev)
            m = max(p)
            return fn(q[0], k[0], v[0], cu, cu, m, m, **kw)

        return fwd, lambda out: out[None]
    if name == "raw:flex":
        if case != "packing":
            raise Skip("raw:flex is a packing baseline")
        if dev.type == "cpu" and grad:
            raise Skip("FlexAttention has no backward on CPU")
        if dev.type == "cpu" and not opts.cpu_flex:
            raise Skip("Flex compiles for ~5-20 s a kernel on CPU (--cpu-flex runs it)")
        if q.dtype == torch.float64:
            raise Skip("FlexAttention does not take float64")
        from torch.nn.attention.flex_attention import create_block_mask

        fa = _compiled_flex(case, grad)

        def fwd(p):
            ids = torch.repeat_interleave(torch.arange(len(p), device=dev), torch.tensor(p, device=dev))

            def doc_causal(b, h, qi, kv):
                return (ids[qi] == ids[kv]) & (qi >= kv)

            bm = create_block_mask(doc_causal, None, None, S, S, device=dev)
            return fa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bm)

        return fwd, lambda out: out.transpose(1, 2)
    if name == "raw:sdpa":
        if case != "padding":
            raise Skip("raw:sdpa is the padding baseline")

        def fwd(p):
            keep = torch.arange(S, device=dev)[None, :] < torch.tensor(p, device=dev)[:, None]
            return F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep[:, None, None, :]
            )

        return fwd, lambda out: out.transpose(1, 2)
    raise ValueError(f"unknown raw row {name!r}; expected one of {sorted({n for r in RAW_ROWS.values() for n in r})}")


def anyattn_forward(backend: str, case: str, form: str, leaves):
    q, k, v = leaves
    make = term(case, form, q.device, q.shape[1])

    def fwd(p):
        return attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask=make(p), backend=backend)

    return fwd, lambda out: out.transpose(1, 2)


def stepper(fwd, leaves, grad: bool):
    """The timed step: forward, or forward + ``torch.autograd.grad`` w.r.t. q, k, v."""
    if not grad:
        return fwd
    dout = []

    def step(p):
        out = fwd(p)
        if not dout:
            dout.append(torch.randn_like(out))
        return torch.autograd.grad(out, leaves, dout[0])

    return step


# ---------------------------------------------------------------------------------------------
# the oracle (per document / per row: the call is block-diagonal)


class Oracle:
    """float64 eager and same-dtype eager for one packing, assembled at full size."""

    def __init__(self, case: str, p: list[int], leaves, grad: bool, seed: int):
        q = leaves[0]
        B, S, H, D = q.shape
        self.grad = grad
        g = torch.Generator().manual_seed(seed)
        valid = torch.zeros(B, S, 1, 1, dtype=torch.bool)
        for b, s, n in segments(case, p):
            valid[b, s : s + n] = True
        self.valid = valid.to(q.device)
        # upstream gradient, zero on padding rows (a loss over real tokens)
        self.dout = (torch.randn(B, S, H, D, generator=g, dtype=torch.float64).to(q.device) * self.valid)
        mask = causal() if case == "packing" else None
        res = {}
        for name, dt in (("oracle", torch.float64), ("ref", q.dtype)):
            out = torch.zeros(B, S, H, D, dtype=dt, device=q.device)
            grads = [torch.zeros(B, S, H, D, dtype=dt, device=q.device) for _ in range(3)] if grad else []
            for b, s, n in segments(case, p):
                if n == 0:
                    continue
                sl = [t.detach()[b : b + 1, s : s + n].to(dt).transpose(1, 2).requires_grad_(grad) for t in leaves]
                with torch.set_grad_enabled(grad):
                    o = attention(*sl, mask=mask, backend="eager")
                out[b : b + 1, s : s + n] = o.detach().transpose(1, 2)
                if grad:
                    gs = torch.autograd.grad(o, sl, self.dout[b : b + 1, s : s + n].transpose(1, 2).to(dt))
                    for acc, gi in zip(grads, gs):
                        acc[b : b + 1, s : s + n] = gi.transpose(1, 2)
            res[name] = (out, grads)
        self.out, self.grads = res["oracle"]
        ref_out, ref_grads = res["ref"]
        self.ref_err = [verify.maxdiff(ref_out, self.out)] + [verify.maxdiff(a, b) for a, b in zip(ref_grads, self.grads)]

    def compare(self, out, grads, rows_only: bool) -> list[tuple[str, float, float]]:
        """(name, err, bound): out (B, S, H, D) everywhere (raw rows: on real tokens only; their
        padding rows are unspecified), grads everywhere."""
        comps = [("out", verify.maxdiff(out, self.out, self.valid if rows_only else None), verify.bound(self.ref_err[0]))]
        for i, (n, gt) in enumerate(zip(("dq", "dk", "dv"), grads)):
            comps.append((n, verify.maxdiff(gt, self.grads[i]), verify.bound(self.ref_err[1 + i], grad=True)))
        return comps
