"""How fast can an exact ESM2-650M forward go on this GPU? A measured upper bound (probe).

    PYTHONPATH=src python3 benchmarks/esm2_bound.py OUT_DIR [max_tokens]

The packed, compiled ESM2-650M forward (flash_torch, the workload of ``anyattn bench model``) is
split by kernel class from one profiled pass over the whole 2048-sequence set: matrix products
(cuBLAS), attention (FlashAttention varlen), inductor's fused elementwise/LayerNorm kernels, the
rest, and the GPU's idle time. The bound then assumes every part runs at the best rate measured
on this GPU in isolation:

* matrix products: each of the model's four projection shapes alone (cuBLAS, bf16, bias
  epilogue, T tokens at once), the sum of their times per layer;
* attention: its FLOPs at the in-model varlen rate, and (optimistic) at 606 TFLOP/s, the best
  dense bf16 attention rate DESIGN.md section 6 measured (cuDNN, B2 S8192);
* elementwise work: the bytes that an exact layer must move between those kernels (cuBLAS cannot
  fuse ESM's erf GELU, LayerNorm or rotary: rotary reads and writes q and k; two residual add +
  LayerNorm passes each read x and the branch and write x and its LayerNorm; the GELU reads and
  writes the 4C-wide activation) at the copy bandwidth of a 1 GiB ``copy_``;
* no idle time, no host cost, nothing else.

Every part's in-model rate is reported next to it, and the bound is also given with the in-model
matmul rate (the better of the two when cuBLAS runs the model's shapes faster fused into a stream
of calls than alone).

Prints a table; writes OUT_DIR/esm2_bound.json.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

import anyattn
from anyattn.bench.model import _token_ids, make_batches, make_lengths
from anyattn.models import ESM2Config, ESM2ForMaskedLM, esm2_flops


def _bench_ms(fn) -> float:
    """Median ms of ``fn`` back to back (triton's do_bench: warm-up, L2 flushed between calls)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def _kind(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("flash", "fmha", "attn")):
        return "attention"
    if any(s in n for s in ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "matmul")):
        return "matmul"
    if "triton" in n:
        return "fused elementwise/LayerNorm (inductor)"
    return "other"


