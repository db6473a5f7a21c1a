"""ESM2-650M packed forward throughput under different inductor settings (probe)."""
import json, os, sys, time
import torch, torch._dynamo, torch._inductor.config as icfg
import anyattn
from anyattn.models import ESM2Config, ESM2ForMaskedLM, esm2_flops
from anyattn.bench.model import make_lengths, make_batches, _token_ids

out = sys.argv[1]; os.makedirs(out, exist_ok=True)
dev = "cuda"
cfg = ESM2Config.from_name("esm2_t33_650M")
torch.manual_seed(0)
model = ESM2ForMaskedLM(cfg).to(dev, torch.bfloat16).eval()
enc = model.esm
enc.attn_backend = "flash_torch"
lengths = make_lengths(2048, 320, 0.6, 30, 1022, 0)
tokens = [n + 2 for n in lengths]
ids = _token_ids(tokens, 0)
flops = esm2_flops(cfg, tokens)
def prep(mt):
    inputs = []
    for b in make_batches(tokens, mt, padded=False):
        row = torch.full((1, mt), 1, dtype=torch.long)
        row[0, :sum(tokens[i] for i in b)] = torch.cat([ids[i] for i in b])
        inputs.append((row.to(dev), anyattn.SeqInfo.from_lengths([tokens[i] for i in b], total_length=mt, device=dev)))
    return inputs
res = {}
ref = None
for name, mt, kw, cd in [("default", 32768, {}, False), ("coord", 32768, {}, True),
                         ("autotune", 16384, {"mode": "max-autotune-no-cudagraphs"}, False),
                         ("autotune", 32768, {"mode": "max-autotune-no-cudagraphs"}, False)]:
    torch._dynamo.reset()
    icfg.coordinate_descent_tuning = cd
    enc.compile_layers(**kw)
    inputs = prep(mt)
    t0 = time.perf_counter()
    with torch.inference_mode():
        o = enc(inputs[5][0], seq_info=inputs[5][1]).last_hidden_state.float()
        if ref is None or ref[0] != mt: ref = (mt, o)
        err = ((o - ref[1]).norm() / ref[1].norm()).item() if ref[0] == mt else float('nan')
        for x in inputs[:2] + inputs[-2:]: enc(x[0], seq_info=x[1])
        torch.cuda.synchronize(); tc = time.perf_counter() - t0
        best = 1e9
        for _ in range(2):
            torch.cuda.synchronize(); t0 = time.perf_counter()
            for x in inputs: enc(x[0], seq_info=x[1])
            torch.cuda.synchronize(); best = min(best, time.perf_counter() - t0)
    key = f"{name}_{mt}"
    res[key] = dict(tok_s=sum(tokens) / best, tflops=flops / best / 1e12, compile_s=tc, rel_vs_default=err)
    print(key, res[key], flush=True)
    json.dump(res, open(os.path.join(out, "esm2_modes.json"), "w"), indent=1)
