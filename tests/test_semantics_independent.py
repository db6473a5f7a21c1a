"""An independent reference for anyattn's documented semantics.

``anyattn.testing.oracle`` is the library's own eager backend run in float64, so a mistake in how
the library materializes a mask or a score term is invisible to every test that compares against
it. This file writes the semantics again, straight from the docs (README "Semantics",
docs/serving.md, DESIGN.md section 4), with plain Python loops over (b, h, i, j) and explicit
formulas, and compares the library against it:

* ``eager`` in float64 (1e-10), forward, lse and gradients (q, k, v, sink logits, bias tensors,
  relative-bias tables);
* ``sdpa`` in float32 (1e-5 forward, 1e-4 gradients) where the README says it serves the call
  (masks and additive scores), and refusal (UnsupportedError) where it says it does not;
* ``auto`` in float32, and ``explain(...)`` on every call.

Nothing here imports anyattn internals: the reference knows only the public constructors.

Conventions read from the docs (the rules the reference implements):

* logit s = scale * <q_i, k_j> (scale defaults to 1/sqrt(D)); score terms in the order given;
  then the mask (-inf); softmax; weights @ v. GQA: query head h reads kv head h // (Hq // Hkv).
* alignment: i' = i + (Sk - Sq); with ``documents(q, kv=k)`` i' = i + kv_end[n] - q_end[n] for
  query i of document n; with ``padding(..., kv=...)`` the t-th of n real queries of a row sits at
  the position of the (m - n + t)-th of its m real keys.
* ``mask_fn``, ``dense``, ``bias`` and ``score_fn`` index queries by the raw i; every other
  positional rule by i'.
* rows with no visible key: output 0, lse -inf (with a sink: lse = sink[h]); gradients finite.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import anyattn as aa

F64 = torch.float64
F32 = torch.float32


# =============================================================================================
# reference mask terms: each knows its anyattn term (``lib``) and its visibility rule (``vis``)
# =============================================================================================


class Ctx:
    """Geometry of one call, and the key position i' of each query (None: the query has no
    position, e.g. a query in no document of ``documents(q, kv=k)``)."""

    def __init__(self, B, H, Sq, Sk, layout=None):
        self.B, self.H, self.Sq, self.Sk = B, H, Sq, Sk
        if layout is None:
            self.ip = [[i + (Sk - Sq) for i in range(Sq)] for _ in range(B)]
        else:
            self.ip = [[layout.query_position(self, b, i) for i in range(Sq)] for b in range(B)]


def _row(per_row, b):
    """A per-row value given shared (one entry) or per row."""
    return per_row[0] if len(per_row) == 1 else per_row[b]


class RM:
    layout = False  # True: documents(q, kv=k) / padding(..., kv=...): it defines i'

    def __and__(self, o):
        return RAnd(self, o)

    def __or__(self, o):
        return ROr(self, o)

    def __invert__(self):
        return RNot(self)

    def leaves(self):
        return [self]


class RAnd(RM):
    def __init__(self, a, b):
        self.a, self.b = a, b

    def lib(self):
        return self.a.lib() & self.b.lib()

    def vis(self, c, b, h, i, j):
        return self.a.vis(c, b, h, i, j) and self.b.vis(c, b, h, i, j)

    def leaves(self):
        return self.a.leaves() + self.b.leaves()

    def __repr__(self):
        return f"({self.a!r} & {self.b!r})"


class ROr(RAnd):
    def lib(self):
        return self.a.lib() | self.b.lib()

    def vis(self, c, b, h, i, j):
        return self.a.vis(c, b, h, i, j) or self.b.vis(c, b, h, i, j)

    def __repr__(self):
        return f"({self.a!r} | {self.b!r})"


class RNot(RM):
    def __init__(self, a):
        self.a = a

    def lib(self):
        return ~self.a.lib()

    def vis(self, c, b, h, i, j):
        return not self.a.vis(c, b, h, i, j)

    def leaves(self):
        return self.a.leaves()

    def __repr__(self):
        return f"~{self.a!r}"


class RCausal(RM):
    """causal(): j <= i'."""

    def lib(self):
        return aa.causal()

    def vis(self, c, b, h, i, j):
        ip = c.ip[b][i]
        return ip is not None and j <= ip

    def __repr__(self):
        return "causal()"


class RWindow(RM):
    """sliding_window(left, right): i' - left <= j <= i' + right (None = unbounded)."""

    def __init__(self, left, right):
        self.left, self.right = left, right

    def lib(self):
        return aa.sliding_window(self.left, self.right)

    def vis(self, c, b, h, i, j):
        ip = c.ip[b][i]
        if ip is None:
            return False
        ok_left = self.left is None or ip - self.left <= j
        ok_right = self.right is None or j <= ip + self.right
        return ok_left and ok_right

    def __repr__(self):
        return f"sliding_window({self.left}, {self.right})"


class RChunked(RM):
    """chunked(size): i' // size == j // size (Python floor division)."""

    def __init__(self, size):
        self.size = size

    def lib(self):
        return aa.chunked(self.size)

    def vis(self, c, b, h, i, j):
        ip = c.ip[b][i]
        return ip is not None and ip // self.size == j // self.size

    def __repr__(self):
        return f"chunked({self.size})"


class RPrefix(RM):
    """prefix_lm(p): j < p_b or j <= i' (p an int or a (B,) tensor)."""

    def __init__(self, p):
        self.p = p  # int or list of B ints

    def lib(self):
        return aa.prefix_lm(self.p if isinstance(self.p, int) else torch.tensor(self.p))

    def vis(self, c, b, h, i, j):
        p = self.p if isinstance(self.p, int) else self.p[b]
        ip = c.ip[b][i]
        return j < p or (ip is not None and j <= ip)

    def __repr__(self):
        return f"prefix_lm({self.p})"


def _doc_index(lengths, pos):
    """The document holding position ``pos`` of a packed row; None past the last document."""
    start = 0
    for n, L in enumerate(lengths):
        if start <= pos < start + L:
            return n
        start += L
    return None


class RDocuments(RM):
    """documents(lengths): same document (query at i'); tokens past sum(lengths) see nothing.
    ``lengths``: one list shared by every row, or one list per row (ragged allowed)."""

    def __init__(self, rows, form="list", S=None):
        self.rows = rows  # list of lists (one entry: shared)
        self.form, self.S = form, S  # S: the row length (SeqInfo form)

    def lib(self):
        if self.form == "seqinfo":
            return aa.documents(aa.SeqInfo.from_lengths([list(r) for r in self.rows], total_length=self.S))
        if self.form == "list":
            return aa.documents(list(self.rows[0]))
        if self.form == "lists":
            return aa.documents([list(r) for r in self.rows])
        if self.form == "tensor1d":
            return aa.documents(torch.tensor(self.rows[0]))
        n = max(len(r) for r in self.rows)  # (B, N) tensor, rows padded with zero-length docs
        return aa.documents(torch.tensor([list(r) + [0] * (n - len(r)) for r in self.rows]))

    def vis(self, c, b, h, i, j):
        ip = c.ip[b][i]
        if ip is None:
            return False
        lengths = _row(self.rows, b)
        dq, dk = _doc_index(lengths, ip), _doc_index(lengths, j)
        return dq is not None and dq == dk

    def __repr__(self):
        return f"documents({self.rows}, {self.form})"


class RDocumentsKV(RM):
    """documents(q_lengths, kv=k_lengths): query i of document n sees the keys of document n;
    i' = i + kv_end[n] - q_end[n]."""

    layout = True

    def __init__(self, qrows, krows, seqinfo=None):
        self.qrows, self.krows = qrows, krows  # lists of lists (one entry: shared)
        self.seqinfo = seqinfo  # (Sq, Sk): both layouts given as SeqInfo.from_lengths

    def lib(self):
        if self.seqinfo is not None:
            Sq, Sk = self.seqinfo
            q = aa.SeqInfo.from_lengths([list(r) for r in self.qrows], total_length=Sq)
            return aa.documents(q, kv=aa.SeqInfo.from_lengths([list(r) for r in self.krows], total_length=Sk))
        q = list(self.qrows[0]) if len(self.qrows) == 1 else [list(r) for r in self.qrows]
        k = list(self.krows[0]) if len(self.krows) == 1 else [list(r) for r in self.krows]
        return aa.documents(q, kv=k)

    def query_position(self, c, b, i):
        ql, kl = _row(self.qrows, b), _row(self.krows, b)
        n = _doc_index(ql, i)
        if n is None:
            return None
        q_end, kv_end = sum(ql[: n + 1]), sum(kl[: n + 1])
        return i + kv_end - q_end

    def vis(self, c, b, h, i, j):
        ql, kl = _row(self.qrows, b), _row(self.krows, b)
        n = _doc_index(ql, i)
        return n is not None and _doc_index(kl, j) == n

    def all_queries_placed(self, B, Sq, Sk):
        return all(sum(_row(self.qrows, b)) == Sq for b in range(B))

    def __repr__(self):
        return f"documents({self.qrows}, kv={self.krows})"


