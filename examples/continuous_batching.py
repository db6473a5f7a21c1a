"""Continuous batching on a tiny HF Llama (random weights) with anyattn's paged KV cache.

Requests arrive with prompts of different lengths. Every step runs ONE forward over a packed row
that holds, for each running request, either its next prompt chunk (chunked prefill) or its
last generated token (decode); every layer makes one anyattn call on the paged cache:

    step = cache.step(seqs, new_tokens, layout="packed")    # pages allocated, layout of the row
    logits = model(ids, position_ids=step.positions, anyattn_kv=step, use_cache=False).logits

(``anyattn_kv``: the HF attention function of ``anyattn.hf`` writes each layer's keys/values into
the cache and attends to it: ``attention(q, kv=step.write(layer, k, v), mask=causal())``.)
Finished requests give their pages back; waiting requests are admitted when pages are free.

    python examples/continuous_batching.py                 # 24 requests, CPU, float32
    python examples/continuous_batching.py --check         # also: equal to HF's greedy generate per prompt
    python examples/continuous_batching.py --device cuda --dtype bfloat16 --requests 256

``--check`` runs each prompt alone through HF's own ``generate`` (eager attention, its own
cache) and compares the greedy tokens; it exits 1 on a difference.
"""

from __future__ import annotations

import argparse
import collections
import copy
import sys
import time
from dataclasses import dataclass, field

import torch
import transformers

import anyattn as aa
import anyattn.hf

anyattn.hf.register()


def tiny_llama(seed: int = 0, vocab: int = 256, device="cpu", dtype=torch.float32, impl: str = "anyattn"):
    # no end-of-sequence token: every request generates exactly its max_new tokens by plain argmax
    # on both sides of --check (with Llama's default eos 2, generate(min_new_tokens=...) would
    # forbid token 2 where this loop's argmax may pick it)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                   bos_token_id=None, eos_token_id=None)  # fmt: skip
    torch.manual_seed(seed)
    with torch.device(device):
        return transformers.LlamaForCausalLM._from_config(cfg, attn_implementation=impl, dtype=dtype).eval()


@dataclass
class Request:
    rid: int
    prompt: list[int]
    max_new: int
    out: list[int] = field(default_factory=list)
    seq: int | None = None  # the cache's sequence id while running
    fed: int = 0  # prompt tokens already in the cache

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)


def serve(model, requests, *, pages: int = 256, page_size: int = 16, chunk: int = 32, budget: int = 128, backend=None):
    """Greedy continuous batching. ``chunk``: prompt tokens per request and step; ``budget``:
    tokens per step (the packed row's length). Returns ({rid: generated tokens}, stats)."""
    cfg = model.config
    dev, dtype = model.device, model.dtype
    cache = aa.PagedKVCache(pages, page_size, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads,
                            layers=cfg.num_hidden_layers, dtype=dtype, device=dev)  # fmt: skip
    waiting = collections.deque(requests)
    running: list[Request] = []
    done: dict[int, list[int]] = {}
    stats = {"steps": 0, "tokens": 0, "mixed_steps": 0, "max_running": 0}
    ctx = aa.use(backend) if backend else _nullcontext()
    with torch.no_grad(), ctx:
        while waiting or running:
            # admit while the pool can hold the request's whole prompt and answer
            while waiting and cache.free_pages * page_size >= _reserved(running, page_size) + _need(waiting[0], page_size):
                r = waiting.popleft()
                r.seq = cache.add_sequence()
                running.append(r)
            seqs, counts, ids = [], [], []
            room = budget
            for r in running:
                n = min(chunk, len(r.prompt) - r.fed, room) if r.prefilling else min(1, room)
                if n == 0:
                    continue
                seqs.append(r)
                counts.append(n)
                ids += r.prompt[r.fed : r.fed + n] if r.prefilling else [r.out[-1]]
                room -= n
            # the packed row is padded to a power of two (at least 16): compiled kernels (flex on a
            # GPU) see a handful of shapes instead of one per step; the tail is padding
            q_len = max(16, 1 << (len(ids) - 1).bit_length())
            step = cache.step([r.seq for r in seqs], counts, layout="packed", q_len=q_len)
            x = torch.tensor([ids + [0] * (q_len - len(ids))], device=dev)
            logits = model(x, position_ids=step.positions, anyattn_kv=step, use_cache=False).logits[0]
            stats["steps"] += 1
            stats["tokens"] += len(ids)
            stats["mixed_steps"] += any(r.prefilling for r in seqs) and any(not r.prefilling for r in seqs)
            stats["max_running"] = max(stats["max_running"], len(running))
            at = 0
            for r, n in zip(seqs, counts):
                last = logits[at + n - 1]
                at += n
                if r.prefilling:
                    r.fed += n
                    if r.prefilling:
                        continue  # more prompt chunks to come
                r.out.append(int(last.argmax()))
                if len(r.out) == r.max_new:
                    done[r.rid] = r.out
                    cache.release(r.seq)
                    running.remove(r)
    return done, stats


