"""Differential fuzzing (issue 6): random compositions of mask and score terms, shapes, GQA
ratios, dtypes and layouts, on every available backend, against the float64 oracle.

Outcomes allowed: exact under anyattn.testing's rule (forward, and backward where the backend
has one), UnsupportedError (a refusal), or ArgumentError when a term that indexes query
positions meets Sq > Sk. Anything else (wrong numbers, NaN, another exception) fails.

CPU: eager and sdpa, bounded examples (flex on CPU compiles per shape, so it is fuzzed on GPU).
GPU (``-m cuda``): every backend, bf16/fp16, 300 examples (flex: 20, each compiles; raise with
$ANYATTN_FUZZ_FLEX_EXAMPLES); summary JSON to $ANYATTN_FUZZ_OUT:

    ANYATTN_FUZZ_OUT=$OUT/fuzz_h200.json PYTHONPATH=src python3 -m pytest -m cuda tests/test_fuzz.py
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import anyattn as aa
from anyattn.backends import REGISTRY
from anyattn.testing import compare_to_oracle, generate_qkv

POSITIONAL = ("documents", "padding", "block_causal", "same_segment")  # need Sq <= Sk


@st.composite
def _mask(draw, B, Sq, Sk, depth=0):
    kind = draw(st.sampled_from(
        ["causal", "window", "documents", "padding", "prefix_lm", "chunked", "block_causal", "same_segment", "dense"]
        + (["and", "or", "not"] if depth < 2 else [])
    ))  # fmt: skip
    if kind == "and":
        return draw(_mask(B, Sq, Sk, depth + 1)) & draw(_mask(B, Sq, Sk, depth + 1))
    if kind == "or":
        return draw(_mask(B, Sq, Sk, depth + 1)) | draw(_mask(B, Sq, Sk, depth + 1))
    if kind == "not":
        return ~draw(_mask(B, Sq, Sk, depth + 1))
    if kind == "causal":
        return aa.causal()
    if kind == "window":
        left = draw(st.one_of(st.none(), st.integers(0, 80)))
        right = draw(st.one_of(st.none(), st.integers(0, 80))) if left is not None else draw(st.integers(0, 80))
        return aa.sliding_window(left, right)
    if kind == "documents":
        lens = draw(st.lists(st.integers(0, Sk), min_size=1, max_size=5))
        out, tot = [], 0
        for n in lens:
            n = min(n, Sk - tot)
            out.append(n)
            tot += n
        return aa.documents(out)
    if kind == "padding":
        return aa.padding(torch.tensor([draw(st.integers(0, Sk)) for _ in range(B)]))
    if kind == "prefix_lm":
        return aa.prefix_lm(draw(st.integers(0, Sk)))
    if kind == "chunked":
        return aa.chunked(draw(st.integers(1, 20)))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    if kind == "block_causal":
        return aa.block_causal(torch.sort(torch.randint(0, 6, (Sk,), generator=g)).values)
    if kind == "same_segment":
        return aa.same_segment(torch.randint(-1, 4, (Sk,), generator=g))
    return aa.dense(torch.rand(B, 1, Sq, Sk, generator=g) > draw(st.sampled_from([0.2, 0.5, 0.9])))


@st.composite
def _scores(draw, Hq, Sq, Sk):
    out = []
    for kind in draw(st.lists(st.sampled_from(["softcap", "alibi", "bias", "relative_bias"]), max_size=2)):
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        if kind == "softcap":
            out.append(aa.softcap(draw(st.sampled_from([0.5, 2.0, 30.0]))))
        elif kind == "alibi":
            out.append(aa.alibi(torch.rand(Hq, generator=g)))
        elif kind == "bias":
            out.append(aa.bias(torch.randn(1, Hq, Sq, Sk, generator=g)))
        else:
            out.append(aa.relative_bias(torch.randn(Hq, 16, generator=g), 16, 64, draw(st.booleans())))
    return out


@st.composite
def _case(draw, dtypes):
    B = draw(st.integers(1, 2))
    Hq = draw(st.sampled_from([1, 2, 4]))
    Hkv = draw(st.sampled_from([h for h in (1, 2, 4) if Hq % h == 0]))
    Sq, Sk = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    if draw(st.booleans()):
        Sk = Sq
    D = draw(st.sampled_from([16, 32, 64]))
    mask = draw(st.one_of(st.none(), _mask(B, Sq, Sk)))
    scores = draw(_scores(Hq, Sq, Sk))
    return dict(
        B=B, Hq=Hq, Hkv=Hkv, Sq=Sq, Sk=Sk, D=D, mask=mask, score=scores or None,
        dtype=draw(st.sampled_from(dtypes)), layout=draw(st.sampled_from(["bhsd", "bshd"])), seed=draw(st.integers(0, 999)),
    )  # fmt: skip


def _uses_positions(mask) -> bool:
    from anyattn.spec import canonical_mask

    return any(t in repr(canonical_mask(mask)) for t in POSITIONAL)


def check_case(c, backend, device, stats: Counter) -> None:
    q, k, v = generate_qkv(c["B"], c["Hq"], c["Hkv"], c["Sq"], c["Sk"], c["D"], dtype=c["dtype"], device=device,
                           layout=c["layout"], seed=c["seed"])  # fmt: skip
    kw = {"mask": c["mask"], "score": c["score"]}
    ctx = f"{backend} {c}"
    try:
        d = aa.explain(*(t.requires_grad_(True) for t in (q, k, v)), backend=backend, **kw)
    except aa.ArgumentError as e:
        assert c["Sq"] > c["Sk"] and "Sq <= Sk" in str(e), f"{ctx}: unexpected {e!r}"
        stats[f"{backend}:argument_error(Sq>Sk)"] += 1
        return
    grad = d.chosen is not None
    if not grad:
        if aa.explain(*(t.detach() for t in (q, k, v)), backend=backend, **kw).chosen is None:
            stats[f"{backend}:refused"] += 1
            return
    comps = compare_to_oracle(q, k, v, backend=backend, grad=grad, **kw)
    bad = [str(x) for x in comps if not x.ok]
    assert not bad, f"{ctx}: " + "; ".join(bad)
    stats[f"{backend}:exact" + ("" if grad else "_fwd")] += 1


_CPU_STATS: Counter = Counter()


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=_case([torch.float32]))
def test_fuzz_cpu_matches_oracle(backend, case):
    check_case(case, backend, "cpu", _CPU_STATS)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fuzz_cuda_every_backend():
    """300 examples per available backend; the summary (examples per backend and outcome,
    failures with their case) goes to $ANYATTN_FUZZ_OUT. Fails if any example failed."""
    stats: Counter = Counter()
    failures: list = []
    backends = [b.name for b in aa.backends() if b.available]

    def fuzz(backend: str, n_examples: int):
        @settings(max_examples=n_examples, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=_case([torch.bfloat16, torch.float16]))
        def run(case):
            stats[f"{backend}:tried"] += 1
            try:
                check_case(case, backend, "cuda", stats)
            except Exception as e:  # noqa: BLE001 - collected, reported, and failed below
                failures.append({"backend": backend, "case": repr(case), "error": f"{type(e).__name__}: {str(e)[:2000]}"})

        run()

    for backend in backends:
        # every flex example with a new structure or shape compiles a kernel (~5-10 s on an
        # H200 host), so flex gets fewer examples per run than the other backends
        fuzz(backend, int(os.environ.get("ANYATTN_FUZZ_FLEX_EXAMPLES", "20")) if backend == "flex" else 300)
    out = os.environ.get("ANYATTN_FUZZ_OUT")
    if out:
        meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "backends": backends}
        with open(out, "w") as f:
            json.dump({"meta": meta, "counts": dict(sorted(stats.items())), "failures": failures}, f, indent=1)
    assert not failures, f"{len(failures)} failing examples, first: {failures[0]}"