class RPadding(RM):
    """padding(lengths) / padding(mask=keep): both i' and j are real tokens of their row."""

    def __init__(self, lengths=None, keep=None, seqinfo=False):
        self.lengths, self.keep = lengths, keep  # (B,) list / (B, Sk) list of lists
        self.seqinfo = seqinfo  # keep given as SeqInfo.from_padding_mask(keep)

    def lib(self):
        if self.keep is not None and self.seqinfo:
            return aa.padding(aa.SeqInfo.from_padding_mask(torch.tensor(self.keep, dtype=torch.bool)))
        if self.keep is not None:
            return aa.padding(mask=torch.tensor(self.keep, dtype=torch.bool))
        return aa.padding(torch.tensor(self.lengths))

    def real(self, b, pos, S):
        if not 0 <= pos < S:
            return False
        if self.keep is not None:
            return bool(self.keep[b][pos])
        return pos < self.lengths[b]

    def vis(self, c, b, h, i, j):
        ip = c.ip[b][i]
        return ip is not None and self.real(b, ip, c.Sk) and self.real(b, j, c.Sk)

    def __repr__(self):
        return f"padding(lengths={self.lengths}, keep={self.keep})"


class RPaddingKV(RM):
    """padding(q, kv=k) / padding(mask=q, kv_mask=k) / padding(kv=k): per row, the t-th of the n
    real queries sits at the (m - n + t)-th of the m real keys."""

    layout = True

    def __init__(self, q_lengths=None, q_keep=None, kv_lengths=None, kv_keep=None):
        self.q_lengths, self.q_keep, self.kv_lengths, self.kv_keep = q_lengths, q_keep, kv_lengths, kv_keep

    def lib(self):
        kw = {}
        if self.kv_keep is not None:
            kw["kv_mask"] = torch.tensor(self.kv_keep, dtype=torch.bool)
        else:
            kw["kv"] = torch.tensor(self.kv_lengths)
        if self.q_keep is not None:
            kw["mask"] = torch.tensor(self.q_keep, dtype=torch.bool)
        elif self.q_lengths is not None:
            return aa.padding(torch.tensor(self.q_lengths), **kw)
        return aa.padding(**kw)

    def real_query(self, b, i):
        if self.q_keep is not None:
            return bool(self.q_keep[b][i])
        if self.q_lengths is not None:
            return i < self.q_lengths[b]
        return True

    def real_key(self, b, j):
        if self.kv_keep is not None:
            return bool(self.kv_keep[b][j])
        return j < self.kv_lengths[b]

    def query_position(self, c, b, i):
        if not self.real_query(b, i):
            return None
        real_q = [t for t in range(c.Sq) if self.real_query(b, t)]
        real_k = [j for j in range(c.Sk) if self.real_key(b, j)]
        n, m, t = len(real_q), len(real_k), real_q.index(i)
        r = m - n + t
        if r >= 0:
            return real_k[r]
        # more real queries than real keys: with right-padded keys (lengths) the keys sit at
        # 0..m-1, so the r-th key position is r itself (a query before the first key)
        assert self.kv_keep is None, "the strategy never draws this (ambiguous in the docs)"
        return r

    def vis(self, c, b, h, i, j):
        return self.real_query(b, i) and self.real_key(b, j)

    def all_queries_placed(self, B, Sq, Sk):
        # every query real, and no row with more real queries than real keys (there the docs'
        # "(m - n + t)-th of m real keys" names no key, so i' is undefined; with m = 0 the library
        # uses i + Sk - Sq, not the m - n + t the reference extends to)
        if not all(self.real_query(b, i) for b in range(B) for i in range(Sq)):
            return False
        return all(Sq <= sum(self.real_key(b, j) for j in range(Sk)) for b in range(B))

    def __repr__(self):
        return f"padding(q={self.q_lengths}/{self.q_keep}, kv={self.kv_lengths}/{self.kv_keep})"


class RBlockCausal(RM):
    """block_causal(ids): ids[j] <= ids[i'] ((Sk,) shared or (B, Sk))."""

    shared = True  # one row given as (Sk,); False: as (B, Sk) (a (1, Sk) tensor when B = 1)

    def __init__(self, ids):
        self.ids = ids  # list of lists (one entry: shared)

    def lib(self):
        t = torch.tensor(self.ids)
        return aa.block_causal(t[0] if t.shape[0] == 1 and self.shared else t)

    def vis(self, c, b, h, i, j):
        ip = c.ip[b][i]
        ids = _row(self.ids, b)
        # i' outside the keys (a query before its document's first key): there is no token at
        # i', so no id to compare; the reference treats it as seeing nothing (docs are silent)
        if ip is None or not 0 <= ip < c.Sk:
            return False
        return ids[j] <= ids[ip]

    def __repr__(self):
        return f"block_causal({self.ids})"


class RSameSegment(RBlockCausal):
    """same_segment(seg): seg[i'] == seg[j] >= 0."""

    def lib(self):
        t = torch.tensor(self.ids)
        return aa.same_segment(t[0] if t.shape[0] == 1 and self.shared else t)

    def vis(self, c, b, h, i, j):
        ip = c.ip[b][i]
        seg = _row(self.ids, b)
        if ip is None or not 0 <= ip < c.Sk:
            return False
        return seg[ip] == seg[j] and seg[j] >= 0

    def __repr__(self):
        return f"same_segment({self.ids})"


MASK_FNS = {
    # flex's mask_mod convention: raw q_idx; written with operators that work on ints and tensors
    "mod4": lambda b, h, q, kv: (q * 3 + kv * 5 + h + b * 2) % 4 != 0,
    "rawcausal1": lambda b, h, q, kv: kv <= q + 1,
}


class RMaskFn(RM):
    """mask_fn(fn): fn(b, h, q_idx, kv_idx) with the raw q_idx."""

    def __init__(self, name):
        self.name = name

    def lib(self):
        return aa.mask_fn(MASK_FNS[self.name])

    def vis(self, c, b, h, i, j):
        return bool(MASK_FNS[self.name](b, h, i, j))

    def __repr__(self):
        return f"mask_fn({self.name})"


class RDense(RM):
    """dense(t): t[b, h, i, j], t broadcast to (B, Hq, Sq, Sk); bool or uint8."""

    def __init__(self, t):
        self.t = t

    def lib(self):
        return aa.dense(self.t)

    def vis(self, c, b, h, i, j):
        t = self.t
        while t.dim() < 4:
            t = t.unsqueeze(0)
        idx = tuple(0 if t.shape[d] == 1 else x for d, x in enumerate((b, h, i, j)))
        return bool(t[idx] != 0)

    def __repr__(self):
        return f"dense({tuple(self.t.shape)}, {self.t.dtype})"


def find_layout(mask):
    if mask is None:
        return None
    found = [leaf for leaf in mask.leaves() if leaf.layout]
    assert len(found) <= 1
    return found[0] if found else None


def visibility(mask, c: Ctx) -> torch.Tensor:
    """(B, H, Sq, Sk) bool, from the rule text, one (b, h, i, j) at a time."""
    vis = torch.ones(c.B, c.H, c.Sq, c.Sk, dtype=torch.bool)
    if mask is None:
        return vis
    for b in range(c.B):
        for h in range(c.H):
            for i in range(c.Sq):
                for j in range(c.Sk):
                    vis[b, h, i, j] = mask.vis(c, b, h, i, j)
    return vis