def main() -> None:
    out = sys.argv[1]
    max_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 32768
    os.makedirs(out, exist_ok=True)
    dev = "cuda"
    cfg = ESM2Config.from_name("esm2_t33_650M")
    C, F_, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    torch.manual_seed(0)
    model = ESM2ForMaskedLM(cfg).to(dev, torch.bfloat16).eval()
    enc = model.esm
    enc.compile_layers(options={"coordinate_descent_tuning": True})
    enc.attn_backend = "flash_torch"

    tokens = [n + 2 for n in make_lengths(2048, 320, 0.58, 30, 1022, 0)]
    ids = _token_ids(tokens, 0)
    inputs = []
    for b in make_batches(tokens, max_tokens, padded=False):
        row = torch.full((1, max_tokens), 1, dtype=torch.long)
        row[0, : sum(tokens[i] for i in b)] = torch.cat([ids[i] for i in b])
        info = anyattn.SeqInfo.from_lengths([tokens[i] for i in b], total_length=max_tokens, device=dev)
        inputs.append((row.to(dev), info))
    real = sum(tokens)
    total_flops = esm2_flops(cfg, tokens)
    attn_flops = sum(4 * n * n * L * C for n in tokens)
    mm_flops = total_flops - attn_flops

    def one_pass():
        for x, info in inputs:
            enc(x, seq_info=info)

    with torch.inference_mode():
        for _ in range(3):
            one_pass()
        torch.cuda.synchronize()
        walls = []
        for _ in range(3):
            t0 = time.perf_counter()
            one_pass()
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t0)
        wall = sorted(walls)[1]

        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            one_pass()
            torch.cuda.synchronize()
    by_kind = collections.Counter()
    by_name = collections.Counter()
    spans = []
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue
        us = e.time_range.elapsed_us()
        by_kind[_kind(e.name)] += us / 1e6
        by_name[e.name[:80]] += us / 1e6
        spans.append((e.time_range.start, e.time_range.end))
    spans.sort()
    busy, cur_s, cur_e = 0.0, None, None
    for s, t in spans:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, t
        else:
            cur_e = max(cur_e, t)
    if cur_e is not None:
        busy += cur_e - cur_s
    busy /= 1e6
    kernel_s = sum(by_kind.values())
    # the profiler slows the host side (the GPU waits more), not the kernels: kernel times are
    # taken as they are, idle time from the unprofiled wall time
    prof_wall = (spans[-1][1] - spans[0][0]) / 1e6 if spans else wall

    # isolated rates
    T = max_tokens
    x = torch.randn(T, C, device=dev, dtype=torch.bfloat16)
    xf = torch.randn(T, F_, device=dev, dtype=torch.bfloat16)
    shapes = {"C->C (q, k, v, out; x4)": (x, C, 4), "C->4C (FFN in)": (x, F_, 1), "4C->C (FFN out)": (xf, C, 1)}
    mm_rows, layer_mm_ms = {}, 0.0
    for name, (inp, n_out, count) in shapes.items():
        w = torch.randn(n_out, inp.shape[1], device=dev, dtype=torch.bfloat16) * 0.02
        b = torch.zeros(n_out, device=dev, dtype=torch.bfloat16)
        ms = _bench_ms(lambda: F.linear(inp, w, b))
        fl = 2 * T * inp.shape[1] * n_out
        mm_rows[name] = dict(ms=ms, tflops=fl / ms / 1e9, count=count)
        layer_mm_ms += ms * count
    layer_mm_flops = 2 * T * (4 * C * C + 2 * C * F_)
    mm_rate = layer_mm_flops / layer_mm_ms / 1e9  # TFLOP/s, the model's mix of shapes
    big = torch.empty(2**29, device=dev, dtype=torch.bfloat16)
    big2 = torch.empty_like(big)
    copy_ms = _bench_ms(lambda: big2.copy_(big))
    bw = 2 * big.numel() * 2 / copy_ms / 1e9  # TB/s (read + write)
    del big, big2
    elem_bytes_per_token = L * 2 * (4 * C + 2 * 4 * C + 2 * F_)  # rotary, 2x add+LN, GELU (bf16)

    attn_s = by_kind["attention"]
    attn_rate = attn_flops / attn_s / 1e12
    mm_rate_model = mm_flops / by_kind["matmul"] / 1e12 if by_kind["matmul"] else 0.0
    t_mm = mm_flops / (max(mm_rate, mm_rate_model) * 1e12)
    t_elem = real * elem_bytes_per_token / (bw * 1e12)
    bound_inmodel_attn = real / (t_mm + attn_s + t_elem)
    bound_best_attn = real / (t_mm + attn_flops / 606e12 + t_elem)

    res = dict(
        max_tokens=max_tokens,
        batches=len(inputs),
        real_tokens=real,
        measured_tokens_per_s=real / wall,
        wall_s=wall,
        profiled_pass_s=prof_wall,
        profiled_pass_gpu_busy_s=busy,
        kernel_s_by_kind=dict(by_kind),
        kernel_s_total=kernel_s,
        top_kernels=by_name.most_common(12),
        flops=dict(total=total_flops, matmul=mm_flops, attention=attn_flops),
        in_model_rates=dict(
            matmul_tflops=mm_flops / by_kind["matmul"] / 1e12 if by_kind["matmul"] else None,
            attention_tflops=attn_flops / by_kind["attention"] / 1e12 if by_kind["attention"] else None,
            elementwise_tb_s=real * elem_bytes_per_token / by_kind["fused elementwise/LayerNorm (inductor)"] / 1e12
            if by_kind["fused elementwise/LayerNorm (inductor)"]
            else None,
        ),
        isolated=dict(matmul_shapes=mm_rows, matmul_mix_tflops=mm_rate, copy_tb_s=bw, elementwise_bytes_per_token=elem_bytes_per_token),
        bound=dict(
            seconds=dict(matmul=t_mm, attention_in_model=attn_s, attention_at_606=attn_flops / 606e12, elementwise=t_elem),
            tokens_per_s_in_model_attention=bound_inmodel_attn,
            tokens_per_s_best_attention=bound_best_attn,
        ),
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
    )
    with open(os.path.join(out, "esm2_bound.json"), "w") as f:
        json.dump(res, f, indent=1)

    print(f"ESM2-650M, {len(inputs)} packed batches of <= {max_tokens} tokens, {real} real tokens, flash_torch, compiled")
    print(f"measured: {real / wall / 1e3:.1f}k tokens/s ({wall * 1e3:.0f} ms a pass); kernels {kernel_s * 1e3:.0f} ms of it "
          f"({max(0.0, 1 - kernel_s / wall):.1%} idle; the profiled pass took {prof_wall * 1e3:.0f} ms)")
    print(f"{'part':<42} {'in model s':>10} {'share':>7} {'rate':>16}")
    rates = res["in_model_rates"]
    unit = {"matmul": (rates["matmul_tflops"], "TFLOP/s"), "attention": (rates["attention_tflops"], "TFLOP/s"),
            "fused elementwise/LayerNorm (inductor)": (rates["elementwise_tb_s"], "TB/s (min bytes)")}
    for k, v in by_kind.most_common():
        r, u = unit.get(k, (None, ""))
        print(f"{k:<42} {v:10.3f} {v / kernel_s:7.1%} {'' if r is None else f'{r:7.1f} {u}':>16}")
    print(f"isolated: matmul mix {mm_rate:.0f} TFLOP/s, copy {bw:.2f} TB/s; elementwise floor {elem_bytes_per_token / 1e6:.2f} MB/token")
    print(f"bound (no idle, isolated matmul rate, elementwise at copy bandwidth): "
          f"{bound_inmodel_attn / 1e3:.0f}k tokens/s with the in-model attention, {bound_best_attn / 1e3:.0f}k with attention at 606 TFLOP/s")


if __name__ == "__main__":
    main()
