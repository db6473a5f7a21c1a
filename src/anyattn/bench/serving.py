"""``anyattn bench serving``: decode and prefill of a Llama-shaped model on anyattn's KV caches,
next to HF's own attention implementations, in one process.

    anyattn bench serving --preset h100 --contexts 4096 --out benchmarks/results/serving_h100_4k
    anyattn bench serving --preset h100 --contexts 32768 --out benchmarks/results/serving_h100_32k
    anyattn bench serving --preset h100 --mode prefill --out benchmarks/results/serving_h100_prefill
    anyattn bench serving --quick                                     # CPU smoke run (tiny model)

Decode (``--mode decode``): the whole model, one new token per sequence and step, at batch B and
context C (the cache holds C tokens of every sequence; its *values* are not computed by a
prefill: they do not change the time). Rows, per (B, C):

    anyattn/paged/<backend>        PagedKVCache (page_size 128), attention(q, kv=step.write(...))
    anyattn/contiguous/<backend>   ContiguousKVCache (capacity C + steps)
    hf/sdpa, hf/flex_attention     HF's DynamicCache with attn_implementation "sdpa" / "flex_attention"

``<backend>`` is auto (what ``auto`` chose is printed) or a forced backend. Measured: the median
ms per step over ``--steps`` steps after ``--warmup`` steps (the first step, with compilation,
separately) with the fastest and slowest timed step, the graphs torch.compile compiled during the
timed steps (nonzero: the median includes compilation; the line says COMPILED), tokens/s = B /
step time, and the bytes of K/V storage of each cache kind (for HF: the DynamicCache's tensors).
On CUDA, inductor's compile-worker pool is started and waited for before the first row (its
lazy start at the first compile would otherwise share the host with the next timed steps). A
configuration whose caches do not fit the free GPU memory is skipped with the reason.

Prefill (``--mode prefill``): a mixed batch (``--prompts`` lognormal prompt lengths, plus as many
decode sequences) as ONE packed row on a PagedKVCache (chunked prefill + decode in one forward)
against the same prompts as a padded batch (HF sdpa, and anyattn on the padded batch): ms per
forward and real tokens/s.

The model is Llama-3.2-1B-shaped (``--preset h100``/``h200``: hidden 2048, 16 layers, 32 heads,
8 kv heads, head dim 64, vocab 128256), random weights, bf16. Results: a table on stdout,
serving.json / serving.md in ``--out`` with the command line and the environment.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time

import torch

from . import UsageError
from .args import listopt, posint
from .env import environment
from .timing import compile_workers_ready

HELP = "decode tokens/s and mixed-batch prefill of a Llama-shaped model on anyattn's KV caches vs HF"

PRESETS = {
    # ~1.2B parameters, Llama-3.2-1B's attention shape
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rope_theta=500000.0,
               tie_word_embeddings=True),  # fmt: skip
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=4096),  # fmt: skip
}
IMPLS = ("anyattn/paged", "anyattn/contiguous", "hf/sdpa", "hf/flex_attention")
BACKENDS = ("auto", "flex", "flash_torch", "sdpa", "cudnn", "eager")
PAGE_SIZE = 128


def add_arguments(p) -> None:
    p.add_argument("--mode", choices=["decode", "prefill"], default="decode")
    p.add_argument("--preset", choices=["h100", "h200"], help="the 1B model in bf16 on CUDA, batches 1,8,64, contexts 4096,32768")
    p.add_argument("--quick", action="store_true", help="tiny model on the CPU, small contexts (a smoke run)")
    p.add_argument("--batches", help="comma list of batch sizes (decode)")
    p.add_argument("--contexts", help="comma list of context lengths (decode)")
    p.add_argument("--impls", help=f"comma list of {','.join(IMPLS)} (default: all)")
    p.add_argument("--backends", help=f"anyattn backends for the anyattn rows (decode and prefill), comma list of {','.join(BACKENDS)} (default: auto)")
    p.add_argument("--steps", type=int, default=16, help="decode steps timed per row (default 16)")
    p.add_argument("--warmup", type=int, default=3, help="decode steps before timing (default 3)")
    p.add_argument("--prompts", type=int, default=16, help="prefill: prompts in the batch (default 16)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="DIR", help="write serving.json and serving.md here")


def _options(args) -> dict:
    dev = args.device or ("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if dev not in ("cuda", "cpu"):
        raise UsageError(f"--device: expected cuda or cpu, got {dev!r}")
    if dev == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch.cuda.is_available() is False on this machine")
    if args.quick:
        model, batches, contexts, dtype = "tiny", (1, 4), (64, 256), torch.float32
    else:
        model, batches, contexts, dtype = "1b", (1, 8, 64), (4096, 32768), torch.bfloat16
    if args.batches:
        batches = tuple(posint("batches", int(x)) for x in args.batches.split(","))
    if args.contexts:
        contexts = tuple(posint("contexts", int(x)) for x in args.contexts.split(","))
    # HF's flex_attention compiles a kernel per decode step's key length: ~25 s each on a CPU
    default = IMPLS if dev == "cuda" else tuple(i for i in IMPLS if i != "hf/flex_attention")
    impls = listopt("impls", args.impls, IMPLS) if args.impls else default
    backends = listopt("backends", args.backends, BACKENDS) if args.backends else ("auto",)
    return dict(device=dev, model=model, dtype=dtype, batches=batches, contexts=contexts, impls=impls, backends=backends,
                steps=posint("steps", args.steps), warmup=args.warmup, prompts=posint("prompts", args.prompts), seed=args.seed)  # fmt: skip


# --------------------------------------------------------------------------------------------
# the model and the caches


def _model(name: str, impl: str, device: str, dtype, state=None):
    import transformers

    import anyattn.hf

    anyattn.hf.register()
    cfg = transformers.LlamaConfig(**PRESETS[name])
    torch.manual_seed(0)
    with torch.device(device):
        m = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation=impl, dtype=dtype).eval()
    if state is not None:
        m.load_state_dict(state)
    return m


def _geometry(model) -> tuple[int, int, int]:
    c = model.config
    return c.num_key_value_heads, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads, c.num_hidden_layers


def _kv_bytes(model, tokens: int) -> int:
    Hkv, D, L = _geometry(model)
    return 2 * L * tokens * Hkv * D * torch.empty((), dtype=model.dtype).element_size()


def _fits(model, device: str, need: int) -> str | None:
    if device != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info()
    if need > 0.85 * free:
        return f"needs {need / 2**30:.1f} GiB of K/V, {free / 2**30:.1f} GiB free"
    return None


def _graphs_compiled() -> int | None:
    """Graphs torch.compile has compiled in this process so far (None where this torch's dynamo
    does not count them)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - torch without dynamo
        return None
    return int(counters["stats"]["unique_graphs"])