# =============================================================================================
# reference score terms
# =============================================================================================


def alibi_slopes(H):
    """ALiBi's geometric slopes (Press et al.): 2^(-8 (h + 1) / H)."""
    return [2.0 ** (-8.0 * (h + 1) / H) for h in range(H)]


def t5_bucket(rel, num_buckets, max_distance, bidirectional):
    """HF transformers' T5Attention._relative_position_bucket for one rel = key - query position,
    computed as HF computes it (the log term in float32, truncated toward zero)."""
    ret = 0
    n = num_buckets
    if bidirectional:
        n //= 2
        if rel > 0:
            ret += n
        rp = abs(rel)
    else:
        rp = -min(rel, 0)
    max_exact = n // 2
    if rp < max_exact:
        return ret + rp
    x = torch.tensor(float(rp), dtype=torch.float32)
    large = max_exact + int(
        (torch.log(x / max_exact) / math.log(max_distance / max_exact) * (n - max_exact)).to(torch.long)
    )
    return ret + min(large, n - 1)


class RSoftcap:
    def __init__(self, cap):
        self.cap = cap

    def lib(self):
        return aa.softcap(self.cap)

    def apply(self, s, c):
        return self.cap * torch.tanh(s / self.cap)

    additive = False

    def __repr__(self):
        return f"softcap({self.cap})"


class RAlibi:
    additive = True

    def __init__(self, slopes):
        self.slopes = slopes  # list of Hq floats

    def lib(self, dtype):
        return aa.alibi(torch.tensor(self.slopes, dtype=dtype))

    def apply(self, s, c):
        dist = torch.zeros(c.B, 1, c.Sq, c.Sk, dtype=F64)
        for b in range(c.B):
            for i in range(c.Sq):
                ip = c.ip[b][i]
                for j in range(c.Sk):
                    dist[b, 0, i, j] = 0.0 if ip is None else abs(ip - j)
        return s - torch.tensor(self.slopes, dtype=F64).view(1, -1, 1, 1) * dist

    def __repr__(self):
        return "alibi"


class RBias:
    additive = True

    def __init__(self, t):
        self.t = t  # the float64 master; the library gets a leaf copy in its dtype

    def lib(self, dtype):
        self.leaf = self.t.detach().to(dtype).requires_grad_(self.t.requires_grad)
        return aa.bias(self.leaf)

    def apply(self, s, c):
        self.ref_leaf = self.t.detach().to(F64).requires_grad_(self.t.requires_grad)
        return s + self.ref_leaf  # broadcasting: tensor[b, h, i, j]

    def __repr__(self):
        return f"bias({tuple(self.t.shape)}, grad={self.t.requires_grad})"


class RRelBias:
    additive = True

    def __init__(self, table, num_buckets, max_distance, bidirectional):
        self.table, self.nb, self.md, self.bi = table, num_buckets, max_distance, bidirectional

    def lib(self, dtype):
        self.leaf = self.table.detach().to(dtype).requires_grad_(True)
        return aa.relative_bias(self.leaf, self.nb, self.md, self.bi)

    def apply(self, s, c):
        self.ref_leaf = self.table.detach().to(F64).requires_grad_(True)
        idx = torch.zeros(c.B, c.Sq, c.Sk, dtype=torch.long)
        for b in range(c.B):
            for i in range(c.Sq):
                ip = c.ip[b][i]
                for j in range(c.Sk):
                    idx[b, i, j] = 0 if ip is None else t5_bucket(j - ip, self.nb, self.md, self.bi)
        # table[h, bucket(b, i, j)] -> (B, H, Sq, Sk)
        return s + self.ref_leaf[:, idx].permute(1, 0, 2, 3)

    def __repr__(self):
        return f"relative_bias(nb={self.nb}, md={self.md}, bi={self.bi})"


SCORE_FNS = {
    # flex's score_mod convention: raw q_idx
    "lin": lambda s, b, h, q, kv: s * 0.5 + (q - kv) * 0.25,
    "sin": lambda s, b, h, q, kv: torch.sin(s) + h * 0.125 - b * 0.25,
}


class RScoreFn:
    additive = False

    def __init__(self, name):
        self.name = name

    def lib(self, dtype=None):
        return aa.score_fn(SCORE_FNS[self.name])

    def apply(self, s, c):
        b = torch.arange(c.B).view(-1, 1, 1, 1)
        h = torch.arange(c.H).view(1, -1, 1, 1)
        i = torch.arange(c.Sq).view(1, 1, -1, 1)
        j = torch.arange(c.Sk).view(1, 1, 1, -1)
        return SCORE_FNS[self.name](s, b, h, i, j)

    def __repr__(self):
        return f"score_fn({self.name})"


def lib_scores(scores, dtype):
    out = []
    for t in scores:
        out.append(t.lib() if isinstance(t, RSoftcap) else t.lib(dtype))
    return out


# =============================================================================================
# the reference call
# =============================================================================================