def _need(r: Request, page_size: int) -> int:
    return -(-(len(r.prompt) + r.max_new) // page_size) * page_size


def _reserved(running, page_size: int) -> int:
    """Slots the running requests may still take (their pages are allocated as they grow)."""
    return sum(_need(r, page_size) - (-(-(r.fed + len(r.out)) // page_size) * page_size) for r in running)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def requests(n: int, vocab: int, seed: int = 1, max_prompt: int = 80, max_new: int = 12) -> list[Request]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        plen = int(torch.randint(1, max_prompt + 1, (1,), generator=g))
        new = int(torch.randint(1, max_new + 1, (1,), generator=g))
        out.append(Request(i, torch.randint(3, vocab, (plen,), generator=g).tolist(), new))
    return out


def reference(model, reqs) -> dict[int, list[int]]:
    """Each prompt alone through HF's generate (greedy, the model's own cache)."""
    out = {}
    with torch.no_grad():
        for r in reqs:
            ids = torch.tensor([r.prompt], device=model.device)
            g = model.generate(ids, max_new_tokens=r.max_new, do_sample=False, pad_token_id=0)
            out[r.rid] = g[0, len(r.prompt) :].tolist()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--pages", type=int, default=256)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--chunk", type=int, default=32, help="prompt tokens per request and step (chunked prefill)")
    p.add_argument("--budget", type=int, default=128, help="tokens per step")
    p.add_argument("--backend", default=None, help="an anyattn backend name (default: auto)")
    p.add_argument("--check", action="store_true", help="compare with HF's greedy generate, one prompt at a time")
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    model = tiny_llama(device=a.device, dtype=dtype)
    reqs = requests(a.requests, model.config.vocab_size)
    t0 = time.perf_counter()
    got, stats = serve(model, copy.deepcopy(reqs), pages=a.pages, page_size=a.page_size, chunk=a.chunk, budget=a.budget,
                       backend=a.backend)  # fmt: skip
    dt = time.perf_counter() - t0
    gen = sum(len(v) for v in got.values())
    print(f"{len(reqs)} requests, {stats['steps']} steps ({stats['mixed_steps']} mixing prefill and decode), "
          f"{stats['tokens']} tokens through the model, {gen} generated, up to {stats['max_running']} running; "
          f"{stats['tokens'] / dt:.0f} tokens/s")  # fmt: skip
    if not a.check:
        return 0
    ref_model = tiny_llama(device=a.device, dtype=dtype, impl="eager")
    ref_model.load_state_dict(model.state_dict())
    want = reference(ref_model, reqs)
    bad = [r.rid for r in reqs if got[r.rid] != want[r.rid]]
    if bad:
        for rid in bad[:5]:
            print(f"request {rid}: continuous batching {got[rid]} != HF generate {want[rid]}", file=sys.stderr)
        return 1
    print(f"check: all {len(reqs)} requests equal HF's greedy generate (eager attention)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