def _alloc_retries(device) -> int | None:
    """cudaMalloc retries of the caching allocator so far (it frees its cached blocks and tries
    again when an allocation does not fit: a slow, synchronizing path seen near a full card);
    None off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    return int(torch.cuda.memory_stats(device).get("num_alloc_retries", 0))


def _timed_steps(step_fn, device, warmup: int, steps: int) -> dict:
    """The timing of a row: ``first_ms`` (the first step, compilation included), ``ms`` (median
    step), ``ms_min`` / ``ms_max`` (the spread of the timed steps) and ``compiles`` (graphs
    torch.compile compiled *during the timed steps*: a nonzero count means the median includes
    compilation, not steady-state steps) and, on CUDA, ``alloc_retries`` (the caching allocator's
    cudaMalloc retries during the timed steps: nonzero means the card ran out of cached memory
    and the steps include its free-and-retry path). Each step is synchronized and timed on its
    own (decode steps change the cache, so a step cannot be repeated as-is)."""
    from .timing import first_call_ms, sync

    first = first_call_ms(step_fn, device)
    for _ in range(max(0, warmup - 1)):
        step_fn()
    times = []
    before, retries0 = _graphs_compiled(), _alloc_retries(device)
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step_fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    after = _graphs_compiled()
    compiles = None if before is None or after is None else after - before
    retries = None if retries0 is None else _alloc_retries(device) - retries0
    return dict(
        first_ms=first, ms=statistics.median(times), ms_min=min(times), ms_max=max(times),
        compiles=compiles, alloc_retries=retries,
    )  # fmt: skip


def _decode_anyattn(model, kind: str, backend: str, B: int, C: int, o: dict) -> dict:
    import anyattn as aa
    from anyattn.testing import record_calls

    Hkv, D, L = _geometry(model)
    dev, extra = o["device"], o["warmup"] + o["steps"] + 2
    if kind == "paged":
        per = -(-(C + extra) // PAGE_SIZE)
        cache = aa.PagedKVCache(B * per, PAGE_SIZE, Hkv, D, layers=L, dtype=model.dtype, device=dev)
        seqs = [cache.add_sequence() for _ in range(B)]
        cache.step(seqs, C)  # C cached tokens per sequence (their values do not change the time)
        new_step = lambda: cache.step(seqs, 1)  # noqa: E731
    else:
        cache = aa.ContiguousKVCache(B, C + extra, Hkv, D, layers=L, dtype=model.dtype, device=dev)
        cache.step(C)
        new_step = lambda: cache.step(1)  # noqa: E731
    ids = torch.randint(0, model.config.vocab_size, (B, 1), device=dev)
    chosen: set = set()

    def step():
        s = new_step()
        if chosen:
            model(ids, position_ids=s.positions, anyattn_kv=s, use_cache=False)
            return
        with record_calls() as seen:  # the first step says which backend auto chose
            model(ids, position_ids=s.positions, anyattn_kv=s, use_cache=False)
        chosen.update(c.backend for c in seen)

    with torch.no_grad(), aa.use(backend):
        timing = _timed_steps(step, dev, o["warmup"], o["steps"])
    return dict(**timing, chosen=",".join(sorted(chosen)), cache_bytes=cache.memory_bytes())


def _decode_hf(model, B: int, C: int, o: dict) -> dict:
    import transformers

    Hkv, D, L = _geometry(model)
    dev = o["device"]
    try:
        cache = transformers.DynamicCache(config=model.config)
    except TypeError:  # older signature
        cache = transformers.DynamicCache()
    for layer in range(L):  # C cached tokens per sequence
        k = torch.zeros(B, Hkv, C, D, dtype=model.dtype, device=dev)
        cache.update(k, torch.zeros_like(k), layer)
    ids = torch.randint(0, model.config.vocab_size, (B, 1), device=dev)
    pos = [C]

    def step():
        p = torch.full((B, 1), pos[0], device=dev)
        model(ids, position_ids=p, past_key_values=cache, use_cache=True)
        pos[0] += 1

    with torch.no_grad():
        timing = _timed_steps(step, dev, o["warmup"], o["steps"])
    nbytes = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                nbytes += t.numel() * t.element_size()
    return dict(**timing, chosen="", cache_bytes=nbytes or None)


def run_decode(o: dict, log=print) -> list[dict]:
    rows = []
    base = _model(o["model"], "anyattn", o["device"], o["dtype"])
    state = base.state_dict()
    for impl in o["impls"]:
        model = base if impl.startswith("anyattn") else _model(o["model"], impl.split("/")[1], o["device"], o["dtype"], state)
        for backend in o["backends"] if impl.startswith("anyattn") else ("-",):
            for C in o["contexts"]:
                for B in o["batches"]:
                    row = dict(mode="decode", impl=impl, backend=backend, batch=B, context=C)
                    why = _fits(model, o["device"], int(_kv_bytes(model, B * (C + 64)) * (2 if impl.startswith("hf") else 1)))
                    if why:
                        rows.append({**row, "status": "skipped", "reason": why})
                        log(_line(rows[-1]))
                        continue
                    try:
                        if impl.startswith("anyattn"):
                            r = _decode_anyattn(model, impl.split("/")[1], backend, B, C, o)
                        else:
                            r = _decode_hf(model, B, C, o)
                        rows.append({**row, **r, "status": "ok", "tokens_per_s": B / r["ms"] * 1e3})
                    except Exception as e:  # noqa: BLE001 - a failing row is reported and the run goes on
                        rows.append({**row, "status": "failed", "reason": f"{type(e).__name__}: {str(e)[:300]}"})
                    finally:
                        if o["device"] == "cuda":
                            torch.cuda.empty_cache()
                    log(_line(rows[-1]))
        if model is not base:
            del model
    return rows


# --------------------------------------------------------------------------------------------
# prefill: a mixed batch packed vs padded


def _prompt_lengths(n: int, seed: int, quick: bool) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    med, cap = (24, 128) if quick else (700, 4096)
    x = torch.exp(torch.randn(n, generator=g) * 0.8 + math.log(med))
    return [int(min(cap, max(8, v))) for v in x.tolist()]


def run_prefill(o: dict, log=print) -> list[dict]:
    import anyattn as aa
    from anyattn.testing import record_calls

    dev = o["device"]
    lengths = _prompt_lengths(o["prompts"], o["seed"], o["model"] == "tiny")
    n_decode, ctx = o["prompts"], (64 if o["model"] == "tiny" else 2048)
    model = _model(o["model"], "anyattn", dev, o["dtype"])
    Hkv, D, L = _geometry(model)
    V = model.config.vocab_size
    real = sum(lengths)
    rows = []

    def record(name, fn, tokens, backend="auto"):
        chosen: set = set()

        def once():  # the first step says which backend ran
            if chosen:
                return fn()
            with record_calls() as seen:
                fn()
            chosen.update(c.backend for c in seen)

        try:
            with torch.no_grad(), aa.use(backend):
                timing = _timed_steps(once if name.startswith("anyattn") else fn, dev, o["warmup"], o["steps"])
            rows.append(dict(mode="prefill", impl=name, backend=backend if name.startswith("anyattn") else "-", prompts=len(lengths),
                             tokens=tokens, **timing, tokens_per_s=tokens / timing["ms"] * 1e3, status="ok",
                             chosen=",".join(sorted(chosen))))  # fmt: skip
        except Exception as e:  # noqa: BLE001
            rows.append(dict(mode="prefill", impl=name, backend=backend, status="failed", reason=f"{type(e).__name__}: {str(e)[:300]}"))
        log(_line(rows[-1]))

    # packed: every prompt (whole) + one decode token for each of n_decode running sequences, one row
    per = -(-(max(lengths) + ctx + 8) // PAGE_SIZE)
    cache = aa.PagedKVCache((len(lengths) + n_decode) * per, PAGE_SIZE, Hkv, D, layers=L, dtype=model.dtype, device=dev)
    counts = lengths + [1] * n_decode
    T = sum(counts)
    q_len = -(-T // 128) * 128
    ids = torch.randint(0, V, (1, q_len), device=dev)

    def packed():
        seqs = [cache.add_sequence() for _ in counts]
        cache.step(seqs[len(lengths) :], ctx)  # the running sequences' context
        step = cache.step(seqs, counts, layout="packed", q_len=q_len)
        model(ids, position_ids=step.positions, anyattn_kv=step, use_cache=False)
        for s in seqs:
            cache.release(s)

    for backend in o["backends"]:
        record("anyattn/paged/mixed-packed", packed, T, backend)
    # padded: the prompts only, right-padded to the longest, (B, S) with an attention mask
    S = max(lengths)
    pids = torch.randint(0, V, (len(lengths), S), device=dev)
    am = (torch.arange(S, device=dev)[None] < torch.tensor(lengths, device=dev)[:, None]).long()
    for backend in o["backends"]:
        record("anyattn/padded", lambda: model(pids, attention_mask=am, use_cache=False), real, backend)
    hf = _model(o["model"], "sdpa", dev, o["dtype"], model.state_dict())
    record("hf/sdpa/padded", lambda: hf(pids, attention_mask=am, use_cache=False), real)
    rows.append(dict(mode="prefill", impl="padding waste", status="info", reason=f"{len(lengths) * S - real} of {len(lengths) * S} padded positions"))
    return rows


# --------------------------------------------------------------------------------------------
# output


def _line(r: dict) -> str:
    head = f"{r['mode']:<7} {r['impl']:<28} {r.get('backend', '-'):<11}"
    if r["mode"] == "decode":
        head += f" B={r['batch']:<3} C={r['context']:<6}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r.get('reason', '')}"
    mem = f"  cache {r['cache_bytes'] / 2**20:.0f} MiB" if r.get("cache_bytes") else ""
    chosen = f"  (ran: {r['chosen']})" if r.get("chosen") else ""
    spread = f" [{r['ms_min']:.1f}-{r['ms_max']:.1f}]" if "ms_min" in r else ""
    compiles = f"  COMPILED {r['compiles']} graphs during the timed steps" if r.get("compiles") else ""
    retries = f"  ALLOC RETRIES {r['alloc_retries']} during the timed steps" if r.get("alloc_retries") else ""
    timing = f"{r['ms']:8.3f} ms{spread}  {r['tokens_per_s']:10.0f} tok/s  first {r['first_ms']:.0f} ms"
    return f"{head} {timing}{mem}{chosen}{compiles}{retries}"


def _markdown(rows, command: str, env: dict) -> str:
    out = [f"`{command}`", "", f"{env.get('device_name')}, torch {env.get('torch')}, {env.get('date')}", ""]
    out.append(
        "| mode | impl | backend | batch | context | ms/step | min-max ms | compiles in timed steps | alloc retries "
        "| tokens/s | first ms | cache MiB | ran | status |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ok = r["status"] == "ok"
        ms = format(r["ms"], ".3f") if ok else ""
        tps = format(r["tokens_per_s"], ".0f") if ok else ""
        first = format(r["first_ms"], ".0f") if ok else ""
        mib = format(r["cache_bytes"] / 2**20, ".0f") if ok and r.get("cache_bytes") else ""
        spread = f"{r['ms_min']:.3f}-{r['ms_max']:.3f}" if ok and "ms_min" in r else ""
        compiles = "" if not ok or r.get("compiles") is None else str(r["compiles"])
        retries = "" if not ok or r.get("alloc_retries") is None else str(r["alloc_retries"])
        status = r["status"] + (": " + r["reason"] if r.get("reason") else "")
        out.append(
            f"| {r['mode']} | {r['impl']} | {r.get('backend', '')} | {r.get('batch', r.get('prompts', ''))} | "
            f"{r.get('context', r.get('tokens', ''))} | {ms} | {spread} | {compiles} | {retries} | {tps} | {first} | {mib} | "
            f"{r.get('chosen', '')} | {status} |"
        )
    return "\n".join(out) + "\n"


def run_from_args(args, command: str = "anyattn bench serving") -> int:
    o = _options(args)
    env = environment(o["device"])
    print(f"# {command}\n# {env['device_name']}, torch {env['torch']}")
    if o["device"] == "cuda":  # flex rows compile: the compile workers' start must not overlap timed steps
        env["compile_workers"] = compile_workers_ready()
        print(f"# inductor compile workers: {env['compile_workers']}")
    rows = run_decode(o) if args.mode == "decode" else run_prefill(o)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "serving.json"), "w") as f:
            json.dump({"command": command, "env": env, "options": {k: str(v) for k, v in o.items()}, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "serving.md"), "w") as f:
            f.write(_markdown(rows, command, env))
    return 1 if any(r["status"] == "failed" for r in rows) else 0