def ref_attention(q, k, v, mask, scores=(), sink=None, scale=None):
    """(out, lse, vis) in float64, differentiable in q, k, v, the sink logits and score leaves."""
    q, k, v = q.to(F64), k.to(F64), v.to(F64)
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    c = Ctx(B, H, Sq, Sk, find_layout(mask))
    vis = visibility(mask, c)
    rep = H // Hkv
    k = k.repeat_interleave(rep, dim=1)  # query head h reads kv head h // rep
    v = v.repeat_interleave(rep, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = scale * (q @ k.transpose(-1, -2))
    for t in scores:  # in the order given
        s = t.apply(s, c)
    s = s.expand(B, H, Sq, Sk)
    m = torch.where(vis, s, torch.tensor(-math.inf, dtype=F64)).amax(-1, keepdim=True)
    if sink is not None:
        sk = sink.to(F64).view(1, H, 1, 1)
        m = torch.maximum(m, sk.expand_as(m))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.where(vis, torch.exp(torch.where(vis, s, m) - m), torch.zeros_like(s))
    denom = e.sum(-1, keepdim=True)
    if sink is not None:
        denom = denom + torch.exp(sk - m)
    nonempty = denom > 0
    safe = torch.where(nonempty, denom, torch.ones_like(denom))
    out = (e @ v) / safe
    lse = torch.where(nonempty, torch.log(safe) + m, torch.full_like(m, -math.inf))[..., 0]
    return out, lse, vis


# =============================================================================================
# strategies
# =============================================================================================


def _split(draw, total, max_docs=4):
    """A list of document lengths (zeros allowed) summing to at most ``total``."""
    n = draw(st.integers(1, max_docs))
    out = [draw(st.integers(0, max(total, 0))) for _ in range(n)]
    while sum(out) > total:
        i = out.index(max(out))
        out[i] -= 1
    return out


@st.composite
def geometry(draw):
    B = draw(st.integers(1, 3))
    Hkv = draw(st.sampled_from([1, 2]))
    ratio = draw(st.sampled_from([1, 2, 4]))
    Sq = draw(st.sampled_from([1, 1, 2, 3, 4, 5, 6, 7, 9]))
    Sk = draw(st.sampled_from([1, 1, 2, 3, 4, 5, 6, 8, 10]))
    D = draw(st.sampled_from([1, 3, 4, 8]))
    Dv = draw(st.sampled_from([2, 4, 5]))
    scale = draw(st.sampled_from([None, None, 0.3, 1.7]))
    return {"B": B, "Hkv": Hkv, "Hq": Hkv * ratio, "Sq": Sq, "Sk": Sk, "D": D, "Dv": Dv, "scale": scale}


def leaf_strategy(draw, g, with_sequence_terms):
    B, Hq, Sq, Sk = g["B"], g["Hq"], g["Sq"], g["Sk"]
    kinds = ["causal", "window", "chunked", "prefix", "mask_fn", "dense"]
    if with_sequence_terms and Sq <= Sk:  # the library refuses these for Sq > Sk (ArgumentError)
        kinds += ["documents", "padding", "block_causal", "same_segment"]
    elif Sq <= Sk:
        kinds += ["block_causal", "same_segment"]
    kind = draw(st.sampled_from(kinds))
    big = Sk + 3  # windows / chunks larger than the sequence
    if kind == "causal":
        return RCausal()
    if kind == "window":
        left = draw(st.one_of(st.none(), st.integers(0, big)))
        right = draw(st.one_of(st.none(), st.integers(0, big)))
        return RWindow(left, right)
    if kind == "chunked":
        return RChunked(draw(st.integers(1, big)))
    if kind == "prefix":
        if draw(st.booleans()):
            return RPrefix(draw(st.integers(0, big)))
        return RPrefix([draw(st.integers(0, big)) for _ in range(B)])
    if kind == "mask_fn":
        return RMaskFn(draw(st.sampled_from(sorted(MASK_FNS))))
    if kind == "dense":
        shape = draw(st.sampled_from([(Sq, Sk), (Sk,), (1, Hq, Sq, Sk), (B, 1, Sq, Sk), (B, Hq, Sq, Sk), (B, Hq, Sq, 1),
                                      (B, 1, 1, Sk), (Hq, Sq, Sk), (Sq, 1)]))  # fmt: skip
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        bits = torch.rand(shape, generator=gen) < draw(st.sampled_from([0.2, 0.5, 0.9]))
        dt = draw(st.sampled_from([torch.bool, torch.uint8]))
        return RDense(bits.to(dt))
    if kind == "documents":
        form = draw(st.sampled_from(["list", "lists", "tensor1d", "tensor2d", "seqinfo"]))
        if form in ("list", "tensor1d"):
            return RDocuments([_split(draw, Sk)], form)
        rows = [_split(draw, Sk) for _ in range(B)]
        if form == "seqinfo" and not any(sum(r) for r in rows):
            rows[0][0] = 1  # SeqInfo.from_lengths wants one token somewhere
        return RDocuments(rows, form, Sk)
    if kind == "padding":
        form = draw(st.sampled_from(["lengths", "keep", "seqinfo"]))
        if form == "lengths":
            return RPadding(lengths=[draw(st.integers(0, Sk)) for _ in range(B)])
        return RPadding(keep=[[draw(st.booleans()) for _ in range(Sk)] for _ in range(B)], seqinfo=form == "seqinfo")
    ids_lo, ids_hi = (-1, 2) if kind == "same_segment" else (-2, 3)
    shared = draw(st.booleans())
    rows = 1 if shared else B
    term = (RSameSegment if kind == "same_segment" else RBlockCausal)(
        [[draw(st.integers(ids_lo, ids_hi)) for _ in range(Sk)] for _ in range(rows)]
    )
    term.shared = shared
    return term


def expr_strategy(draw, g, depth, with_sequence_terms):
    if depth == 0 or draw(st.integers(0, 2)) == 0:
        leaf = leaf_strategy(draw, g, with_sequence_terms)
        return ~leaf if draw(st.integers(0, 5)) == 0 else leaf
    a = expr_strategy(draw, g, depth - 1, with_sequence_terms)
    b = expr_strategy(draw, g, depth - 1, with_sequence_terms)
    op = draw(st.sampled_from(["&", "&", "|", "~&"]))
    if op == "&":
        return a & b
    if op == "|":
        return a | b
    return ~(a & b)


def layout_strategy(draw, g):
    B, Sq, Sk = g["B"], g["Sq"], g["Sk"]
    kind = draw(st.sampled_from(["documents_kv", "padding_kv"]))
    if kind == "documents_kv":
        n = draw(st.integers(1, 3))
        shared = draw(st.booleans())
        rows = 1 if shared else B
        qrows, krows = [], []
        for _ in range(rows):
            full_q = draw(st.booleans())  # every query in a document (so | and ~ are well defined)
            qs = [draw(st.integers(0, Sq)) for _ in range(n)]
            while sum(qs) > Sq:
                qs[qs.index(max(qs))] -= 1
            if full_q:
                qs[-1] += Sq - sum(qs)
            ks = [draw(st.integers(0, Sk)) for _ in range(n)]
            while sum(ks) > Sk:
                ks[ks.index(max(ks))] -= 1
            qrows.append(qs)
            krows.append(ks)
        use_info = draw(st.booleans()) and any(map(sum, qrows)) and any(map(sum, krows))
        return RDocumentsKV(qrows, krows, (Sq, Sk) if use_info else None)
    form = draw(st.sampled_from(["lengths", "kv_only", "masks"]))
    if form == "masks":
        # keep-masks with holes; at most as many real queries as real keys (more is ambiguous)
        kk = [[draw(st.booleans()) for _ in range(Sk)] for _ in range(B)]
        qk = []
        for b in range(B):
            m = sum(kk[b])
            row = [draw(st.booleans()) for _ in range(Sq)]
            while sum(row) > m:
                row[row.index(True)] = False
            qk.append(row)
        return RPaddingKV(q_keep=qk, kv_keep=kk)
    kv = [draw(st.integers(0, Sk)) for _ in range(B)]
    if form == "kv_only":
        return RPaddingKV(kv_lengths=kv)
    return RPaddingKV(q_lengths=[draw(st.integers(0, Sq)) for _ in range(B)], kv_lengths=kv)


def mask_strategy(draw, g):
    choice = draw(st.sampled_from(["none", "expr", "expr", "expr", "layout", "layout"]))
    if choice == "none":
        return None
    if choice == "expr":
        return expr_strategy(draw, g, 2, True)
    lay = layout_strategy(draw, g)
    rest = expr_strategy(draw, g, 1, False) if draw(st.integers(0, 3)) else None
    if rest is None:
        return lay
    if lay.all_queries_placed(g["B"], g["Sq"], g["Sk"]) and draw(st.booleans()):
        # every query has an i': the layout term may sit under | and ~
        op = draw(st.sampled_from(["|", "~&", "&~"]))
        if op == "|":
            return lay | rest
        if op == "~&":
            return ~lay & rest
        return rest & lay
    return lay & rest


def score_strategy(draw, g):
    B, Hq, Sq, Sk = g["B"], g["Hq"], g["Sq"], g["Sk"]
    n = draw(st.integers(0, 3))
    out = []
    for _ in range(n):
        kind = draw(st.sampled_from(["softcap", "alibi", "bias", "relbias", "score_fn"]))
        seed = draw(st.integers(0, 2**16))
        gen = torch.Generator().manual_seed(seed)
        # float64 slopes, bias tensors and relative-bias tables with values float32 cannot hold:
        # eager keeps them in float64 (test_eager_float64_keeps_additive_score_terms_in_float64)
        if kind == "softcap":
            out.append(RSoftcap(draw(st.sampled_from([0.3, 1.0, 2.5, 20.0]))))
        elif kind == "alibi":
            if draw(st.booleans()):
                slopes = alibi_slopes(Hq)  # powers of two for Hq in {1, 2, 4, 8}
            else:
                slopes = (torch.randn(Hq, generator=gen, dtype=F64) * 0.7).tolist()
            out.append(RAlibi(slopes))
        elif kind == "bias":
            shape = draw(
                st.sampled_from(
                    [(Sq, Sk), (Sk,), (B, Hq, Sq, Sk), (1, Hq, 1, Sk), (B, 1, Sq, 1), (B, 1, 1, Sk), (Hq, Sq, Sk)]
                )
            )
            t = torch.randn(shape, generator=gen, dtype=F64).requires_grad_(draw(st.booleans()))
            out.append(RBias(t))
        elif kind == "relbias":
            bi = draw(st.booleans())
            nb = draw(st.integers(4 if bi else 2, 12))
            max_exact = (nb // 2 if bi else nb) // 2
            md = draw(st.integers(max_exact + 1, max_exact + 12))
            out.append(RRelBias(torch.randn(Hq, nb, generator=gen, dtype=F64), nb, md, bi))
        else:
            out.append(RScoreFn(draw(st.sampled_from(sorted(SCORE_FNS)))))
    sink = None
    if draw(st.integers(0, 3)) == 0:
        sink = torch.randn(Hq, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))), dtype=F64) * 2
    return out, sink


@st.composite
def case(draw):
    g = geometry()
    g = draw(g)
    mask = mask_strategy(draw, g)
    scores, sink = score_strategy(draw, g)
    seed = draw(st.integers(0, 2**20))
    return g, mask, scores, sink, seed


