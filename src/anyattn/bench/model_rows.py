"""One row of ``bench model``: the models it times (all from one state dict), the timing of a row
(first whole-set pass, warm passes) and the check of its output against a float32 reference.

Shape legend: B batch rows, S row length, C hidden size.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time

import torch

from .timing import sync

__all__ = ["Reference", "Row", "anyattn_model", "fail", "hf_model", "template_state_dict", "time_row"]

_NOT_LOADED = ("pooler.",)  # HF EsmModel's pooler: not part of ESM2's encoder


@dataclasses.dataclass
class Row:
    name: str
    kind: str  # anyattn | hf | port
    backend: str
    compiled: bool
    status: str = "ok"  # ok | failed | skipped
    error: str = ""
    tokens_per_s: float = float("nan")  # real tokens / the median warm pass
    # the first timed pass after warm-up (every batch shape seen once: kernels that build
    # per-shape plans, like cuDNN attention under HF's SDPA, paid for them in the warm-up)
    first_pass_tokens_per_s: float = float("nan")
    # the FIRST whole-set pass of the row, on a fresh model: compilation, per-shape plans and
    # lazy initialisation included (what a user's first job over the set costs)
    cold_pass_tokens_per_s: float = float("nan")
    cold_pass_s: float = float("nan")
    mfu: float = float("nan")
    tflops: float = float("nan")
    peak_mem_gib: float = float("nan")
    first_call_s: float = float("nan")  # the first batch of the cold pass, synchronized
    compile_s: float = float("nan")  # first call - the same batch once warm
    warmup_s: float = float("nan")  # cold pass + warm-up passes
    warmup_passes: int = 0
    time_s: float = float("nan")  # median of the timed passes over the whole set
    times_s: tuple = ()  # every timed pass (their spread is the run-to-run noise)
    batches: int = 0
    attn_implementation: str = ""
    variant: str = ""  # how the row calls the model (inputs, compile settings)
    check: str = "-"  # ok | FAIL | error | -
    check_rel_l2: float = float("nan")  # last hidden state vs the float32 reference, real tokens
    check_bound: float = float("nan")
    note: str = ""


def time_row(row: Row, fn, inputs: list, device, real_tokens: int, flops: float, peak, max_passes: int, repeats: int = 3) -> Row:
    """Cold whole-set pass, warm-up until two passes over a few batches agree within 5%, then
    ``repeats`` whole-set passes, each synchronized at its end."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    row.batches = len(inputs)
    warm = sorted({0, len(inputs) // 3, 2 * len(inputs) // 3, len(inputs) - 1})  # long .. short
    t_start = time.perf_counter()
    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        fn(inputs[0])
        sync(device)
        row.first_call_s = time.perf_counter() - t0
        for x in inputs[1:]:
            fn(x)
        sync(device)
        row.cold_pass_s = time.perf_counter() - t0
        passes = []
        while len(passes) < max_passes:
            per = []
            for i in warm:
                t0 = time.perf_counter()
                fn(inputs[i])
                sync(device)
                per.append(time.perf_counter() - t0)
            passes.append(per)
            if len(passes) >= 2 and abs(sum(passes[-1]) - sum(passes[-2])) <= 0.05 * sum(passes[-2]):
                break
        row.warmup_passes = len(passes)
        row.warmup_s = time.perf_counter() - t_start
        row.compile_s = max(0.0, row.first_call_s - min(p[0] for p in passes))
        times = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            for x in inputs:
                fn(x)
            sync(device)
            times.append(time.perf_counter() - t0)
        row.times_s = tuple(times)  # unrounded: time_s is their median
        row.time_s = statistics.median(times)
    row.tokens_per_s = real_tokens / row.time_s
    row.first_pass_tokens_per_s = real_tokens / times[0]
    row.cold_pass_tokens_per_s = real_tokens / row.cold_pass_s
    row.tflops = flops / row.time_s / 1e12
    if peak:
        row.mfu = row.tflops / peak
    if dev.type == "cuda":
        row.peak_mem_gib = torch.cuda.max_memory_allocated() / 2**30
    return row


def fail(row: Row, e: BaseException, device) -> Row:
    row.status = "failed"
    row.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    for k in ("tokens_per_s", "first_pass_tokens_per_s", "cold_pass_tokens_per_s", "mfu", "tflops", "time_s"):
        setattr(row, k, float("nan"))
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------------------------------------
# the models of a run: one set of random weights


def template_state_dict(cfg, device, dtype, seed: int) -> dict:
    """Random weights of HF ``EsmModel`` (its initializer, ``seed``), in ``dtype`` on ``device``:
    every row of the run loads exactly these."""
    import transformers

    torch.manual_seed(seed)
    with torch.device(device):
        hf = transformers.EsmModel._from_config(transformers.EsmConfig(**cfg.to_hf_dict()), attn_implementation="eager")
    sd = {k: v.detach().to(dtype) for k, v in hf.state_dict().items() if not k.endswith("inv_freq")}
    del hf
    return sd


def _load(model, sd: dict, what: str, ignore=()) -> None:
    sd = {k: v for k, v in sd.items() if not k.startswith(ignore)}
    res = model.load_state_dict(sd, strict=False)
    missing = [k for k in res.missing_keys if not k.endswith("inv_freq")]
    if missing or res.unexpected_keys:
        raise ValueError(f"{what}: the run's weights do not fit: missing {missing[:5]}, unexpected {res.unexpected_keys[:5]}")


def anyattn_model(cfg, sd: dict, device, dtype, **config):
    """anyattn's ``ESM2Model`` with the run's weights; ``config`` sets ESM2Config attributes."""
    from ..models import ESM2Model

    mcfg = copy.deepcopy(cfg)
    for k, v in config.items():
        setattr(mcfg, k, v)
    with torch.device(device):
        model = ESM2Model(mcfg)
    model = model.to(dtype=dtype).eval()
    _load(model, sd, "anyattn ESM2Model", ignore=_NOT_LOADED)
    return model


def hf_model(cfg, sd: dict, device, dtype, impl: str):
    """HF transformers ``EsmModel`` (``attn_implementation=impl``) with the run's weights."""
    import transformers

    with torch.device(device):
        hf = transformers.EsmModel._from_config(transformers.EsmConfig(**cfg.to_hf_dict()), attn_implementation=impl)
    hf = hf.to(dtype=dtype).eval()
    _load(hf, sd, f"HF EsmModel[{impl}]")
    got = str(getattr(hf.config, "_attn_implementation", "?"))
    if got != impl:
        raise RuntimeError(f"transformers chose attn_implementation={got!r}, not {impl!r}")
    return hf


# ---------------------------------------------------------------------------------------------
# the check


class Reference:
    """A small padded batch from the workload (with one <mask> token, so token dropout's path
    runs) and its float32 last hidden state: HF ``EsmModel`` eager, float32 matmuls (TF32 off).

    A row passes when the relative L2 error of its last hidden state at the real tokens is at
    most ``bound`` = max(1e-2, 2 x that of HF's sdpa model in the run's dtype): the achievable
    error of the same-dtype reference, STYLE.md's rule, with issue 5's 1e-2 floor.
    """

    def __init__(self, cfg, sd: dict, ids_BS: torch.Tensor, am_BS: torch.Tensor, device, dtype, *, port: bool = False):
        self.ids, self.am = ids_BS.to(device), am_BS.to(device)
        self.keep = self.am.bool()
        self.port32 = float("nan")  # the sdpa port in float32 vs the reference: is it ESM2 exactly?
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            sd32 = {k: v.float() for k, v in sd.items()}
            hf32 = hf_model(cfg, sd32, device, torch.float32, "eager")
            with torch.inference_mode():
                self.ref = hf32(input_ids=self.ids, attention_mask=self.am).last_hidden_state[self.keep].float()
            del hf32
            if port:
                from .sdpa_port import from_hf_state_dict

                p32 = from_hf_state_dict(cfg.to_hf_dict(), sd32, device=device, dtype=torch.float32)
                self.port32 = self.rel_l2(self.last_hidden(lambda x: p32(x[0], x[1])))
                del p32
            del sd32
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        hf = hf_model(cfg, sd, device, dtype, "sdpa")
        self.base = self.rel_l2(self.last_hidden(lambda x: hf(input_ids=x[0], attention_mask=x[1]).last_hidden_state))
        del hf
        self.bound = max(1e-2, 2 * self.base)

    def last_hidden(self, call) -> torch.Tensor:
        with torch.inference_mode():
            return call((self.ids, self.am))[self.keep].float()

    def rel_l2(self, h: torch.Tensor) -> float:
        if not torch.isfinite(h).all():
            return float("nan")
        return float((h - self.ref).norm() / self.ref.norm())

    def check(self, row: Row, call) -> bool:
        """Fill the row's check columns; False (and the row failed, NaN numbers) when outside."""
        try:
            rel = self.rel_l2(self.last_hidden(call))
        except Exception as e:  # noqa: BLE001 - a raising check is a failed row
            row.check = "error"
            fail(row, e, self.ids.device)
            return False
        row.check_rel_l2, row.check_bound = rel, self.bound
        if rel <= self.bound:  # NaN never passes
            row.check = "ok"
            return True
        row.check = "FAIL"
        fail(row, RuntimeError(f"wrong output: relative L2 {rel:.3g} vs the float32 reference > bound {self.bound:.3g}"), self.ids.device)
        return False


# shared by the ESM2 rows (model.py) and the other families (family_run.py)
_PEAK_BF16 = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "L4": 121.0}  # dense TFLOP/s


def _fresh(device) -> None:
    """A row starts as a new process would, but for inductor's caches (see the docstring)."""
    import anyattn

    if hasattr(torch, "compiler") and hasattr(torch.compiler, "reset"):
        torch.compiler.reset()
    anyattn.clear_caches()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _f(x, fmt):
    return "-" if x is None or (isinstance(x, float) and x != x) else format(x, fmt)


def _line(r: Row) -> str:
    if r.status != "ok":
        return f"  {r.name:<26} {r.status}: {r.error}"
    return (
        f"  {r.name:<26} {r.tokens_per_s / 1e3:9.1f}k tokens/s  (first pass {r.cold_pass_tokens_per_s / 1e3:.1f}k, "
        f"{r.time_s:.2f} s a pass, compile {r.compile_s:.1f} s, check {r.check} {r.check_rel_l2:.2g})"
    )


ROWS = ("plain", "compiled", "uncompiled", "port")  # the anyattn-side rows of bench model
