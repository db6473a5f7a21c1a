"""Where the time goes in anyattn's packed, compiled ESM2-650M forward on one GPU (probe)."""
import json, os, sys, time, collections
import torch
import anyattn
from anyattn.models import ESM2Config, ESM2ForMaskedLM, esm2_flops
from anyattn.bench.model import make_lengths, make_batches, _token_ids

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
dev = "cuda"
cfg = ESM2Config.from_name("esm2_t33_650M")
torch.manual_seed(0)
model = ESM2ForMaskedLM(cfg).to(dev, torch.bfloat16).eval()
enc = model.esm
enc.compile_layers()
lengths = make_lengths(2048, 320, 0.6, 30, 1022, 0)
tokens = [n + 2 for n in lengths]
ids = _token_ids(tokens, 0)
res = {}
def prep(max_tokens):
    bs = make_batches(tokens, max_tokens, padded=False)
    inputs = []
    for b in bs:
        row = torch.full((1, max_tokens), 1, dtype=torch.long)
        row[0, :sum(tokens[i] for i in b)] = torch.cat([ids[i] for i in b])
        info = anyattn.SeqInfo.from_lengths([tokens[i] for i in b], total_length=max_tokens, device=dev)
        inputs.append((row.to(dev), info))
    return inputs
flops = esm2_flops(cfg, tokens)
for backend in ("flash_torch", "flex"):
    enc.attn_backend = backend
    for mt in (16384, 32768):
        inputs = prep(mt)
        with torch.inference_mode():
            for x in inputs[:3] + inputs[-2:]:
                enc(x[0], seq_info=x[1])
            for _ in range(2):
                torch.cuda.synchronize(); t0 = time.perf_counter()
                for x in inputs:
                    enc(x[0], seq_info=x[1])
                torch.cuda.synchronize(); dt = time.perf_counter() - t0
        res[f"{backend}_mt{mt}"] = dict(tok_s=sum(tokens) / dt, tflops=flops / dt / 1e12, batches=len(inputs))
        print(backend, mt, res[f"{backend}_mt{mt}"], flush=True)
# profile one mid batch with flash_torch at 16k
enc.attn_backend = "flash_torch"
inputs = prep(16384)
x = inputs[len(inputs) // 2]
from torch.profiler import profile, ProfilerActivity
with torch.inference_mode():
    for _ in range(3): enc(x[0], seq_info=x[1])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5): enc(x[0], seq_info=x[1])
        torch.cuda.synchronize()
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(5): enc(x[0], seq_info=x[1])
    torch.cuda.synchronize(); wall = (time.perf_counter() - t0) / 5
cat = collections.Counter()
names = collections.Counter()
for e in prof.key_averages():
    t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
    if t <= 0: continue
    n = e.key.lower()
    c = ("attention" if any(s in n for s in ("flash", "fmha", "attn")) else
         "gemm" if any(s in n for s in ("gemm", "nvjet", "xmma", "cutlass", "sm90", "matmul")) else
         "triton" if "triton" in n else "other")
    cat[c] += t / 5
    names[e.key[:90]] += t / 5
tot = sum(cat.values())
res["profile"] = dict(wall_ms=wall * 1e3, kernel_ms=tot / 1e3, cat_ms={k: v / 1e3 for k, v in cat.items()},
                      top=[(k, v / 1e3) for k, v in names.most_common(15)])
json.dump(res, open(os.path.join(out, "esm2_profile.json"), "w"), indent=1)
print(json.dumps(res["profile"], indent=1))