def make_qkv(g, seed, dtype):
    """q, k, v leaves; every third seed as ``.transpose(1, 2)`` views of (B, S, H, D) memory."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(g["B"], g["Hq"], g["Sq"], g["D"], generator=gen, dtype=F64)
    k = torch.randn(g["B"], g["Hkv"], g["Sk"], g["D"], generator=gen, dtype=F64)
    v = torch.randn(g["B"], g["Hkv"], g["Sk"], g["Dv"], generator=gen, dtype=F64)
    out = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
    if seed % 3 == 0:
        out = [t.detach().transpose(1, 2).contiguous().requires_grad_(True).transpose(1, 2) for t in out]
    return out


# =============================================================================================
# checks
# =============================================================================================


def _assert_close(got, want, atol, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    got, want = got.detach().to(F64), want.detach().to(F64)
    inf_g, inf_w = torch.isinf(got), torch.isinf(want)
    assert torch.equal(inf_g, inf_w) and torch.equal(got[inf_g], want[inf_w]), f"{what}: -inf pattern differs"
    assert not torch.isnan(got).any(), f"{what}: NaN"
    fin = ~inf_w
    err = (got[fin] - want[fin]).abs().max().item() if fin.any() else 0.0
    assert err <= atol, f"{what}: max abs error {err:.3e} > {atol:.0e}"


def run_library(g, mask, scores, sink, seed, dtype, backend, return_lse):
    q, k, v = make_qkv(g, seed, dtype)
    sk = None if sink is None else sink.detach().to(dtype).requires_grad_(True)
    terms = lib_scores(scores, dtype)
    if sk is not None:
        terms.append(aa.sink(sk))
    res = aa.attention(q, k, v, mask=None if mask is None else mask.lib(), score=terms or None, scale=g["scale"],
                       backend=backend, return_lse=return_lse)  # fmt: skip
    out, lse = (res.out, res.lse) if return_lse else (res, None)
    learn = [("sink", sk)] if sk is not None else []
    learn += [(repr(t), t.leaf) for t in scores if isinstance(t, (RBias, RRelBias)) and t.leaf.requires_grad]
    return (q, k, v), out, lse, learn


def run_reference(g, mask, scores, sink, seed, dtype):
    q, k, v = make_qkv(g, seed, dtype)
    q64, k64, v64 = (t.detach().to(F64).requires_grad_(True) for t in (q, k, v))
    sk = None if sink is None else sink.detach().to(dtype).to(F64).requires_grad_(True)
    out, lse, vis = ref_attention(q64, k64, v64, mask, scores, sk, g["scale"])
    learn = [("sink", sk)] if sk is not None else []
    learn += [(repr(t), t.ref_leaf) for t in scores if isinstance(t, (RBias, RRelBias)) and t.ref_leaf.requires_grad]
    return (q64, k64, v64), out, lse, learn, vis


def check_against_reference(g, mask, scores, sink, seed, dtype, backend, atol, gatol, return_lse):
    # the library first: RBias / RRelBias keep the leaf handed to it (``leaf``)
    (lq, lk, lv), out, lse, llearn = run_library(g, mask, scores, sink, seed, dtype, backend, return_lse)
    (rq, rk, rv), rout, rlse, rlearn, vis = run_reference(g, mask, scores, sink, seed, dtype)
    assert out.dtype == dtype
    _assert_close(out, rout, atol, f"{backend} out")
    if return_lse:
        _assert_close(lse, rlse, atol, f"{backend} lse")
    # rows with no visible key: exactly 0
    empty = ~vis.any(-1)
    if empty.any():
        assert (out.detach()[empty] == 0).all(), f"{backend}: a row with no visible key is not exactly 0"
    # backward: a random cotangent on out (and on lse where finite)
    gen = torch.Generator().manual_seed(seed + 1)
    go = torch.randn(rout.shape, generator=gen, dtype=F64)
    loss_l = (out.to(F64) * go).sum()
    loss_r = (rout * go).sum()
    if return_lse:
        gl = torch.randn(rlse.shape, generator=gen, dtype=F64)
        fin = torch.isfinite(rlse)
        loss_l = loss_l + (torch.where(fin, lse.to(F64), 0.0) * gl).sum()
        loss_r = loss_r + (torch.where(fin, rlse, 0.0) * gl).sum()
    lt = [lq, lk, lv] + [t for _, t in llearn]
    rt = [rq, rk, rv] + [t for _, t in rlearn]
    names = ["dq", "dk", "dv"] + [f"d {n}" for n, _ in llearn]
    lg = torch.autograd.grad(loss_l, lt, allow_unused=True)
    rg = torch.autograd.grad(loss_r, rt, allow_unused=True)
    for idx, (n, a, b, t) in enumerate(zip(names, lg, rg, rt)):
        a = torch.zeros_like(t) if a is None else a
        b = torch.zeros_like(t) if b is None else b
        _assert_close(a, b, gatol, f"{backend} {n}")


def describe(g, mask, scores, sink):
    return f"geometry={g} mask={mask!r} scores={scores!r} sink={None if sink is None else sink.tolist()}"


SETTINGS = {"deadline": None, "derandomize": True, "database": None, "phases": [Phase.explicit, Phase.generate],
                "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]}  # fmt: skip


# =============================================================================================
# fuzz: eager in float64 against the reference (forward, lse, gradients), explain
# =============================================================================================


@settings(max_examples=90, **SETTINGS)
@given(case())
def test_fuzz_eager_float64_matches_reference(c):
    g, mask, scores, sink, seed = c
    note = describe(g, mask, scores, sink)
    try:
        check_against_reference(g, mask, scores, sink, seed, F64, "eager", 1e-10, 1e-9, True)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{note}") from None
    q, k, v = make_qkv(g, seed, F64)
    terms = lib_scores(scores, F64) + ([aa.sink(sink)] if sink is not None else [])
    d = aa.explain(q, k, v, mask=None if mask is None else mask.lib(), score=terms or None, scale=g["scale"])
    assert d.chosen is not None, note
    assert str(d)


# =============================================================================================
# fuzz: sdpa (float32) where the README says it serves the call, refusal where it says not; auto
# =============================================================================================


def sdpa_should_serve(scores, sink):
    # README backends table: sdpa serves "masks, additive scores (alibi, bias, relative_bias)"; no lse;
    # docs/serving.md: sinks refused on sdpa
    return sink is None and all(isinstance(t, (RAlibi, RBias, RRelBias)) for t in scores)


@settings(max_examples=50, **SETTINGS)
@given(case())
def test_fuzz_sdpa_and_auto_float32_match_reference(c):
    g, mask, scores, sink, seed = c
    note = describe(g, mask, scores, sink)
    if sdpa_should_serve(scores, sink):
        try:
            check_against_reference(g, mask, scores, sink, seed, F32, "sdpa", 1e-5, 1e-4, False)
        except aa.UnsupportedError as e:
            raise AssertionError(f"sdpa refused a call the README says it serves: {e}\n{note}") from None
        except AssertionError as e:
            raise AssertionError(f"{e}\n{note}") from None
    else:
        with pytest.raises(aa.UnsupportedError):
            run_library(g, mask, scores, sink, seed, F32, "sdpa", False)
    # auto: whatever it picks must match the reference (lse too: it must pick a backend with lse)
    try:
        check_against_reference(g, mask, scores, sink, seed, F32, "auto", 1e-5, 1e-4, True)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{note}") from None
    q, k, v = make_qkv(g, seed, F32)
    terms = lib_scores(scores, F32) + ([aa.sink(sink.float())] if sink is not None else [])
    d = aa.explain(
        q, k, v, mask=None if mask is None else mask.lib(), score=terms or None, scale=g["scale"], return_lse=True
    )
    assert d.chosen is not None and str(d), note


# =============================================================================================
# hand-picked cases from the docs' own pictures and edge cases
# =============================================================================================


def _qkv(B, Hq, Hkv, Sq, Sk, D=4, Dv=3, seed=0, dtype=F64):
    return make_qkv({"B": B, "Hq": Hq, "Hkv": Hkv, "Sq": Sq, "Sk": Sk, "D": D, "Dv": Dv}, seed, dtype)


def test_readme_picture_causal_bottom_right():
    # README: causal(), Sq=2, Sk=5: query 0 (i'=3) sees keys 0..3, query 1 sees 0..4;
    # causal(), Sq=5, Sk=2: queries 0..2 see no key (output 0)
    q, k, v = _qkv(1, 1, 1, 2, 5)
    w = aa.attention_with_weights(q, k, v, mask=aa.causal())[1][0, 0]
    assert ((w > 0) == torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)).all()
    q, k, v = _qkv(1, 1, 1, 5, 2)
    for be in ["eager", "sdpa", "auto"]:
        out = aa.attention(q, k, v, mask=aa.causal(), backend=be)
        assert (out[0, 0, :3] == 0).all() and (out[0, 0, 3:] != 0).all()
    res = aa.attention(q, k, v, mask=aa.causal(), backend="eager", return_lse=True)
    assert torch.isinf(res.lse[0, 0, :3]).all() and torch.isfinite(res.lse[0, 0, 3:]).all()


def test_serving_picture_documents_kv_causal():
    # docs/serving.md: documents([3, 1, 2], kv=[6, 4, 2]) & causal():
    # a0 sees A0..A3, a1 A0..A4, a2 A0..A5; b0 sees B0..B3; c0 sees C0, c1 C0..C1
    q, k, v = _qkv(1, 2, 1, 6, 12)
    w = aa.attention_with_weights(q, k, v, mask=aa.documents([3, 1, 2], kv=[6, 4, 2]) & aa.causal())[1][0, 0] > 0
    want = torch.zeros(6, 12, dtype=torch.bool)
    want[0, 0:4] = want[1, 0:5] = want[2, 0:6] = True
    want[3, 6:10] = True
    want[4, 10:11] = want[5, 10:12] = True
    assert torch.equal(w, want)
    ref = RDocumentsKV([[3, 1, 2]], [[6, 4, 2]]) & RCausal()
    assert torch.equal(visibility(ref, Ctx(1, 1, 6, 12, find_layout(ref)))[0, 0], want)


@pytest.mark.parametrize(
    "name,mask,Sq,Sk",
    [
        # zero-length documents, lengths summing to less than S, per-row ragged lists
        ("zero_docs", RDocuments([[0, 3, 0, 2, 0]]) & RCausal(), 7, 7),
        ("ragged_rows", RDocuments([[2, 0, 3], [7], [0]], "lists") & RWindow(1, 1), 5, 7),
        ("docs_tensor_rows", RDocuments([[1, 2], [0, 4], [3, 0]], "tensor2d") | RCausal(), 4, 6),
        # windows larger than the sequence, both sides
        ("window_huge", RWindow(50, 50), 3, 6),
        ("window_right_sq_gt_sk", RWindow(0, 2), 6, 3),
        # chunked with queries before the first key (i' < 0 floors to a negative chunk)
        ("chunked_neg", RChunked(3), 7, 4),
        ("prefix_sq_gt_sk", RPrefix([2, 0, 5]) & ~RChunked(2), 6, 4),
        # documents kv: a document with more queries than keys, one without keys, one without queries
        ("docs_kv_more_q", RDocumentsKV([[3, 0, 2]], [[1, 2, 0]]) & RCausal(), 5, 4),
        ("docs_kv_window", RDocumentsKV([[2, 2], [1, 3], [4, 0]], [[3, 5], [6, 2], [2, 6]]) & RWindow(1, 1), 4, 8),
        ("docs_kv_chunk", RDocumentsKV([[2, 2]], [[5, 3]]) & RChunked(2), 4, 8),
        # padding kv: decode next to prefill; more real queries than real keys (key lengths)
        ("padding_kv", RPaddingKV(q_lengths=[1, 3, 0], kv_lengths=[5, 4, 2]) & RCausal(), 3, 6),
        ("padding_kv_more_q", RPaddingKV(kv_lengths=[1, 0, 3]) & RWindow(None, 1), 4, 3),
        (
            "padding_kv_masks",
            RPaddingKV(
                q_keep=[[0, 1, 1], [1, 0, 1], [1, 1, 1]], kv_keep=[[1, 0, 1, 1, 0], [0, 1, 1, 0, 1], [1, 1, 0, 1, 1]]
            )
            & RCausal(),
            3,
            5,
        ),
        ("padding_left", RPadding(keep=[[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]) & RCausal(), 3, 5),
        ("segments_image", RCausal() | RSameSegment([[-1, 0, 0, -1, 1, 1]]), 6, 6),
        ("block_causal_rows", RBlockCausal([[0, 0, 1, 1, 2], [0, 1, 1, 1, 1], [3, 2, 1, 0, 0]]), 3, 5),
    ],
)
def test_hand_picked_masks(name, mask, Sq, Sk):
    g = {"B": 3, "Hq": 4, "Hkv": 2, "Sq": Sq, "Sk": Sk, "D": 4, "Dv": 3, "scale": None}
    scores = [RAlibi(alibi_slopes(4))]
    check_against_reference(g, mask, scores, None, 7, F64, "eager", 1e-10, 1e-9, True)
    check_against_reference(g, mask, scores, None, 7, F32, "sdpa", 1e-5, 1e-4, False)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_buckets_long_distances(bidirectional):
    # distances well past max_distance, every log bucket; zero logits make out the softmax of the table
    Sq, Sk, nb, md = 3, 300, 32, 128
    g = {"B": 1, "Hq": 2, "Hkv": 1, "Sq": Sq, "Sk": Sk, "D": 2, "Dv": 3, "scale": 0.0}
    table = (torch.randn(2, nb, generator=torch.Generator().manual_seed(3), dtype=F64) * 3)
    for mask in [None, RWindow(None, None) & ~RChunked(100)]:
        check_against_reference(
            g, mask, [RRelBias(table, nb, md, bidirectional)], None, 1, F64, "eager", 1e-10, 1e-9, True
        )
    # and the queries in the middle of the keys (the table's positive side)
    q, k, v = _qkv(1, 2, 1, 200, 200, D=2)
    # only a few rows through the reference (it is loops): a mask_fn keeps rows 0, 100 and 199
    out = aa.attention(q, k, v, score=aa.relative_bias(table, nb, md, bidirectional), scale=0.0, backend="eager")
    for i in (0, 100, 199):
        idx = torch.tensor([t5_bucket(j - i, nb, md, bidirectional) for j in range(200)])
        w = torch.softmax(table[:, idx], -1)  # (H, Sk)
        want = w @ v[0, 0].detach()
        assert (out[0, :, i].detach() - want).abs().max() < 1e-10


def test_score_terms_apply_in_order():
    # softcap then bias != bias then softcap; each must match its own order
    g = {"B": 2, "Hq": 2, "Hkv": 1, "Sq": 4, "Sk": 5, "D": 4, "Dv": 3, "scale": 2.0}
    t = (torch.randn(2, 2, 4, 5, generator=torch.Generator().manual_seed(0), dtype=F64) * 3)
    for order in (
        [RSoftcap(0.5), RBias(t)],
        [RBias(t), RSoftcap(0.5)],
        [RScoreFn("lin"), RSoftcap(1.0), RAlibi([0.5, 1.0])],
    ):
        check_against_reference(g, RCausal(), order, None, 5, F64, "eager", 1e-10, 1e-9, True)


def test_sink_on_empty_rows_and_gradients():
    # docs/serving.md: a row that sees no key outputs 0 and its lse is sink[h]; gradients reach the logits
    g = {"B": 2, "Hq": 4, "Hkv": 2, "Sq": 5, "Sk": 3, "D": 4, "Dv": 2, "scale": None}
    sink = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=F64)
    check_against_reference(g, RCausal(), [RSoftcap(2.0)], sink, 3, F64, "eager", 1e-10, 1e-9, True)
    check_against_reference(g, RPaddingKV(kv_lengths=[0, 2]), [], sink, 3, F64, "eager", 1e-10, 1e-9, True)
    q, k, v = _qkv(1, 4, 2, 5, 3)
    res = aa.attention(q, k, v, mask=aa.causal(), score=aa.sink(sink), backend="eager", return_lse=True)
    assert (res.out[0, :, :2] == 0).all()
    assert torch.equal(res.lse[0, :, 0].to(F64), sink)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_lse_is_float32_natural_log(dtype):
    # README: "AttentionOutput(out, lse) with return_lse=True (lse float32, natural log, -inf where
    # a row sees no key)". Float64 calls return a float64 lse (the oracle's precision; the README's
    # "float32" is read as "at least float32": reported as a docs imprecision, not asserted)
    q, k, v = _qkv(1, 2, 1, 3, 2, dtype=dtype)
    res = aa.attention(q, k, v, mask=aa.causal(), backend="eager", return_lse=True)
    assert res.lse.dtype == (torch.float32 if dtype != F64 else res.lse.dtype)
    assert res.lse.dtype in (torch.float32, F64)
    _, rlse, _ = ref_attention(q.detach(), k.detach(), v.detach(), RCausal())
    assert torch.equal(torch.isinf(res.lse), torch.isinf(rlse))
    fin = torch.isfinite(rlse)
    assert (res.lse[fin].double() - rlse[fin]).abs().max() < (1e-5 if dtype != torch.bfloat16 else 1e-2)


# =============================================================================================
# library bugs found by this file (fixed since; the fuzz above draws these cases too)
# =============================================================================================


def test_negated_unbounded_window_composes():
    # README: sliding_window(left, right): None = unbounded; masks combine with &, | and ~.
    # ~sliding_window(None, None) is "no key"; composing it must build a term, not recurse forever.
    q, k, v = _qkv(1, 1, 1, 3, 3)
    for build, rule in [
        (lambda: aa.causal() & ~aa.sliding_window(None, None), RCausal() & ~RWindow(None, None)),
        (lambda: ~aa.sliding_window(None, None) | aa.chunked(2), ~RWindow(None, None) | RChunked(2)),
    ]:
        mask = build()  # RecursionError here
        out = aa.attention(q, k, v, mask=mask, backend="eager")
        want, _, _ = ref_attention(q.detach(), k.detach(), v.detach(), rule)
        assert (out.detach() - want).abs().max() < 1e-10


def test_layout_term_kept_under_unbounded_or():
    # docs/serving.md: with documents(q, kv=k) "ALiBi and T5 buckets measure from each query's own
    # position i' (i' = i + kv_end[n] - q_end[n])". `documents([2], kv=[4]) | sliding_window(None,
    # None)` shows every key, but its queries still sit at keys 2 and 3 (not at 4 and 5).
    q = torch.zeros(1, 1, 2, 4, dtype=F64)
    k = torch.zeros(1, 1, 6, 4, dtype=F64)
    v = torch.eye(6, dtype=F64)[None, None]
    al = aa.alibi(torch.tensor([1.0], dtype=F64))
    ref_mask = RDocumentsKV([[2]], [[4]]) | RWindow(None, None)
    want, _, _ = ref_attention(q, k, v, ref_mask, [RAlibi([1.0])])
    assert [int(want[0, 0, i].argmax()) for i in range(2)] == [2, 3]  # the reference: i' = 2, 3
    same_without_canonicalization = aa.attention(
        q, k, v, mask=aa.documents([2], kv=[4]) | aa.causal() | ~aa.causal(), score=al, backend="eager"
    )
    assert (same_without_canonicalization - want).abs().max() < 1e-10  # passes: layout kept
    out = aa.attention(
        q, k, v, mask=aa.documents([2], kv=[4]) | aa.sliding_window(None, None), score=al, backend="eager"
    )
    assert (out - want).abs().max() < 1e-10, f"queries placed at keys {[int(out[0, 0, i].argmax()) for i in range(2)]}"


def test_eager_float64_keeps_additive_score_terms_in_float64():
    # eager is "the oracle (on float64 inputs)" (README); its module docstring: "everything after
    # in float32 (float64 for float64 input)". bias / relative_bias / alibi values must not be
    # rounded to float32 in a float64 call (s + tensor[b, h, i, j] with the tensor's values).
    g = {"B": 2, "Hq": 2, "Hkv": 1, "Sq": 3, "Sk": 4, "D": 4, "Dv": 3, "scale": None}
    gen = torch.Generator().manual_seed(0)
    bias_t = (torch.randn(2, 2, 3, 4, generator=gen, dtype=F64) * 3).requires_grad_(True)
    table = torch.randn(2, 8, generator=gen, dtype=F64) * 3
    slopes = (torch.rand(2, generator=gen, dtype=F64) + 0.1).tolist()
    for scores in ([RBias(bias_t)], [RRelBias(table, 8, 6, True)], [RAlibi(slopes)]):
        check_against_reference(g, RCausal(), scores, None, 2, F64, "eager", 1e-10, 1e-9, True)


# =============================================================================================
# more documented behaviour
# =============================================================================================


def test_sdpa_refuses_lse_and_non_additive_scores():
    # README: sdpa serves masks and additive scores, "No lse"; docs/serving.md: sinks refused on sdpa
    q, k, v = _qkv(1, 2, 1, 3, 3, dtype=F32)
    for kw in [{"return_lse": True}, {"score": aa.softcap(2.0)}, {"score": aa.score_fn(SCORE_FNS["lin"])},
               {"score": aa.sink(torch.zeros(2))}]:  # fmt: skip
        with pytest.raises(aa.UnsupportedError):
            aa.attention(q, k, v, mask=aa.causal(), backend="sdpa", **kw)


def test_attention_with_weights_match_reference():
    g = {"B": 2, "Hq": 4, "Hkv": 2, "Sq": 4, "Sk": 6, "D": 3, "Dv": 2, "scale": 0.7}
    mask = RDocuments([[2, 0, 3]]) & RWindow(1, 1) | RPrefix([1, 0])
    q, k, v = make_qkv(g, 4, F64)
    out, w = aa.attention_with_weights(q, k, v, mask=mask.lib(), score=[aa.softcap(1.5)], scale=0.7)
    rout, _rlse, vis = ref_attention(q.detach(), k.detach(), v.detach(), mask, [RSoftcap(1.5)], scale=0.7)
    # weights: positive exactly on the visible pairs (float64 here, though the docstring says
    # float32: the same "at least float32" reading as the lse)
    assert torch.equal(w > 0, vis)
    assert ((w.to(F64).sum(-1) - vis.any(-1).to(F64)).abs() < 1e-10).all()  # rows sum to 1 (0 if empty)
    assert (w.to(F64) @ v.detach().repeat_interleave(2, 1) - rout).abs().max() < 1e-10
    assert (out.detach() - rout).abs().max() < 1e-10


def test_non_finite_values_and_empty_rows():
    # README: "a NaN or inf in a key or value that a row can see makes that row NaN on every
    # backend; rows that see no key are exactly 0 whatever the values hold". (A NaN at a key a
    # row cannot see "may still reach it": it does on eager and sdpa too, 0 x NaN; not asserted.)
    q, k, v = _qkv(1, 1, 1, 5, 2, dtype=F32)
    q, k, v = q.detach(), k.detach().clone(), v.detach().clone()
    for which in ("k", "v"):
        kk, vv = k.clone(), v.clone()
        (kk if which == "k" else vv)[0, 0, 1] = float("nan")
        for be in ["eager", "sdpa"]:
            out = aa.attention(q, kk, vv, mask=aa.causal(), backend=be)
            assert (out[0, 0, :3] == 0).all()  # i' = -3..-1: no key
            assert torch.isnan(out[0, 0, 4]).all()  # sees key 1


_EDITS = {
    # term builder from a tensor X; the reference term from X's values; an in-place edit
    "dense": (
        lambda X: aa.dense(X),
        lambda X: RDense(X.clone()),
        lambda: torch.ones(5, 5, dtype=torch.bool),
        lambda X: X.fill_(False).fill_diagonal_(True),
    ),
    "padding_mask": (
        lambda X: aa.padding(mask=X),
        lambda X: RPadding(keep=X.tolist()),
        lambda: torch.ones(2, 5, dtype=torch.bool),
        lambda X: X[:, 3:].fill_(False),
    ),
    "padding_lengths": (
        lambda X: aa.padding(X),
        lambda X: RPadding(lengths=X.tolist()),
        lambda: torch.tensor([5, 5]),
        lambda X: X.copy_(torch.tensor([2, 4])),
    ),
    "prefix_lm": (
        lambda X: aa.prefix_lm(X),
        lambda X: RPrefix(X.tolist()),
        lambda: torch.tensor([0, 0]),
        lambda X: X.copy_(torch.tensor([4, 2])),
    ),
    "block_causal": (
        lambda X: aa.block_causal(X),
        lambda X: RBlockCausal([X.tolist()]),
        lambda: torch.zeros(5, dtype=torch.long),
        lambda X: X.copy_(torch.tensor([0, 0, 1, 1, 2])),
    ),
    "same_segment": (
        lambda X: aa.same_segment(X),
        lambda X: RSameSegment([X.tolist()]),
        lambda: torch.zeros(5, dtype=torch.long),
        lambda X: X.copy_(torch.tensor([0, -1, 1, 1, 0])),
    ),
    "documents": (
        lambda X: aa.documents(X),
        lambda X: RDocuments([X.tolist()]),
        lambda: torch.tensor([5]),
        lambda X: X.copy_(torch.tensor([2])),
    ),
}


@pytest.mark.parametrize("name", sorted(_EDITS))
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_new_term_from_edited_tensor_sees_the_edit(name, backend):
    # README: caches are keyed on content (small CPU tensors by value, other tensors by identity +
    # version): a term built after an in-place edit must compute the new content
    build, ref, make, edit = _EDITS[name]
    g = {"B": 2, "Hq": 2, "Hkv": 1, "Sq": 5, "Sk": 5, "D": 4, "Dv": 3, "scale": None}
    q, k, v = (t.detach() for t in make_qkv(g, 1, F64))
    X = make()
    first = aa.attention(q, k, v, mask=build(X), backend=backend)
    edit(X)
    second = aa.attention(q, k, v, mask=build(X), backend=backend)
    want, _, _ = ref_attention(q, k, v, ref(X))
    assert (second - want).abs().max() < 1e-10
    assert not torch.equal(first, second)


def test_score_tensors_edited_in_place_are_seen():
    # bias / alibi / relative_bias / sink tensors: "other tensors ... by an identity token plus the
    # version counter (in-place edits are seen)"
    g = {"B": 1, "Hq": 2, "Hkv": 1, "Sq": 4, "Sk": 4, "D": 4, "Dv": 3, "scale": None}
    q, k, v = (t.detach() for t in make_qkv(g, 2, F64))
    bias_t, slopes, table, sink = (
        torch.zeros(4, 4, dtype=F64),
        torch.zeros(2, dtype=F64),
        torch.zeros(2, 4, dtype=F64),
        torch.zeros(2, dtype=F64),
    )
    terms = [aa.bias(bias_t), aa.alibi(slopes), aa.relative_bias(table, 4, 5), aa.sink(sink)]
    aa.attention(q, k, v, mask=aa.causal(), score=terms, backend="eager")
    bias_t.copy_(torch.arange(16, dtype=F64).view(4, 4) / 8)
    slopes.copy_(torch.tensor([0.5, 0.25]))
    table.copy_(torch.arange(8, dtype=F64).view(2, 4) / 4)
    sink.copy_(torch.tensor([1.0, -1.0]))
    out = aa.attention(q, k, v, mask=aa.causal(), score=terms, backend="eager")  # the same term objects
    want, _, _ = ref_attention(
        q, k, v, RCausal(), [RBias(bias_t.clone()), RAlibi([0.5, 0.25]), RRelBias(table.clone(), 4, 5, True)], sink
    )
    assert (out - want).abs().max() < 1e-10


@pytest.mark.parametrize("paged", [False, True])
def test_kv_cache_steps_match_reference(paged):
    # docs/serving.md: attention(q, kv=view) ANDs the cache's key layout (padding(q_lengths,
    # kv=cached) for rows, documents(new, kv=cached) for packed steps) with the mask and scores;
    # each sequence's new tokens sit bottom-right among its keys
    Hq, Hkv, D = 4, 2, 4
    torch.manual_seed(0)
    if paged:
        cache = aa.PagedKVCache(pages=8, page_size=16, kv_heads=Hkv, head_dim=D, dtype=F64)
        seqs = [cache.add_sequence() for _ in range(3)]
    else:
        cache = aa.ContiguousKVCache(3, 16, Hkv, D, dtype=F64)
    keys = [[] for _ in range(3)]  # per sequence: list of (k, v) of shape (Hkv, D)
    slopes = [0.5, 0.25, 0.125, 0.0625]
    sink = torch.tensor([0.3, -0.2, 1.0, 0.0], dtype=F64)
    for new in ([3, 5, 1], [1, 0, 2], [2, 1, 1]):
        if paged:
            step = cache.step(seqs, new, layout="packed")
            Sq, rows = sum(new), 1
        else:
            step = cache.step(new)
            Sq, rows = max(new), 3
        q = torch.randn(rows, Hq, Sq, D, dtype=F64)
        kn, vn = torch.randn(rows, Hkv, Sq, D, dtype=F64), torch.randn(rows, Hkv, Sq, D, dtype=F64)
        view = step.write(0, kn, vn)
        out = aa.attention(q, kv=view, mask=aa.causal(), score=[aa.softcap(3.0), aa.alibi(torch.tensor(slopes, dtype=F64)), aa.sink(sink)],
                           backend="eager")  # fmt: skip
        # the reference: each sequence on its own row, its cached keys then its new ones
        pos = 0
        for s, n in enumerate(new):
            r, cols = (0, range(pos, pos + n)) if paged else (s, range(n))
            for c in cols:
                keys[s].append((kn[r, :, c], vn[r, :, c]))
            if n == 0:
                if not paged:
                    assert (out[s] == 0).all()
                continue
            K = torch.stack([kk for kk, _ in keys[s]], 1)[None]
            V = torch.stack([vv for _, vv in keys[s]], 1)[None]
            want, _, _ = ref_attention(
                q[r : r + 1, :, list(cols)], K, V, RCausal(), [RSoftcap(3.0), RAlibi(slopes)], sink
            )
            got = out[r : r + 1, :, list(cols)]
            assert (got - want).abs().max() < 1e-10, (paged, new, s)
            pos += n
        if not paged:
            for s, n in enumerate(new):
                assert (out[s, :, n:] == 0).all()  # padding queries of a row


FLEX_CASES = {
    # keep-masks with holes on both sides, GQA 4/2, softcap then T5 buckets (a 128-tile boundary)
    "padding_kv_masks": (
        {"B": 2, "Hq": 4, "Hkv": 2, "Sq": 130, "Sk": 260, "D": 16, "Dv": 16, "scale": 0.5},
        RPaddingKV(
            q_keep=[[i % 7 != 3 for i in range(130)], [i >= 20 for i in range(130)]],
            kv_keep=[[i % 5 != 1 for i in range(260)], [i >= 9 and i != 200 for i in range(260)]],
        )
        & RCausal(),
        [
            RSoftcap(2.0),
            RRelBias(
                (torch.randn(4, 16, generator=torch.Generator().manual_seed(0), dtype=F64)), 16, 64, True
            ),
        ],
    ),
    # the per-tile BlockMask of documents(kv=) with a window | chunk (two 128-tiles each side)
    "documents_kv": (
        {"B": 1, "Hq": 2, "Hkv": 1, "Sq": 200, "Sk": 300, "D": 16, "Dv": 16, "scale": None},
        RDocumentsKV([[50, 0, 90, 60]], [[100, 30, 120, 50]]) & (RWindow(70, 5) | RChunked(40)),
        [RAlibi([0.5, 0.25])],
    ),
}


@pytest.mark.parametrize("name", sorted(FLEX_CASES))
def test_flex_hand_picked(name):
    # flex compiles (~8 s on this CPU); forward only on CPU
    g, mask, scores = FLEX_CASES[name]
    q, k, v = (t.detach() for t in make_qkv(g, 1, F32))
    with torch.no_grad():  # relative-bias tables are handed over as leaves that require grad
        out = aa.attention(q, k, v, mask=mask.lib(), score=lib_scores(scores, F32), backend="flex")
    want, _, _ = ref_attention(q, k, v, mask, scores)
    assert (out.double() - want).abs().max() < 1e-5
