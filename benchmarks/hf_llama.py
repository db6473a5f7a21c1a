"""HF transformers Llama-style 1B (random weights) on packed documents: anyattn vs HF's own paths.

    PYTHONPATH=src python3 benchmarks/hf_llama.py --out benchmarks/results/hf_llama_h200

One H200, bf16. Input: 16 documents (lengths 128..2048 from a fixed seed) packed into one row of
16384 tokens, ``position_ids`` restarting at 0 per document, no attention mask
(DataCollatorWithFlattening's convention), ``use_cache=False`` (a training step).

Rows (each one model, the weights shared, the attention implementation switched):

  anyattn            attn_implementation="anyattn" (auto), packed
  anyattn:flex       the forced flex backend, packed
  anyattn:fa_torch   the forced flash_torch backend (varlen_attn), packed
  hf:sdpa            HF "sdpa", packed: HF detects packing and materializes a 16k x 16k mask
  hf:flex_attention  HF "flex_attention", packed: a BlockMask built by HF per forward
  hf:sdpa padded     HF "sdpa" on the same documents as a padded batch (16 x 2048 + attention_mask)

Correctness before timing: logits on the real tokens against an fp32 oracle (the same weights in
fp32, HF "sdpa" on the padded batch: every document alone, no packing logic involved). A row
passes when err <= 2 x err(hf:sdpa padded, bf16) + 1e-5 (the DESIGN.md rule with HF's usual bf16
path as the same-dtype reference). A failing or crashing row is reported and the run goes on.

FLOPs (useful work on real tokens only, so padding shows up as lost throughput):
  matmuls  2 * N_matmul_params * T forward (N excludes the embedding lookup, includes lm_head),
  attention 4 * Hq * D * P forward, P = visible (query, key) pairs = sum n(n+1)/2 over documents,
  forward+backward = 3x matmuls + 3.5x attention (backward = 2x matmul, 2.5x attention).
Times are medians of CUDA-event timings after warm-up (compilation is timed separately).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
import traceback

import torch

DOCS, TOKENS = 16, 16384


def doc_lengths(tokens: int = TOKENS, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    lo, hi = tokens // 128, tokens // 8  # 128..2048 at 16k tokens
    raw = [rng.randint(lo, hi) for _ in range(DOCS)]
    lens = [max(lo, int(x * tokens / sum(raw))) for x in raw]
    lens[lens.index(max(lens))] += tokens - sum(lens)
    assert sum(lens) == tokens and min(lens) >= 1
    return lens


def llama_1b_config(transformers):
    # Llama-3.2-1B shape (hidden 2048, 16 layers, 32 heads / 8 KV heads, head dim 64, MLP 8192),
    # with a 32000-token vocabulary and tied embeddings: 1.04 B parameters.
    return transformers.LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=16384, rope_theta=500000.0,
        tie_word_embeddings=True, use_cache=False,
    )  # fmt: skip


def flops(cfg, lens: list[int]) -> tuple[float, float]:
    """(forward, forward+backward) useful FLOPs for one step over the real tokens."""
    T = sum(lens)
    h, L, I, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    Hq, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    per_layer = h * Hq * D + 2 * h * Hkv * D + Hq * D * h + 3 * h * I
    matmul = 2.0 * (L * per_layer + h * V) * T
    pairs = sum(n * (n + 1) // 2 for n in lens)
    attn = 4.0 * Hq * D * pairs * L
    return matmul + attn, 3 * matmul + 3.5 * attn


def cuda_time(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():  # --smoke on a CPU machine: wall clock, not a measurement
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def set_impl(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = name
    assert model.config._attn_implementation == name, (model.config._attn_implementation, name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for hf_llama.json and hf_llama.md")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 1k tokens, CPU if no GPU: checks the script, measures nothing")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()

    import transformers

    import anyattn
    import anyattn.hf

    anyattn.hf.register()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = llama_1b_config(transformers)
    tokens = TOKENS
    if args.smoke:
        cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size = 128, 256, 2, 1000
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 4, 2, 32
        tokens, args.reps, args.warmup = 1024, 2, 1
    elif dev.type != "cuda":
        raise SystemExit("hf_llama.py measures on a CUDA GPU; use --smoke to check the script on a CPU")
    lens = doc_lengths(tokens)
    fwd_flops, step_flops = flops(cfg, lens)

    # inputs: packed row and the padded batch of the same documents
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in lens]
    ids = torch.cat(docs)[None].to(dev)
    pos = torch.cat([torch.arange(n) for n in lens])[None].to(dev)
    S = max(lens)
    padded = torch.zeros(DOCS, S, dtype=torch.long)
    am = torch.zeros(DOCS, S, dtype=torch.long)
    for b, d in enumerate(docs):
        padded[b, : len(d)], am[b, : len(d)] = d, 1
    padded, am = padded.to(dev), am.to(dev)
    keep = am.bool()

    torch.manual_seed(0)
    with torch.device(dev):
        model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())

    # fp32 oracle: the padded batch through HF sdpa (every document alone, no packing logic)
    with torch.no_grad():
        oracle = model(input_ids=padded, attention_mask=am).logits[keep].float()
    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16

    rows = [
        ("anyattn", "anyattn", "packed"),
        ("anyattn:flex", "anyattn:flex", "packed"),
        ("anyattn:fa_torch", "anyattn:fa_torch", "packed"),
        ("hf:sdpa", "sdpa", "packed"),
        ("hf:flex_attention", "flex_attention", "packed"),
        ("hf:sdpa padded", "sdpa", "padded"),
    ]

    def run_fwd(layout):
        if layout == "packed":
            return model(input_ids=ids, position_ids=pos, use_cache=False).logits
        return model(input_ids=padded, attention_mask=am, use_cache=False).logits

    def real_logits(out, layout):
        return out[0].float() if layout == "packed" else out[keep].float()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    results = []
    ref_err = None
    # the reference error first: HF sdpa on the padded batch in bf16
    order = [rows[-1]] + rows[:-1]
    for label, impl, layout in order:
        rec = {"row": label, "attn_implementation": impl, "layout": layout}
        try:
            set_impl(model, impl)
            model.eval()
            sync()
            t0 = time.time()
            with torch.no_grad():
                out = run_fwd(layout)
            sync()
            rec["first_call_s"] = time.time() - t0  # includes compilation (flex) and mask building
            err = (real_logits(out, layout) - oracle).abs().max().item()
            del out
            if ref_err is None:
                ref_err = err
            rec["max_err_vs_fp32"] = err
            rec["check"] = "pass" if err <= 2 * ref_err + 1e-5 else "FAIL"
            with torch.no_grad():
                ms_f = cuda_time(lambda: run_fwd(layout), args.warmup, args.reps)
            model.train()

            def step():
                logits = run_fwd(layout)
                logits.float().mean().backward()

            t0 = time.time()
            step()
            sync()
            rec["first_step_s"] = time.time() - t0
            ms_s = cuda_time(step, args.warmup, args.reps)
            model.zero_grad(set_to_none=True)
            rec.update(
                fwd_ms=ms_f, step_ms=ms_s,
                fwd_tokens_per_s=tokens / ms_f * 1e3, step_tokens_per_s=tokens / ms_s * 1e3,
                fwd_tflops=fwd_flops / ms_f / 1e9, step_tflops=step_flops / ms_s / 1e9,
                peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else math.nan,
            )  # fmt: skip
        except Exception as e:  # a failing row is recorded, the run goes on
            rec["check"] = "ERROR"
            rec["error"] = f"{type(e).__name__}: {e}"[:500]
            traceback.print_exc(file=sys.stderr)
            for k in ("fwd_ms", "step_ms", "fwd_tokens_per_s", "step_tokens_per_s", "fwd_tflops", "step_tflops"):
                rec.setdefault(k, math.nan)
        model.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        results.append(rec)
        print(f"[{time.time() - t_start:6.1f}s] {label}: {rec.get('check')} {rec.get('error', '')}", flush=True)
    results = sorted(results, key=lambda r: [x[0] for x in rows].index(r["row"]))

    meta = {
        "command": "PYTHONPATH=src python3 " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (smoke)",
        "torch": torch.__version__, "transformers": transformers.__version__, "anyattn": anyattn.__version__,
        "triton": getattr(__import__("triton"), "__version__", None) if _has("triton") else None,
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "model": f"LlamaForCausalLM {n_params / 1e9:.2f} B params, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
                 f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, head dim {cfg.head_dim}, vocab {cfg.vocab_size}",
        "documents": lens, "tokens": tokens, "dtype": "bfloat16",
        "fwd_flops": fwd_flops, "step_flops": step_flops,
        "flops_rule": "matmul 2*N*T (fwd), attention 4*Hq*D*pairs (fwd); fwd+bwd = 3x matmul + 3.5x attention; real tokens only",
        "check_rule": "max|logits - fp32 oracle| <= 2 x that of hf:sdpa padded (bf16) + 1e-5",
        "timing": f"median of {args.reps} CUDA-event timings after {args.warmup} warm-up calls; step = fwd + mean(logits).backward()",
        "wall_s": time.time() - t_start,
    }  # fmt: skip
    with open(os.path.join(args.out, "hf_llama.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    table = _table(results)
    with open(os.path.join(args.out, "hf_llama.md"), "w") as f:
        f.write(f"# HF Llama-style 1B, {DOCS} packed documents per {tokens} tokens ({meta['device']})\n\n")
        f.write(f"Command: `{meta['command']}`  \n")
        f.write(f"torch {meta['torch']}, transformers {meta['transformers']}, triton {meta['triton']}, {meta['date_utc']} UTC  \n")
        f.write(f"Model: {meta['model']}  \nDocuments: {lens}  \n")
        f.write(f"FLOPs: {meta['flops_rule']}  \nCheck: {meta['check_rule']}  \nTiming: {meta['timing']}\n\n")
        f.write(table + "\n")
        errs = [r for r in results if r.get("error")]
        if errs:
            f.write("\nErrors:\n\n" + "\n".join(f"- {r['row']}: {r['error']}" for r in errs) + "\n")
    print(table)
    return 0


def _has(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


def _table(results) -> str:
    head = "| row | check | max err vs fp32 | fwd ms | fwd tok/s | fwd TFLOP/s | fwd+bwd ms | fwd+bwd tok/s | fwd+bwd TFLOP/s | first call s | peak GB |"
    lines = [head, "|" + "---|" * 11]
    for r in results:
        f = lambda k, spec: (format(r[k], spec) if isinstance(r.get(k), (int, float)) and not math.isnan(r[k]) else "nan")  # noqa: E731
        lines.append(
            f"| {r['row']} | {r['check']} | {f('max_err_vs_fp32', '.3g')} | {f('fwd_ms', '.1f')} | {f('fwd_tokens_per_s', ',.0f')} | "
            f"{f('fwd_tflops', '.0f')} | {f('step_ms', '.1f')} | {f('step_tokens_per_s', ',.0f')} | {f('step_tflops', '.0f')} | "
            f"{f('first_call_s', '.1f')} | {f('peak_mem_gb', '.1f')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
