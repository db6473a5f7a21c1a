"""Audit of the promise "docs with runnable examples" (README.md and docs/*.md), on the CPU.

1. Every ```python block (and every command of a ```bash block, or of a plain command block,
   that calls ``anyattn`` with small options) runs, adapted only where a CPU needs it: CUDA ->
   CPU, bf16 -> float32, sizes shrunk (4096 -> 64, a 4096-page cache -> 16 pages), hub ids and
   ``path/to/...`` placeholders -> tiny random checkpoints built as tests/test_embed_support.py
   builds them, and ``...`` placeholders of fragments -> tensors of the right shape. Every
   adaptation is a literal (old, new) replacement that must apply, so a doc that changes shows
   up here. The blocks run in two subprocesses started together (one for Python blocks, one for
   command lines, run through ``anyattn.cli.main`` in-process to pay torch's import once); what
   they print is compared with what the blocks' comments say.
2. Names the docs mention exist: test names, repository paths, Markdown links and anchors,
   ``anyattn.*`` / ``aa.*`` / ``am.*`` symbols and ``from anyattn... import`` lines, every
   ``anyattn ...`` command line (parsed by the real parser), options of the scripts the docs
   run, signatures written as code, and documented defaults and presets.
3. Printed output the docs show (the README's ``explain`` table, the masks' pictures, the
   JSON schemas of the benchmark files) is compared with what the code prints here.

Blocks and references this audit found wrong (eleven: two blocks that did not run, stale names,
a command that does not exist, stale quotes, citations of a file outside the repository, and
explain's first-sight note where no first-sight row applied) were fixed; their tests say what was
wrong. Blocks that need a GPU, the network, several processes, or take minutes are skipped with
the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib
import inspect
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"
DOCS = ["README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(str(REPO / "docs" / "*.md")))]


def _text(doc: str) -> str:
    return (REPO / doc).read_text()


# ---------------------------------------------------------------------------------------------
# blocks


def fenced(doc: str):
    """Every fenced block of ``doc``: (first line number, language, code)."""
    lines = _text(doc).split("\n")
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if m:
            j = i + 1
            while not re.match(r"^```\s*$", lines[j]):
                j += 1
            out.append((i + 2, m.group(1), "\n".join(lines[i + 1 : j]) + "\n"))
            i = j + 1
        else:
            i += 1
    return out


def block(doc: str, lang: str, contains: str) -> str:
    """The one fenced ``lang`` block of ``doc`` that contains ``contains``."""
    found = [code for _, lg, code in fenced(doc) if lg == lang and contains in code]
    assert len(found) == 1, (doc, lang, contains, len(found))
    return found[0]


def adapt(code: str, *subs) -> str:
    """``code`` with each (old, new) replaced; every ``old`` must occur (a changed doc shows)."""
    for old, new in subs:
        assert old in code, f"adaptation no longer applies: {old!r}"
        code = code.replace(old, new)
    return code


CPU = [('device="cuda"', 'device="cpu"'), ("torch.bfloat16", "torch.float32")]


def command_lines(code: str):
    """The command lines of a shell block: continuation lines joined, comments dropped."""
    code = code.replace("\\\n", " ")
    out = []
    for line in code.split("\n"):
        line = line.split("  #", 1)[0].strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def doc_command(doc: str, text: str) -> list[str]:
    """argv (after ``anyattn``) of a command the doc writes exactly as ``text``."""
    assert text in _text(doc), (doc, text)
    argv = shlex.split(text)
    while argv and argv[0] in ("python", "python3", "-m", "anyattn"):
        argv = argv[1:]
    return argv


# ---------------------------------------------------------------------------------------------
# the two runners


RUNNER = r"""
import contextlib, io, json, os, runpy, sys, time, traceback
jobs = json.load(open(sys.argv[1]))
out = sys.argv[2]
sys.path.insert(0, REPO)
import torch
torch.set_num_threads(1)
results, spaces = {}, {}
for job in jobs:
    ns = spaces.setdefault(job["group"], {"__name__": "__main__"})
    o, e = io.StringIO(), io.StringIO()
    rc, status, err = None, "ok", ""
    here = os.getcwd()
    os.makedirs(job["cwd"], exist_ok=True)
    os.chdir(job["cwd"])
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
            if job["kind"] == "python":
                exec(compile(job["code"], job["id"], "exec"), ns)
            elif job["kind"] == "cli":
                import anyattn.cli
                rc = anyattn.cli.main(job["argv"], prog="anyattn")
                status = "ok" if rc == job.get("rc", 0) else "rc"
            else:
                sys.argv = [job["script"], *job["argv"]]
                try:
                    runpy.run_path(job["script"], run_name="__main__")
                    rc = 0
                except SystemExit as x:
                    rc = x.code if isinstance(x.code, int) else (0 if x.code is None else 1)
                status = "ok" if rc == 0 else "rc"
    except BaseException:
        status, err = "error", traceback.format_exc()
    finally:
        os.chdir(here)
    results[job["id"]] = dict(status=status, rc=rc, error=err[-4000:], stdout=o.getvalue()[-20000:],
                              stderr=e.getvalue()[-4000:], seconds=round(time.perf_counter() - t0, 2))
    json.dump(results, open(out, "w"), indent=1)
""".replace("REPO", repr(str(REPO)))


def _env():
    return dict(
        os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
    )  # fmt: skip


def _py(id_, group, code, cwd):
    return {"id": id_, "group": group, "kind": "python", "code": code, "cwd": str(cwd)}


def python_jobs(d: Path):
    ck = d / "ck"
    setup = f"""
from tests.test_embed_support import make_ckpt
for fam in ("esm2", "dplm", "dplm2", "esmc", "e1", "ankh"):
    make_ckpt(fam, {str(ck)!r} + "/" + fam)
import torch, transformers
torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2)
transformers.LlamaForCausalLM(cfg).save_pretrained({str(ck / "llama")!r})
"""
    jobs = [_py("setup", "setup", setup, d)]
    # README: the explain table, in a fresh process (first sight), then after one call
    jobs.append(
        _py(
            "readme_explain",
            "readme_explain",
            """
import torch, anyattn as aa
q = k = v = torch.randn(1, 2, 8, 64)
m = aa.documents([3, 5]) & aa.causal()
print(aa.explain(q, k, v, mask=m))
print("=====")
aa.attention(q, k, v, mask=m)
print(aa.explain(q, k, v, mask=m))
print("=====")
print(aa.explain(q, k, v, mask=m, full=False))
""",
            d,
        )
    )
    r16 = adapt(
        block("README.md", "python", "aa.explain(q, k, v"), *CPU, ("4096", "64"), ("aa.documents([1000, 3000, 96])", "aa.documents([10, 30, 24])"),
    )  # fmt: skip
    jobs.append(_py("README.md:16", "readme", r16 + "print('shape', tuple(out.shape))\n", d))
    r112 = adapt(
        block("README.md", "python", "aa.PagedKVCache(pages=4096"), *CPU, ("pages=4096", "pages=16"), ("layers=16", "layers=2"),
    )  # fmt: skip
    pre = ("import torch, anyattn as aa\nlayer = 0\nq = torch.randn(1, 16, 555, 128)\n"
           "k_new = v_new = torch.randn(1, 8, 555, 128)\ns = torch.nn.Parameter(torch.zeros(16))\n")  # fmt: skip
    jobs.append(_py("README.md:112", "readme112", pre + r112 + "print('shape', tuple(out.shape))\n", d))
    # ankh
    a18 = adapt(block("docs/ankh.md", "python", "AnkhConfig(d_model=48"), ("/tmp/ankh_tiny", str(d / "ankh_tiny")))
    a18 += ("assert (packed[0, 30:] - out.last_hidden_state[1, :20]).abs().max() < 1e-5\n"
            "print('again', type(again).__name__, again.config.attn_backend)\n")  # fmt: skip
    jobs.append(_py("docs/ankh.md:18", "ankh", a18, d))
    a47 = adapt(
        block("docs/ankh.md", "python", "ElnaggarLab/ankh-base"), *CPU, ('"ElnaggarLab/ankh-base"', repr(str(ck / "ankh"))),
        (".cuda()", ".to('cpu')"),
    )  # fmt: skip
    jobs.append(_py("docs/ankh.md:47", "ankh", a47 + "print('shape', tuple(out.last_hidden_state.shape))\n", d))
    # dplm
    dp = adapt(
        block("docs/dplm.md", "python", "load_dplm_tokenizer"), *CPU, ('"airkingbd/dplm_650m"', repr(str(ck / "dplm"))),
        ('"airkingbd/dplm2_650m"', repr(str(ck / "dplm2"))), (".cuda()", ".to('cpu')"),
        ("[[12, 7, 4095, 8, 8, 100, 5, 5, 77, 3]]", "[[12, 7, 15, 8, 8, 10, 5, 5, 7, 3]]"),  # codes of the tiny 16-code vocab
    )  # fmt: skip
    dp += "print('types', type(model).__name__, type(model2).__name__, type(tok).__name__, type(tok2).__name__)\n"
    jobs.append(_py("docs/dplm.md:96", "dplm", dp, d))
    # e1: as written (placeholder and device only)
    e1 = adapt(block("docs/e1.md", "python", "load_e1("), *CPU, ('"path/to/E1-300m"', repr(str(ck / "e1"))))
    jobs.append(
        _py("docs/e1.md:44", "e1c", e1 + "print('out', type(out).__name__, model.config.attn_backend)\n", d)
    )
    # embed.md's API sketch (placeholders: proteins.fasta, ./esm2_dir, my_model)
    e22 = block("docs/embed.md", "python", "my_model")
    pre = (f"import shutil, anyattn.models as _am\nshutil.copytree({str(ck / 'esm2')!r}, 'esm2_dir', dirs_exist_ok=True)\n"
           "open('proteins.fasta', 'w').write('>P1 x\\nMKTAYIAKQR\\n>P2\\nMKV\\n')\nmy_model = _am.load('./esm2_dir')\n")  # fmt: skip
    post = "print('columns', store.columns)\nprint('bare', open_store('b.sqlite').records())\nprint('P1', store.get('P1').shape)\n"
    jobs.append(_py("docs/embed.md:22", "embed22", pre + e22 + post, d / "embed22"))
    # esmc
    c16 = adapt(block("docs/esmc.md", "python", "esmc_tokenizer()"), ("/tmp/esmc_tiny", str(d / "esmc_tiny")))
    c16 += ("assert (packed.last_hidden_state[0, :12] - out.last_hidden_state[0]).abs().max() < 1e-5\n"
            "print('again', type(again).__name__, again.config.attn_backend)\n")  # fmt: skip
    jobs.append(_py("docs/esmc.md:16", "esmc", c16, d))
    c41 = adapt(
        block("docs/esmc.md", "python", "Synthyra/ESMplusplus_small"),
        *CPU,
        ('"Synthyra/ESMplusplus_small"', repr(str(ck / "esmc"))),
    )
    jobs.append(_py("docs/esmc.md:41", "esmc", c41 + "print('tok', type(tok).__name__, len(tok.vocab))\n", d))
    # fa4.md's flex_lowering block (a fragment: q, k, v, slopes defined; flex compiles on the CPU)
    f113 = block("docs/fa4.md", "python", "flex_lowering")
    pre = "import torch, anyattn\nq = k = v = torch.randn(1, 2, 16, 16)\nslopes = torch.tensor([0.5, 0.25])\n"
    jobs.append(_py("docs/fa4.md:113", "fa4", pre + f113 + "print('shape', tuple(out.shape))\n", d))
    # hf
    jobs.append(
        _py(
            "docs/hf.md:8",
            "hf8",
            block("docs/hf.md", "python", "model.generate(") + "print('gen', tuple(out.shape))\n",
            d,
        )
    )
    jobs.append(
        _py(
            "docs/hf.md:89",
            "hf89",
            block("docs/hf.md", "python", "position_ids = torch.cat") + "print('loss', float(loss))\n",
            d,
        )
    )
    # models
    m6 = adapt(
        block("docs/models.md", "python", "facebook/esm2_t33_650M_UR50D"), *CPU,
        ('"facebook/esm2_t33_650M_UR50D"', repr(str(ck / "esm2"))), ("v.cuda()", "v.to('cpu')"),
    )  # fmt: skip
    jobs.append(_py("docs/models.md:6", "models", m6 + "print('backend', model.config.attn_backend)\n", d))
    # :198 runs "model(ids, seq_info=info)" with autograd on: after :6's last line (flex) that is a
    # flex backward, which the CPU does not have; the fragment gets a model of its own (auto)
    m198 = f"import anyattn.models as am\nmodel = am.load({str(ck / 'esm2')!r})\n" + block(
        "docs/models.md", "python", "ProteinTokenizer.esm()"
    )
    post = ("print('encode', tok.encode('MKV'))\nprint('batch', {k: tuple(v.shape) for k, v in batch.items()})\n"
            "print('pack', tuple(ids.shape), info.cu_seqlens.tolist())\n")  # fmt: skip
    jobs.append(_py("docs/models.md:198", "models198", m198 + post, d))
    # serving
    s21 = block("docs/serving.md", "python", "aa.sink(s)")
    pre = "import torch, anyattn as aa\nHq = 4\nq = torch.randn(1, Hq, 8, 16)\nk = v = torch.randn(1, 2, 8, 16)\n"
    jobs.append(
        _py(
            "docs/serving.md:21",
            "serving21",
            pre + s21 + "out.sum().backward()\nprint('grad', s.grad is not None)\n",
            d,
        )
    )
    s89 = adapt(
        block("docs/serving.md", "python", "cache.release(seqs[3])"), *CPU, ("pages=4096", "pages=16"), ("layers=16", "layers=2"),
        ("range(16)", "range(2)"),
        ("q, k_new, v_new = ...", "q, k_new, v_new = torch.randn(8, 16, 1, 128), torch.randn(8, 8, 1, 128), torch.randn(8, 8, 1, 128)"),
    )  # fmt: skip
    jobs.append(_py("docs/serving.md:89", "serving89b", s89 + "print('shape', tuple(out.shape))\n", d))
    s165 = block("docs/serving.md", "python", "anyattn.hf.register()\nmodel = AutoModelForCausalLM")
    pre = (f"import torch\nfrom transformers import AutoModelForCausalLM\nname = {str(ck / 'llama')!r}\n"
           "ids = torch.randint(0, 100, (2, 6))\nam = torch.ones_like(ids)\nam[1, :2] = 0\n")  # fmt: skip
    jobs.append(_py("docs/serving.md:165", "serving165", pre + s165 + "print('ok')\n", d))
    # training
    t11 = block("docs/training.md", "python", "SelfAttention(cfg)")
    jobs.append(_py("docs/training.md:11", "t11", t11 + "print('shape', tuple(y.shape))\n", d))
    t22 = block("docs/training.md", "python", 'DecoderConfig.from_name("tiny"')
    jobs.append(_py("docs/training.md:22", "t22", t22 + "print('loss', float(loss))\n", d))
    return jobs


def _cli(id_, argv, cwd, rc=0):
    return {"id": id_, "group": "cli", "kind": "cli", "argv": argv, "cwd": str(cwd), "rc": rc}


def cli_jobs(d: Path):
    ck = d / "ck"
    setup = f"""
from tests.test_embed_support import make_ckpt
import torch, transformers
for fam in ("esmc", "ankh"):
    make_ckpt(fam, {str(ck)!r} + "/" + fam)
torch.manual_seed(0)
cfg = transformers.EsmConfig(vocab_size=33, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                             max_position_embeddings=42, position_embedding_type="rotary", token_dropout=True,
                             pad_token_id=1, mask_token_id=32)
transformers.EsmForMaskedLM(cfg).save_pretrained({str(ck / "esm2_4l")!r})   # 5 hidden states: --layers -5 exists
open({str(d / "proteins.fasta")!r}, "w").write(">P1 a\\nMKTAYIAKQR\\n>P2\\nMKV\\n>P3\\nMKV\\n")
open({str(d / "small.fasta")!r}, "w").write(">s1\\nMKTAYIAK\\n>s2\\nMSV\\n")
"""
    jobs = [_py("cli_setup", "setup", setup, d)]
    # README's main job, first (a fresh process state)
    jobs.append(
        _cli(
            "README.md:9 doctor",
            [*doc_command("README.md", "anyattn doctor"), "--json", str(d / "doctor.json"), "--no-progress"],
            d,
        )
    )
    # docs/embed.md's commands (placeholders -> tiny checkpoints; cuda:0,cuda:1 -> cpu)
    lines = command_lines(block("docs/embed.md", "bash", "--shard-size 2GB"))
    assert len(lines) == 5 and lines[0].startswith("pip install") and "facebook/esm2_t33_650M_UR50D" in lines[1]
    repl = {
        "./esm2_dir": str(ck / "esm2_4l"),
        "./esmc_dir": str(ck / "esmc"),
        "./ankh_dir": str(ck / "ankh"),
        "cuda:0,cuda:1": "cpu",
    }
    for n, line in enumerate(lines[2:], start=16):
        argv = [repl.get(a, a) for a in shlex.split(line)[1:]] + ["--no-progress"]
        jobs.append(_cli(f"docs/embed.md:12 line {n - 15}", argv, d))
    # benchmark smoke commands as the docs write them (with --out where the doc names the files)
    jobs.append(
        _cli(
            "docs/benchmarks.md:170",
            [
                *doc_command("docs/benchmarks.md", "anyattn bench kernels --mode new-packing --quick --device cpu"),
                "--out",
                str(d / "np"),
            ],
            d,
        )
    )
    jobs.append(
        _cli(
            "docs/benchmarks.md:248",
            [
                *doc_command("docs/benchmarks.md", "anyattn bench kernels --mode host --quick --device cpu"),
                "--out",
                str(d / "host"),
            ],
            d,
        )
    )
    jobs.append(
        _cli(
            "docs/benchmarks.md:315",
            [*doc_command("docs/benchmarks.md", "anyattn bench model --quick"), "--out", str(d / "model")],
            d,
        )
    )
    jobs.append(
        _cli("docs/benchmarks.md:378", doc_command("docs/benchmarks.md", "anyattn bench model --family e1 --quick"), d)
    )
    jobs.append(_cli("docs/serving.md:211", doc_command("docs/serving.md", "anyattn bench serving --quick"), d))
    # kernels.json's schema: the quick matrix cut to one case
    jobs.append(
        _cli(
            "kernels.json",
            [
                "bench",
                "kernels",
                "--quick",
                "--variants",
                "causal",
                "--modes",
                "fwd",
                "--backends",
                "auto,sdpa,raw:sdpa",
                "--no-progress",
                "--out",
                str(d / "kernels"),
            ],
            d,
        )
    )
    # docs/benchmarks.md:19: an option another mode reads is refused, with this message
    jobs.append(_cli("benchmarks.md:19 refusal", ["bench", "kernels", "--mode", "host", "--steps", "3"], d, rc=2))
    # docs/training.md: the example script's CPU line
    line = command_lines(block("docs/training.md", "bash", "examples/train_packed_lm.py --preset tiny"))[0]
    argv = shlex.split(line)
    assert argv[:3] == ["PYTHONPATH=src", "python3", "examples/train_packed_lm.py"], argv
    jobs.append(
        {
            "id": "docs/training.md:154",
            "group": "cli",
            "kind": "script",
            "script": str(REPO / argv[2]),
            "argv": argv[3:],
            "cwd": str(REPO),
        }
    )
    return jobs


class _Runner:
    def __init__(self, d: Path, name: str, jobs):
        self.out = d / f"{name}.json"
        jf = d / f"{name}_jobs.json"
        jf.write_text(json.dumps(jobs))
        runner = d / "runner.py"
        runner.write_text(RUNNER)
        self.log = open(d / f"{name}.log", "w")  # noqa: SIM115 - closed by the fixture
        self.p = subprocess.Popen(
            [sys.executable, str(runner), str(jf), str(self.out)],
            env=_env(),
            cwd=d,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self._res = None

    def results(self):
        if self._res is None:
            try:
                self.p.wait(timeout=400)
            except subprocess.TimeoutExpired:
                self.p.kill()
            self._res = json.loads(self.out.read_text()) if self.out.exists() else {}
        return self._res

    def close(self):
        if self.p.poll() is None:
            self.p.kill()
        self.log.close()


@pytest.fixture(scope="module")
def runners(tmp_path_factory):
    d = tmp_path_factory.mktemp("docs_audit")
    (d / "embed22").mkdir()
    rs = {"py": _Runner(d, "py", python_jobs(d)), "cli": _Runner(d, "cli", cli_jobs(d))}
    yield d, rs
    for r in rs.values():
        r.close()


def _job(runners, which, id_):
    _, rs = runners
    res = rs[which].results()
    assert res.get("setup" if which == "py" else "cli_setup", {}).get("status") == "ok", res.get("setup") or res.get(
        "cli_setup"
    )
    assert id_ in res, f"{id_} did not run (runner log: {rs[which].log.name})"
    return res[id_]


def _ok(r):
    assert r["status"] == "ok", (r["status"], r["rc"], r["error"] or r["stderr"][-2000:])
    return r["stdout"]


# ---------------------------------------------------------------------------------------------
# 1. the Python blocks


def test_readme_quick_example_runs_on_cpu(runners):
    """README.md:16, adapted: cuda -> cpu, bf16 -> float32, 4096 -> 64 tokens, documents([1000,
    3000, 96]) -> documents([10, 30, 24]) (the same 3 documents at 64 tokens). The ``use("flex")``
    call compiles FlexAttention on the CPU."""
    out = _ok(_job(runners, "py", "README.md:16"))
    assert "chosen:    sdpa" in out and "shape (2, 16, 64, 128)" in out


def test_readme_serving_fragment_runs_on_cpu(runners):
    """README.md:112, a fragment: q, layer, k_new, v_new and s defined; 16 pages and 2 layers
    instead of 4096 and 16 (a 4096-page float32 cache of 16 layers is 68 GB)."""
    assert "shape (1, 16, 555, 128)" in _ok(_job(runners, "py", "README.md:112"))


def test_ankh_example_prints_what_its_comments_say(runners):
    out = _ok(_job(runners, "py", "docs/ankh.md:18"))
    assert "torch.Size([2, 30, 48]) 3 torch.Size([2, 2])" in out  # (2, 30, 48), 3, (2, 2)
    assert "again AnkhModel eager" in out


def test_ankh_real_checkpoint_block_runs_on_a_local_tiny_checkpoint(runners):
    """docs/ankh.md:47 with the hub id replaced by a tiny ANKH-shaped directory (its tokenizer a
    word-level stand-in of ANKH's, tests/test_embed_support.py): the real checkpoint needs the network."""
    assert "shape (2, 11, 32)" in _ok(_job(runners, "py", "docs/ankh.md:47"))


def test_dplm_usage_runs_on_tiny_checkpoints(runners):
    """docs/dplm.md:96, hub ids -> tiny DPLM / DPLM-2 directories; the structure codes of the
    two-track example are cut to the tiny vocabulary's 16 codes (4095, 100, 77 do not exist there)."""
    assert "types DPLMForMaskedLM DPLM2ForMaskedLM ProteinTokenizer DPLM2Tokenizer" in _ok(
        _job(runners, "py", "docs/dplm.md:96")
    )


def test_e1_usage_block_runs_as_written(runners):
    """docs/e1.md:44 used torch without importing it and a sample 'QUERY2' ('2' is not a residue):
    both fixed in the docs; the block runs with only its path and device adapted."""
    assert "out E1Output flex" in _ok(_job(runners, "py", "docs/e1.md:44"))


def test_embed_api_sketch_runs_with_its_placeholders_filled(runners):
    """docs/embed.md:22: proteins.fasta, ./esm2_dir and my_model are placeholders (a tiny ESM2,
    2 layers of 32 channels: the comment's layer 33 / 1280 channels are the 650M model's)."""
    out = _ok(_job(runners, "py", "docs/embed.md:22"))
    assert (
        "columns [Column(layer=2, pooler='mean', start=0, stop=32), Column(layer=2, pooler='max', start=32, stop=64)]"
        in out
    )
    assert "bare ['0', '1', '2']" in out and "P1 (64,)" in out


def test_esmc_example_prints_what_its_comments_say(runners):
    out = _ok(_job(runners, "py", "docs/esmc.md:16"))
    assert "torch.Size([2, 12, 64]) 3 torch.Size([2, 4])" in out  # (2, 12, 64), 3, (2, 4)
    assert "again ESMCForMaskedLM eager" in out
    assert "tok ProteinTokenizer 33" in _ok(_job(runners, "py", "docs/esmc.md:41"))  # "or a local copy"


def test_fa4_flex_lowering_block_runs_on_cpu(runners):
    """docs/fa4.md:113, a fragment (q, k, v, slopes defined): flex on the CPU with the Triton
    lowering forced (one CPU compile)."""
    assert "shape (1, 2, 16, 16)" in _ok(_job(runners, "py", "docs/fa4.md:113"))


def test_hf_examples_run_as_written(runners):
    assert "gen (2, 16)" in _ok(_job(runners, "py", "docs/hf.md:8"))
    assert "loss " in _ok(_job(runners, "py", "docs/hf.md:89"))


def test_models_examples_run_and_print_what_their_comments_say(runners):
    """docs/models.md:6 (hub id -> tiny ESM2, cuda -> cpu) and :198 (the tokenizer; runs after :6)."""
    assert "backend flex" in _ok(_job(runners, "py", "docs/models.md:6"))
    out = _ok(_job(runners, "py", "docs/models.md:198"))
    assert "encode [0, 20, 15, 7, 2]" in out  # [0, 20, 15, 7, 2]: <cls> M K V <eos>
    assert "batch {'input_ids': (2, 5), 'attention_mask': (2, 5)}" in out  # (2, 5), right padding
    assert "pack (1, 9) [0, 5, 9]" in out  # (1, 9) packed row + SeqInfo.from_lengths([5, 4])


def test_serving_sink_fragment_runs(runners):
    assert "grad True" in _ok(_job(runners, "py", "docs/serving.md:21"))  # "Gradients reach s"


def test_serving_kv_cache_block_runs_as_written(runners):
    """docs/serving.md:89 used torch without importing it (fixed in the docs)."""
    assert "shape (8, 16, 1, 128)" in _ok(_job(runners, "py", "docs/serving.md:89"))


def test_serving_transformers_fragment_runs(runners):
    """docs/serving.md:165 (AutoModelForCausalLM, name, ids and am supplied: a tiny saved Llama)."""
    _ok(_job(runners, "py", "docs/serving.md:165"))


def test_training_examples_run_as_written(runners):
    assert "shape (2, 128, 256)" in _ok(_job(runners, "py", "docs/training.md:11"))  # (2, 128, 256)
    assert "loss " in _ok(_job(runners, "py", "docs/training.md:22"))


@pytest.mark.parametrize("why", [
    pytest.param("pip / network", id="README.md:6 bash (pip install, anyattn doctor runs below)"),
    pytest.param("network", id="docs/embed.md:15 (hub id facebook/esm2_t33_650M_UR50D)"),
    pytest.param("distributed", id="docs/training.md:104 (init_device_mesh, FSDP2/TP)"),
    pytest.param("distributed", id="docs/training.md:118 (context_parallel)"),
    pytest.param("gpu", id="docs/benchmarks.md:541 bash (decode/seqinfo/padding probes, host_profile)"),
    pytest.param("slow", id="docs/embed.md:419 bash (embed_bench.py; --quick ran 61 s, exit 0)"),
    pytest.param("slow", id="docs/hf.md:184 (hf_llama.py; --smoke ran 32 s, exit 0)"),
    pytest.param("gpu", id="docs/training.md:168 bash (train_bench.py, train_multigpu.py)"),
    pytest.param("gpu", id="docs/training.md:154 lines 2-3 (torchrun, 2 processes)"),
    pytest.param("gpu", id="docs/serving.md:206 lines 1-4 (--preset h100)"),
    pytest.param("covered", id="docs/embed.md:42,58,78,94 (tests/test_embed_docs.py runs them)"),
    pytest.param("signature", id="docs/ankh.md:129, docs/esmc.md:133, docs/models.md:98 (signatures: test_signature_blocks_match_the_code)"),
])  # fmt: skip
def test_blocks_not_run_here(why):
    pytest.skip({"pip / network": "installs packages from the network", "network": "needs the hub (no network here)",
                 "distributed": "needs several ranks (torch.distributed); covered by tests/test_distributed*.py",
                 "gpu": "needs a GPU", "slow": "too slow for this file's 90 s budget (run once by hand: exit 0)",
                 "covered": "already run by tests/test_embed_docs.py", "signature": "not code to run"}[why])  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 1b. command lines


def test_readme_main_job_doctor_runs_and_writes_the_documented_json(runners):
    """README.md:9 ``anyattn doctor`` (+ --json, --no-progress); docs/benchmarks.md:600's schema."""
    _ok(_job(runners, "cli", "README.md:9 doctor"))
    d = json.loads((runners[0] / "doctor.json").read_text())
    assert d["schema"] == "anyattn.doctor/1"
    for k in [
        "ok",
        "exit_code",
        "device",
        "command",
        "environment",
        "packages",
        "backends",
        "checks",
        "speed",
        "notes",
        "elapsed_s",
    ]:
        assert k in d, k
    sec = "`anyattn doctor --json` (`schema: anyattn.doctor/1`)"
    assert set(d["environment"]) == _doc_fields("docs/benchmarks.md", sec, "`environment` (")
    assert set(d["backends"][0]) == _doc_fields("docs/benchmarks.md", sec, "`backends` (")
    assert set(d["checks"][0]) == _doc_fields("docs/benchmarks.md", sec, "`checks`\n(")
    assert set(d["speed"][0]) == _doc_fields("docs/benchmarks.md", sec, "`speed` (")
    assert {c["status"] for c in d["checks"]} <= {"ok", "fail", "error", "refused", "skipped"}


@pytest.mark.parametrize("n", [1, 2, 3])
def test_embed_md_command_lines_run_on_tiny_checkpoints(runners, n):
    """docs/embed.md:16-19 (line 1: --devices cuda:0,cuda:1 -> cpu, a 4-layer ESM2 so that
    --layers -5 exists; lines 2-3: ESM C per residue into safetensors, ANKH into npz)."""
    _ok(_job(runners, "cli", f"docs/embed.md:12 line {n}"))
    from anyattn.embed import open_store

    d = runners[0]
    st = open_store(str(d / {1: "emb.sqlite", 2: "res.safetensors", 3: "small.npz"}[n]))
    if n == 1:
        assert st.layout["layers"] == [4, 0] and st.layout["poolers"] == ["mean", "max", "std"]
        assert st.stack().shape == (3, 2, 96)
    elif n == 2:
        assert st["P1"].shape == (10, 32)  # residues x channels, no <cls>/<eos>
    else:
        assert st.layout["poolers"] == ["mean", "eos"]


def _keys(s):
    return {k.strip() for k in s.split(",")}


def _doc_fields(doc: str, section: str, marker: str) -> set[str]:
    """The comma-separated field names the doc lists after ``marker`` (first found after
    ``section``), up to the parenthesis that closes the list; notes in parentheses dropped."""
    t = _text(doc)
    i = t.index(marker, t.index(section)) + len(marker)
    depth, j = 0, i
    while depth >= 0:
        depth += {"(": 1, ")": -1}.get(t[j], 0)
        j += 1
    body = t[i : j - 1]
    while re.search(r"\([^()]*\)", body):
        body = re.sub(r"\([^()]*\)", "", body)
    return {item.split()[0].strip("`") for item in body.replace("\n", " ").split(",") if item.strip()}


def test_bench_smoke_commands_run_and_write_the_documented_json(runners):
    """docs/benchmarks.md:170 / :248 / :315 run as written (+ --out); their files' fields are
    the lists docs/benchmarks.md:231-236, :270-273 and :318-324 give."""
    d = runners[0]
    _ok(_job(runners, "cli", "docs/benchmarks.md:170"))
    j = json.loads((d / "np" / "new_packing.json").read_text())
    assert j["schema"] == "anyattn.bench.kernels.new_packing/1" and (d / "np" / "new_packing.md").exists()
    assert set(j) == _keys(
        "schema, meta, options, timing, flop_convention, best_of, complete, interrupted, elapsed_s, targets, results"
    )
    assert set(j["results"][0]) == _doc_fields("docs/benchmarks.md", "Files: `new_packing.json`", "and `results`: ")
    _ok(_job(runners, "cli", "docs/benchmarks.md:248"))
    j = json.loads((d / "host" / "host.json").read_text())
    assert j["schema"] == "anyattn.bench.kernels.host/1"
    assert set(j) == _keys("schema, meta, options, timing, complete, interrupted, elapsed_s, targets, results")
    assert set(j["results"][0]) == _doc_fields("docs/benchmarks.md", "Files: `host.json`", "`results`: ")
    _ok(_job(runners, "cli", "docs/benchmarks.md:315"))
    j = json.loads((d / "model" / "model.json").read_text())
    assert j["schema"] == "anyattn.bench.model/1"
    assert _keys("command, meta, workload, reference, goal, notes, complete, interrupted, elapsed_s, results") <= set(j)
    assert set(j["results"][0]) == _doc_fields(
        "docs/benchmarks.md", "`model.json` (`schema: anyattn.bench.model/1`", "`results` ("
    )
    assert {"hf_sdpa_rel_l2", "bound", "port_float32_rel_l2"} <= set(j["reference"])


def test_kernels_json_has_the_documented_fields(runners):
    """docs/benchmarks.md:591-598 (a one-case quick matrix with --out)."""
    d = runners[0]
    _ok(_job(runners, "cli", "kernels.json"))
    j = json.loads((d / "kernels" / "kernels.json").read_text())
    assert j["schema"] == "anyattn.bench.kernels/1"
    assert set(j) == _keys(
        "schema, meta, sweep, flop_convention, notes, complete, interrupted, elapsed_s, host_overhead, results"
    )
    sec = "`kernels.json` (`schema: anyattn.bench.kernels/1`)"
    assert set(j["meta"]) == _doc_fields("docs/benchmarks.md", sec, "`meta` (")
    assert set(j["host_overhead"][0]) == _doc_fields("docs/benchmarks.md", sec, "(rows: ")
    assert set(j["results"][0]) == _doc_fields("docs/benchmarks.md", sec, "`results` (rows: ")
    for ext in ("json", "csv", "md"):
        assert (d / "kernels" / f"kernels.{ext}").exists()


def test_more_smoke_commands_run(runners):
    """docs/benchmarks.md:378 (bench model --family e1 --quick), docs/serving.md:211 (bench
    serving --quick), docs/training.md:154 line 1 (the example script on the CPU)."""
    _ok(_job(runners, "cli", "docs/benchmarks.md:378"))
    _ok(_job(runners, "cli", "docs/serving.md:211"))
    assert "throughput:" in _ok(_job(runners, "cli", "docs/training.md:154"))


def test_an_option_of_another_mode_is_refused_with_the_documented_message(runners):
    """docs/benchmarks.md:19: ``--steps applies to --mode new-packing, not --mode host``."""
    r = _job(runners, "cli", "benchmarks.md:19 refusal")
    assert r["status"] == "ok" and r["rc"] == 2, r
    msg = "--steps applies to --mode new-packing, not --mode host"
    assert msg in _text("docs/benchmarks.md") and msg in r["stderr"]


# ---------------------------------------------------------------------------------------------
# 3. printed output: the README's explain table, the masks' pictures


def _table(text):
    rows = [ln.split() for ln in text.strip().split("\n")]
    return [" ".join(r) for r in rows]


def _readme_table():
    t = block("README.md", "", "requested: auto   (variant class: documents)")
    return _table(t)


def _env_rows(doc_rows):
    """The doc's rows with those this machine must print differently (packages installed here
    that the README's machine lacked) replaced by what the code says for them here."""
    import importlib.util

    out = []
    for r in doc_rows:
        if r.startswith("kernels_flash ") and importlib.util.find_spec("kernels") is not None:
            r = "kernels_flash unavailable needs a CUDA GPU (torch.cuda.is_available() is False)"
        out.append(r)
    return out


def test_readme_explain_table_matches_what_the_code_prints_on_cpu(runners):
    """README.md:29-41, the call the table's first line describes (q, k, v of (1, 2, 8, 64),
    documents([3, 5]) & causal()) after one call with those values. The kernels_flash row reads
    "needs a CUDA GPU" where the HF ``kernels`` package is installed (it is here)."""
    out = _ok(_job(runners, "py", "readme_explain")).split("=====")
    assert _table(out[1]) == _env_rows(_readme_table())
    # README.md:44: "explain(..., full=False) stops at the winner, as attention does (the rest
    # are listed "not checked")"
    rows = _table(out[2])[3:-1]
    assert rows[0].startswith("sdpa chosen") and all(" not checked " in r for r in rows[1:]) and len(rows) == 8


def test_readme_explain_table_on_a_first_call(runners):
    """README.md:33 (was a code defect, fixed in resolve.py): in a fresh process the README's call printed
    ``sdpa chosen ranked first among the backends that can serve it (first sight of these term
    values: ranked by per-call cost, lowering included)``. ``resolve.py`` appends that note
    whenever the values are new, but ``ranking.FIRST_SIGHT`` has no CPU rows (and no CUDA row
    for a forward documents call), so the ranking used is the regular one: the note is not true
    there, and the README's table (no note) is what only a second call prints."""
    out = _ok(_job(runners, "py", "readme_explain")).split("=====")[0]
    assert _table(out) == _env_rows(_readme_table())


def _visible(Sq, Sk, mask):
    import torch

    import anyattn as aa

    q = torch.randn(1, 1, Sq, 8, dtype=torch.float64)
    k = v = torch.randn(1, 1, Sk, 8, dtype=torch.float64)
    out, w = aa.attention_with_weights(q, k, v, mask=mask)
    rows = ["".join("x" if w[0, 0, i, j] > 0 else "." for j in range(Sk)) for i in range(Sq)]
    return rows, out[0, 0].abs().sum(-1)


def test_the_mask_pictures_are_what_the_masks_compute():
    """README.md:70 (causal with Sq != Sk), docs/flash.md:244 (windows), docs/serving.md:52
    (documents with kv= layouts)."""
    import anyattn as aa

    assert "x x x x ." in _text("README.md") and "queries 0..2 see no key (output 0)" in _text("README.md")
    assert _visible(2, 5, aa.causal())[0] == ["xxxx.", "xxxxx"]
    rows, norm = _visible(5, 2, aa.causal())
    assert rows[:3] == ["..", "..", ".."] and norm[:3].abs().max() == 0
    assert _visible(6, 6, aa.sliding_window(2))[0][4] == "..xxx."  # query 4 sees keys 2..4
    assert _visible(6, 6, aa.sliding_window(1, 1))[0][3] == "..xxx."  # query 3 sees keys 2..4
    rows, _ = _visible(6, 12, aa.documents([3, 1, 2], kv=[6, 4, 2]) & aa.causal())
    assert rows == ["xxxx........", "xxxxx.......", "xxxxxx......", "......xxxx..", "..........x.", "..........xx"]
    # README.md:91: canonical form echoed by traces and errors
    import torch

    q = torch.randn(1, 2, 8, 16)
    assert (
        "mask=sliding_window(1024)"
        in str(aa.explain(q, q, q, mask=aa.causal() & aa.sliding_window(1024))).split("\n")[0]
    )


def test_cpu_catalogue_reasons_are_what_explain_says():
    """docs/reliability.md's CPU table (generated by tests/test_reliability.py): the refusal and
    unavailability reasons of a few rows, re-asked from ``explain`` here (the table truncates
    reasons at 70 characters)."""
    import torch

    import anyattn as aa

    t = _text("docs/reliability.md").split("### cpu (torch", 1)[1]

    def cell(item, backend):
        row = next(r for r in t.split("\n") if r.startswith(f"| {item} |"))
        head = next(r for r in t.split("\n") if r.startswith("| item |"))
        cols = [c.strip() for c in head.strip("|").split("|")]
        return [c.strip() for c in row.strip("|").split("|")][cols.index(backend)]

    def reason(q, backend):
        r = next(r for r in aa.explain(q, q, q).rows if r.backend == backend)
        return {"rejected": "refused", "unavailable": "unavailable"}.get(r.status, r.status) + ": " + r.reason

    assert reason(torch.randn(1, 2, 16, 32, dtype=torch.float64), "flex") == cell("float64 inputs", "flex")
    assert reason(torch.randn(1, 2, 16, 8), "flex") == cell("head_dim 8 (< 16)", "flex")
    assert reason(torch.randn(1, 2, 16, 32), "cudnn").startswith(cell("CPU tensors", "cudnn"))
    assert reason(torch.randn(1, 2, 16, 32), "flash_torch").startswith(cell("CPU tensors", "flash_torch"))
    assert reason(torch.randn(1, 2, 16, 32), "flash") == cell("CPU tensors", "flash")


# ---------------------------------------------------------------------------------------------
# 2. names: tests, paths, links, symbols


# test names quoted from another project (FastPLMs' parity tests), not this one
EXTERNAL_TESTS = {
    "test_the_attention_masks_match_the_official_block_masks",
    "test_the_official_state_loads_key_for_key",
}


def test_every_quoted_test_name_exists():
    """Every ``test_...`` the docs quote is a test function here (``name...`` is a prefix;
    ``tests/f.py::name`` must be in that file). Names followed by .py are files (checked below)."""
    sources = {p.name: p.read_text() for p in (REPO / "tests").glob("*.py")}
    every = "\n".join(sources.values())
    missing, n = [], 0
    for doc in DOCS:
        t = _text(doc)
        for m in re.finditer(r"(?<![\w/.])(?:tests/([\w]+\.py)::)?(test_\w+)(\.\.\.)?", t):
            f, name, dots = m.groups()
            if t[m.end() : m.end() + 3] == ".py" or name in EXTERNAL_TESTS:
                continue
            if (
                not dots
                and re.fullmatch(r"test_cuda_\w+", name)
                and (REPO / "tests" / f"{name}.py").exists()
                and f"def {name}(" not in every
            ):
                continue  # a test file named without .py (docs/fa4.md: "test_cuda_train, and test_cuda_core / test_cuda_hf")
            n += 1
            src = sources.get(f, "") if f else every
            ok = (f"def {name}" in src) if dots else re.search(rf"def {name}\(", src) is not None
            if not ok:
                missing.append(f"{doc}:{t[: m.start()].count(chr(10)) + 1} {name}")
    assert n > 100 and not missing, missing


# paths the docs quote that are not in this repository on purpose: other projects' files
# (DPLM's byprot sources, FastPLMs' goldens) and output directories of commands (--out targets)
NOT_OURS = re.compile(r"^(src/byprot/|tests/goldens/|benchmarks/results/serving_h100_|anyattn/(paged|contiguous|raw))")


def _quoted_paths():
    out = {}
    for doc in DOCS:
        t = _text(doc)
        for m in re.finditer(
            r"(?<![\w/.-])((?:\.\./)?(?:benchmarks|tests|src|examples|anyattn|\.ci|docs)/[\w./{},*-]*[\w/}])", t
        ):
            p = m.group(1)
            p = p.removeprefix("../")
            if NOT_OURS.match(p):
                continue
            out.setdefault(p, []).append(f"{doc}:{t[: m.start()].count(chr(10)) + 1}")
    return out


def _exists(p: str) -> bool:
    if p.startswith("anyattn/"):
        p = "src/" + p
    m = re.search(r"\{([^}]*)\}", p)
    if m:
        return all(_exists(p[: m.start()] + alt + p[m.end() :]) for alt in m.group(1).split(","))
    return bool(glob.glob(str(REPO / p)))


def test_every_quoted_repository_path_exists():
    paths = _quoted_paths()
    missing = {p: locs for p, locs in paths.items() if not _exists(p)}
    assert len(paths) > 80 and not missing, missing


def test_docs_cite_no_design_notes_outside_the_repository():
    """Ten places cited DESIGN.md, which is not in this repository (fixed: they name the tolerance
    rule of anyattn.testing or say what they measured)."""
    cites = [f"{d}:{i + 1}" for d in DOCS for i, ln in enumerate(_text(d).split("\n")) if "DESIGN.md" in ln]
    assert not cites, cites


def _slug(h):
    h = re.sub(r"[^\w\- ]", "", h.strip().lower())
    return h.replace(" ", "-")


def test_every_markdown_link_and_anchor_resolves():
    anchors = {}
    for doc in DOCS:
        body = re.sub(r"```.*?```", "", _text(doc), flags=re.DOTALL)
        anchors[os.path.normpath(doc)] = {
            _slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", body, flags=re.MULTILINE)
        }
    bad, n = [], 0
    for doc in DOCS:
        t = _text(doc)
        for m in re.finditer(r"\]\(([^)\s]+)\)", t):
            tgt = m.group(1)
            if tgt.startswith("http"):
                continue
            n += 1
            path, _, anc = tgt.partition("#")
            full = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else os.path.normpath(doc)
            if not (REPO / full).exists() or (anc and full.endswith(".md") and anc not in anchors.get(full, set())):
                bad.append(f"{doc}:{t[: m.start()].count(chr(10)) + 1} {tgt}")
    assert n > 30 and not bad, bad


def _resolve(name: str):
    """The object a dotted ``anyattn``/``aa``/``am`` name denotes, through imports and attributes
    as a user would write them; raises AttributeError / ImportError."""
    parts = name.split(".")
    parts = {"aa": ["anyattn"], "am": ["anyattn", "models"]}.get(parts[0], [parts[0]]) + parts[1:]
    obj = importlib.import_module(parts[0])
    for i, p in enumerate(parts[1:], start=1):
        if hasattr(obj, p):
            obj = getattr(obj, p)
        else:  # a submodule not imported yet: import it, then read it as an attribute as Python does
            importlib.import_module(".".join(parts[: i + 1]))
            obj = getattr(obj, p)
    return obj


KNOWN_BAD_SYMBOLS = {"anyattn.models._esmc_ankh_batch.batch_structure", "anyattn.backends.Facts"}


def _doc_symbols():
    """{dotted name: places} and {(module, name): places} of ``from module import name`` lines."""
    dotted, froms = {}, {}
    for doc in DOCS:
        t = _text(doc)
        for m in re.finditer(r"(?<![\w./-])((?:anyattn|aa|am)(?:\.[A-Za-z_]\w*)+)(?![\w/-])", t):
            dotted.setdefault(m.group(1), []).append(f"{doc}:{t[: m.start()].count(chr(10)) + 1}")
        for m in re.finditer(r"from (anyattn[\w.]*) import ([\w, ]+)", t):
            for n in m.group(2).split(","):
                froms.setdefault((m.group(1), n.strip()), []).append(f"{doc}:{t[: m.start()].count(chr(10)) + 1}")
    return dotted, froms


def test_every_anyattn_symbol_the_docs_name_resolves():
    """``anyattn.x.y``, ``aa.x``, ``am.x`` (attribute access after importing what is needed, as
    a user writes it) and ``from anyattn... import a, b`` (as Python resolves it)."""
    bad = {}
    dotted, froms = _doc_symbols()
    for name, locs in dotted.items():
        if name in KNOWN_BAD_SYMBOLS:
            continue
        try:
            _resolve(name)
        except Exception as e:  # noqa: BLE001 - reported
            bad[name] = (locs[:3], f"{type(e).__name__}: {e}")
    for (mod, name), locs in froms.items():
        try:
            m = importlib.import_module(mod)
            if not hasattr(m, name):
                importlib.import_module(f"{mod}.{name}")
        except Exception as e:  # noqa: BLE001 - reported
            bad[f"from {mod} import {name}"] = (locs[:3], f"{type(e).__name__}: {e}")
    assert len(dotted) > 50 and len(froms) > 20 and not bad, bad


def test_esmc_md_names_the_shared_packing_function():
    """docs/esmc.md named anyattn.models._esmc_ankh_batch.batch_structure, which no longer exists
    (fixed: the shared policy, anyattn.packing.plan_batch)."""
    assert "_esmc_ankh_batch.batch_structure" not in _text("docs/esmc.md")
    assert "anyattn.packing.plan_batch" in _text("docs/esmc.md")
    _resolve("anyattn.packing.plan_batch")


def test_readme_names_facts_the_way_it_imports():
    """README.md wrote ``anyattn.backends.Facts``, which the function ``anyattn.backends()``
    shadows as an attribute path (fixed in the README: ``from anyattn.backends import Facts``)."""
    assert "`anyattn.backends.Facts`" not in _text("README.md")
    assert "from anyattn.backends import Facts" in _text("README.md")
    from anyattn.backends import Facts  # noqa: F401


def test_flash_md_names_the_plan_cache_that_exists():
    """docs/flash.md named flash_torch._PLANS (fixed: the backend's packings LRU)."""
    assert "flash_torch._PLANS" not in _text("docs/flash.md")
    from anyattn.backends import REGISTRY

    assert hasattr(REGISTRY["flash_torch"], "packings")


def test_dotted_names_of_classes_and_modules_the_docs_use():
    """Names written relative to a module or class (not caught by the anyattn.* scan)."""
    import anyattn as aa
    import anyattn.layout
    import anyattn.models as am
    from anyattn.backends import REGISTRY, flash
    from anyattn.backends import flash_torch as ft
    from anyattn.backends.flex import FlexBackend, FlexFallbackError  # noqa: F401
    from anyattn.backends.flex_blocks import kernel_guarantees  # noqa: F401
    from anyattn.models import esmc_checkpoints
    from anyattn.models.decoder import apply_fsdp, apply_tensor_parallel, compile_blocks, prepare_context_parallel  # noqa: F401
    from anyattn.models.dplm import DPLM_FAMILY, is_dplm2_config, is_dplm_config, map_dplm_keys  # noqa: F401
    from anyattn.models.e1 import E1_DEFAULT_VOCAB, E1Config, is_e1_config  # noqa: F401
    from anyattn.models.e1_tokenizer import is_e1_config as _e1  # noqa: F401
    from anyattn.models.esm2 import build_esm2, load_hf_state_dict, register_auto  # noqa: F401
    from anyattn.models.hub import Family, register_family, resolve_dtype  # noqa: F401
    from anyattn.spec import Documents, Padding, Sink
    from anyattn.spec.base import to_device  # noqa: F401

    for n in ("map_esmc_keys", "build_esmc", "load_esmc"):  # "every name is also reachable as anyattn.models.<name>"
        assert getattr(am, n) is getattr(esmc_checkpoints, n)
    for f in (flash.plan, flash.causal_and_window, flash.lse_to_BHS, Sink.combine, Documents.check, Padding.check,
              FlexBackend.triton_beats_flash, E1Config.from_original, aa.SeqInfo.varlen):  # fmt: skip
        assert callable(f)
    assert ft.PAGE_MULTIPLE == 256 and isinstance(anyattn.layout.PINNED_COPIES, bool)
    assert (
        all(hasattr(REGISTRY["flex"], n) for n in ("lowering", "fast_tanh", "kernel_guarantees"))
        and "flash_calls" in REGISTRY["flex"].stats
    )
    assert "kernel_guarantees" in inspect.signature(FlexBackend).parameters
    assert [f.name for f in dataclasses.fields(Family)] == ["name", "detect", "loader"]
    assert inspect.signature(register_family).parameters["before"].default == "esm2"
    for n in ("name", "facts", "available", "supports", "run", "clear"):  # README.md:159, the backend protocol
        assert all(hasattr(b, n) for b in REGISTRY.values()), n
    assert "packed_documents" in {f.name for f in dataclasses.fields(REGISTRY["flex"].facts)}
    for n in ("from_lengths", "from_padding_mask", "from_position_ids", "from_cu_seqlens"):
        assert callable(getattr(aa.SeqInfo, n))
    assert aa.AttentionOutput._fields == ("out", "lse")
    import anyattn.hf as h

    assert callable(aa.backends) and all(hasattr(b, "reason") for b in aa.backends())  # docs/flash.md:4
    assert "how" in h.HFMask.__annotations__


# ---------------------------------------------------------------------------------------------
# command lines: every one the docs write parses; options of the scripts they run exist


def _leaf(parser, argv):
    """The sub-parser ``argv`` reaches, and the rest of argv."""
    import argparse

    p = parser
    while True:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or not argv or argv[0] not in subs[0].choices:
            return p, argv
        p, argv = subs[0].choices[argv[0]], argv[1:]


def _doc_commands():
    """(where, text, concrete) of every ``anyattn`` / ``python -m anyattn`` command line: in code
    blocks (fenced or indented: ``concrete``, parsed whole) and in inline code (mentions: their
    sub-command and options are checked)."""
    out = []
    for doc in DOCS:
        t = _text(doc)
        prose = re.sub(
            r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), t, flags=re.DOTALL
        )  # inline code outside blocks
        spans = [(prose[: m.start()].count("\n") + 1, m.group(1), False) for m in re.finditer(r"`([^`]+)`", prose)]
        spans += [(line, code, True) for line, lang, code in fenced(doc) if lang in ("", "bash")]
        spans += [(t[: m.start()].count("\n") + 1, re.sub(r"\n {4,}", "\n", m.group(1)), True)
                  for m in re.finditer(r"(?m)^ {4}(\S(?:.*\\\n {4,}\S)*.*)", t)]  # fmt: skip
        for line_no, s, concrete in spans:
            for line in s.replace("\\\n", " ").split("\n"):
                line = re.split(r"\s#\s", line)[0]
                m = re.search(r"(?:^|\s)((?:python3? -m )?anyattn (?:doctor|bench|embed|--debug)\b.*)", line)
                if m:
                    out.append((f"{doc}:{line_no}", m.group(1).strip(), concrete))
    return out


def _parse(argv):
    from anyattn.cli import build_parser

    parser = build_parser()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            args, extra = parser.parse_known_args(argv)
        except SystemExit as e:
            return f"exit {e.code}: {err.getvalue().strip()[-300:]}"
    if extra and not getattr(args, "_takes_any", False):
        return f"unrecognized {extra}"
    if getattr(args, "command", None) is None or (args.command == "bench" and getattr(args, "func", None) is None):
        return "no command"
    return None


KNOWN_BAD_COMMANDS = {"anyattn bench families"}


def test_every_documented_command_line_parses_with_the_real_parser():
    """Lines of code blocks are parsed whole (placeholders DIR, $OUT filled); synopsis lines
    (``[...]``, ``...``, ``a|b``) and inline mentions have their sub-command and each
    ``--option`` checked against the real parser."""
    import argparse

    from anyattn.cli import build_parser

    parser = build_parser()
    bad, n = [], 0
    for where, cmd, concrete in _doc_commands():
        if cmd in KNOWN_BAD_COMMANDS:
            continue
        n += 1
        text = cmd.replace("$OUT", "/tmp/o")
        argv = shlex.split(text) if '"' in text else shlex.split(text.replace("|", " "))
        while argv and argv[0] in ("python", "python3", "-m", "anyattn"):
            argv = argv[1:]
        synopsis = any(c in cmd for c in "[]") or "..." in cmd or "|" in cmd.replace('"sdpa|eager"', "")
        if synopsis or not concrete:
            leaf, rest = _leaf(parser, [a for a in argv if not a.startswith("[")])
            subs = [a for a in leaf._actions if isinstance(a, argparse._SubParsersAction)]
            if subs and rest and not rest[0].startswith("-"):
                bad.append(f"{where}: {cmd}: {rest[0]!r} is not a sub-command of '{leaf.prog}'")
            opts = {o for a in leaf._actions for o in a.option_strings} | {"--debug"}
            bad += [
                f"{where}: {cmd}: {o} is not an option of '{leaf.prog}'"
                for o in re.findall(r"(--[a-z][\w-]*)", cmd)
                if o not in opts
            ]
            continue
        argv = [{"DIR": "/tmp/o"}.get(a, a) for a in argv]
        why = _parse(argv)
        if why:
            bad.append(f"{where}: {cmd}: {why}")
    assert n > 40 and not bad, bad


def test_no_doc_names_an_anyattn_bench_families_command():
    """docs/models.md and docs/embed.md named `anyattn bench families`, which is not a command
    (fixed: the families run as `anyattn bench model --family ...` stages of the device script)."""
    where = [w for w, c, _ in _doc_commands() if c in KNOWN_BAD_COMMANDS]
    assert not where, where
    assert "invalid choice: 'families'" in _parse(["bench", "families"])  # still not a command


def test_every_option_of_a_documented_script_invocation_exists():
    """``benchmarks/*.py``, ``examples/*.py`` and ``python -m anyattn.bench.embed_e2e``
    invocations in code blocks: each ``--option`` after the script is an argparse option of it
    (read from its source: importing each would pull in torch)."""
    bad, n = [], 0
    for doc in DOCS:
        t = _text(doc)
        blocks = [c for _, lang, c in fenced(doc) if lang in ("", "bash")]
        blocks += [m.group(1) for m in re.finditer(r"(?m)^ {4}(\S(?:.*\\\n {4,}\S)*.*)", t)]
        blocks += [m.group(1) for m in re.finditer(r"`([^`]*python -m anyattn\.bench\.\w+[^`]*)`", t)]
        for code in blocks:
            for line in code.replace("\\\n", " ").split("\n"):
                line = re.split(r"\s#\s", line)[0]
                m = re.search(r"((?:benchmarks|examples)/\w+\.py|-m anyattn\.bench\.\w+)(.*)", line)
                if not m:
                    continue
                path = m.group(1)
                path = "src/" + path[3:].replace(".", "/") + ".py" if path.startswith("-m ") else path
                src = (REPO / path).read_text()
                for opt in re.findall(r"(?<![\w-])(--[\w-]+)", m.group(2)):
                    n += 1
                    if f'"{opt}"' not in src:
                        bad.append(f"{doc}: {path} {opt}")
    assert n > 20 and not bad, bad


# ---------------------------------------------------------------------------------------------
# signatures written as code, documented defaults and presets


def _doc_signature(code: str):
    """Parameters of a ``out = model(...)`` line: [(name, default text or None, keyword_only)]."""
    body = re.search(r"\((.*)\)", code.replace("\n", " "), flags=re.DOTALL).group(1)
    out, kw = [], False
    for part in [p.strip() for p in body.split(",") if p.strip()]:
        if part == "*":
            kw = True
            continue
        name, _, default = part.partition("=")
        out.append((name.strip(), default.strip() or None, kw))
    return out


def test_signature_blocks_match_the_code():
    """docs/models.md:98, docs/esmc.md:133, docs/ankh.md:129 (forward), README.md:53
    (attention), docs/models.md:23 (load), and other signatures the docs write inline."""
    import anyattn as aa
    import anyattn.models as am
    from anyattn.models import AnkhModel, ESM2ForMaskedLM, ESMCForMaskedLM, ProteinTokenizer
    from anyattn.models.e1 import load_e1
    from anyattn.models.esm2 import ESM2Model

    def check(sig, documented):
        ps = sig.parameters
        for name, default, kw in documented:
            assert name in ps, (name, sig)
            p = ps[name]
            if default is not None:
                assert repr(p.default) == default.replace('"', "'") or str(p.default) == default, (
                    name,
                    p.default,
                    default,
                )
            if kw:
                assert p.kind == inspect.Parameter.KEYWORD_ONLY, (name, sig)

    for doc, cls in (
        ("docs/models.md", ESM2ForMaskedLM),
        ("docs/esmc.md", ESMCForMaskedLM),
        ("docs/ankh.md", AnkhModel),
    ):
        check(
            inspect.signature(cls.forward),
            _doc_signature(block(doc, "python", "out = model(input_ids, attention_mask=None")),
        )
    readme = re.search(r"`(attention\(q, k, v, \*, [^`]*)`", _text("README.md")).group(1)
    check(inspect.signature(aa.attention), _doc_signature(readme))
    models = re.search(r"`(load\(path_or_repo, \*, [^`]*)`", _text("docs/models.md")).group(1)
    check(inspect.signature(am.load), _doc_signature(models))
    check(inspect.signature(ESM2Model.compile_layers), [("fuse_qkv", "False", True)])
    assert "fuse_qkv" not in inspect.signature(ESMCForMaskedLM.compile_layers).parameters
    check(inspect.signature(aa.sliding_window), [("left", None, False), ("right", "0", False)])
    check(
        inspect.signature(aa.relative_bias),
        [
            ("table", None, False),
            ("num_buckets", None, False),
            ("max_distance", None, False),
            ("bidirectional", "True", False),
        ],
    )
    check(inspect.signature(aa.explain), [("full", "True", True)])
    check(inspect.signature(ProteinTokenizer.encode), [("unknown", "'error'", True)])
    check(inspect.signature(ProteinTokenizer.decode), [("skip_special_tokens", "True", True)])
    check(inspect.signature(load_e1), [("attn_backend", None, True), ("dtype", None, True), ("device", None, True)])
    assert ESM2ForMaskedLM.supports_gradient_checkpointing is False


def test_documented_cli_and_benchmark_defaults():
    """docs/models.md:257-274, docs/benchmarks.md:35-54/173-176/240-243, docs/embed.md:134-151."""
    from anyattn.bench import churn, hostcall, kernels
    from anyattn.cli import build_parser
    from anyattn.embed.store import _HEADER_BUDGET, DEFAULT_SHARD_SIZE, parse_size

    p = build_parser()
    m = p.parse_args(["bench", "model"])
    assert (m.max_tokens, m.num_seqs, m.median, m.sigma, m.min_len, m.max_len, m.repeats) == (
        16384,
        2048,
        320,
        0.58,
        30,
        1022,
        3,
    )
    assert m.rows == "plain,compiled,uncompiled,port" and m.family == "esm2"
    h200 = kernels.preset("h200", "cpu")
    assert (h200.dtypes, h200.shapes, h200.heads, h200.head_dim, h200.window, h200.docs, h200.cap, h200.budget_s) == (
        ("bf16",),
        ((8, 2048),),
        16,
        128,
        1024,
        16,
        50.0,
        420.0,
    )
    assert {v: (b, s) for v, b, s in h200.variant_shapes}["documents"] == (1, 16384) and h200.verify_max_elems == 2**25
    assert 2**25 // (8 * 16 * 2048) == 128  # R for the H200 preset
    q = kernels.preset("quick", "cpu")
    assert (q.shapes, q.heads, q.head_dim, q.flex_cases) == (((2, 64),), 2, 32, 1)
    h = hostcall.HostOptions(device="cpu")
    assert (h.B, h.H, h.S, h.D, h.calls, h.rounds) == (1, 1, 64, 64, 1000, 7)
    o = churn.Options(device="cpu")
    assert (o.pack_S, o.docs, o.pad_B, o.pad_S, o.heads, o.head_dim, o.check_steps, o.cpu_flex) == (
        16384,
        (8, 24),
        8,
        2048,
        16,
        128,
        2,
        False,
    )
    e = p.parse_args(["embed", "x", "--model", "m", "--out", "o"])
    assert (e.max_tokens, e.dtype, e.long_policy, e.unknown, e.pooling) == (32768, "auto", "error", "error", ["mean"])
    assert DEFAULT_SHARD_SIZE == 2 * 1024**3 and _HEADER_BUDGET == 50 * 1024**2
    assert (
        parse_size("2GB") == 2 * 10**9
        and parse_size("1.5GiB") == int(1.5 * 1024**3)
        and parse_size("500MB") == 500 * 10**6
    )


def test_documented_model_presets_and_config_defaults():
    """docs/models.md:70-72, docs/esmc.md:66-78, docs/ankh.md:80-91, docs/training.md:368-370,
    docs/e1.md:179/264, docs/models.md:203 (alphabet), docs/esmc.md:63 (ids 0..32, '|' at 31)."""
    import torch

    from anyattn.models import AnkhConfig, ESM2Config, ESMCConfig, ProteinTokenizer, esmc_tokenizer
    from anyattn.models.decoder import DECODER_PRESETS, Decoder, DecoderConfig
    from anyattn.models.e1 import E1_DEFAULT_VOCAB, E1Config

    shapes = {"esm2_t6_8M": (6, 320, 20), "esm2_t12_35M": (12, 480, 20), "esm2_t30_150M": (30, 640, 20),
              "esm2_t33_650M": (33, 1280, 20), "esm2_t36_3B": (36, 2560, 40), "esm2_t48_15B": (48, 5120, 40)}  # fmt: skip
    for n, (L, C, H) in shapes.items():
        c = ESM2Config.from_name(n)
        assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (L, C, H, 4 * C), n
    c = ESM2Config()
    assert (c.model_type, c.attn_backend) == ("anyattn_esm2", "auto")
    for n, want in {
        "esmc_300m": (30, 960, 15, 2560),
        "esmc_600m": (36, 1152, 18, 3072),
        "esmc_6b": (80, 2560, 40, 6912),
    }.items():
        c = ESMCConfig.from_name(n)
        assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == want, n
    c = ESMCConfig()
    assert (c.vocab_size, c.layer_norm_eps, c.rope_theta, c.pad_token_id, c.mask_token_id, c.scale_residue) == (
        64,
        1e-5,
        10000,
        1,
        32,
        True,
    )
    assert (c.attn_backend, c.pack_padded, c.compile_layers, c.model_type, len(c.vocab_list)) == (
        "auto",
        "auto",
        "auto",
        "anyattn_esmc",
        33,
    )
    t = esmc_tokenizer()
    assert len(t.vocab) == 33 and t.vocab[31] == "|"
    for n, want in {"ankh_base": (48, 768, 12, 64, 3072, "gelu_new"), "ankh_large": (48, 1536, 16, 64, 3840, "gelu_new"),
                    "ankh2_large": (48, 1536, 16, 64, 3840, "silu")}.items():  # fmt: skip
        c = AnkhConfig.from_name(n)
        assert (c.num_layers, c.d_model, c.num_heads, c.d_kv, c.d_ff, c.dense_act_fn) == want, n
        assert (c.relative_attention_num_buckets, c.relative_attention_max_distance, c.layer_norm_epsilon, c.vocab_size,
                c.pad_token_id, c.eos_token_id, c.dropout_rate, c.model_type) == (64, 128, 1e-6, 144, 0, 1, 0.0, "anyattn_ankh")  # fmt: skip
    assert E1Config().model_type == "anyattn_e1" and len(E1_DEFAULT_VOCAB) == 34
    assert [E1_DEFAULT_VOCAB[t] for t in ("<pad>", "<bos>", "<eos>")] == [0, 1, 2]
    assert set(DECODER_PRESETS) == {"tiny", "125m", "1b"}
    params = {}
    for n in ("125m", "1b"):
        cfg = DecoderConfig.from_name(n)
        with torch.device("meta"):
            params[n] = sum(p.numel() for p in Decoder(cfg).parameters())
        assert cfg.dim // cfg.n_heads == 128
    c = DecoderConfig.from_name("125m")
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads) == (768, 12, 6, 2) and round(params["125m"] / 1e9, 2) == 0.12
    c = DecoderConfig.from_name("1b")
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim, c.vocab_size) == (2048, 16, 16, 4, 8192, 32000)
    assert round(params["1b"] / 1e9, 1) == 1.1
    tok = ProteinTokenizer.esm()
    assert (
        " ".join(tok.vocab)
        == "<cls> <pad> <eos> <unk> L A G V S E R T I D P K Q N F Y M H W C X B U Z O . - <null_1> <mask>"
    )
    import json as _json

    keys = _json.loads((REPO / "tests" / "fixtures" / "esmc_300m_2024_12_v0_keys.json").read_text())["keys"]
    assert len(keys) == 308  # docs/esmc.md:194 "all 308 tensors"


def test_documented_ranking_and_constants():
    """README.md:145-148 (CPU: sdpa, eager, flex), README.md:393 / docs/reliability.md:7 (the
    tolerance rule), docs/serving.md:142/249-252, docs/dynamic-path.md:35, docs/hf.md:27-44."""
    import anyattn.hf as H
    import anyattn.ranking as R
    import anyattn.testing as T
    from anyattn.backends.flex import UNFUSED_MAX_SCORES, UNFUSED_MAX_SQ
    from anyattn.spec.kv_step import kv_bucket

    assert R.RANKING["cpu"] == {"*": ("sdpa", "eager", "flex")}
    assert "padding+grad+runs" in R.FIRST_SIGHT["cuda"] and R.GATHER_KEYS == 2**20
    assert {
        "decode",
        "decode+paged",
        "decode+paged+long",
        "documents+paged",
        "padding+paged",
        "masked+paged",
        "padding+d64",
    } <= set(R.RANKING["cuda"])
    assert R.DECODE_MAX_SQ == 16 == UNFUSED_MAX_SQ and UNFUSED_MAX_SCORES == 2**26
    src = inspect.getsource(T)
    assert (
        "2 * err(eager in the same dtype vs oracle) + 1e-5" in src
        and "3 * err(eager in the same dtype vs oracle) + 1e-4" in src
    )
    assert all(T.__dict__.get(n) for n in ("generate_qkv", "compare_to_oracle", "oracle", "flex_lowering"))
    assert [kv_bucket(n) for n in (100, 129, 300, 1000)] == [112, 160, 320, 1024]  # next of 4, 5, 6, 7 x 2^k
    names = {"auto": "anyattn", "eager": "anyattn:eager", "sdpa": "anyattn:sdp", "cudnn": "anyattn:cudnn", "flex": "anyattn:flex",
             "flash_torch": "anyattn:fa_torch", "flash": "anyattn:fa", "kernels_flash": "anyattn:kernels_fa"}  # fmt: skip
    assert {b: H.hf_name(b) for b in names} == names
    with pytest.raises(Exception, match="aliases"):
        H.register("anyattn:flash_torch")


def test_documented_extras_exist_in_pyproject():
    """README.md:397-402 and every ``anyattn[...]`` the docs name."""
    py = (REPO / "pyproject.toml").read_text()
    extras = set(
        re.findall(
            r"(?m)^(\w+) = \[", py.split("[project.optional-dependencies]", 1)[1].split("[project.scripts]", 1)[0]
        )
    )
    named = set()
    for doc in DOCS:
        for m in re.finditer(r"(?:anyattn|\.)\[([a-z][\w,]*)\]", _text(doc)):  # not the row name anyattn[B]
            named |= set(m.group(1).split(","))
    assert named and named <= extras, named - extras
    assert 'anyattn = "anyattn.cli:main"' in py and (REPO / ".ci" / "run").exists()
    for marker in ("cuda", "multigpu", "slow"):  # README.md:413, docs/hf.md:138 (-m "not slow"), docs/training.md:527
        assert f'"{marker}: ' in py, marker


def test_models_md_lists_every_registered_family_in_order():
    """docs/models.md listed e1, dplm, esm2 of the five registered families (fixed)."""
    import anyattn.models as am

    doc = _text("docs/models.md").split("Registered, in this order", 1)[1].split("Other families", 1)[0]
    listed = re.findall(r"^\s+\* `(\w+)`:", doc, flags=re.MULTILINE)
    assert [f.name for f in am.FAMILIES] == listed
    assert "once `DPLM_FAMILY` is registered" not in _text("docs/dplm.md")


def test_training_md_quotes_the_config_errors_the_code_prints():
    """docs/training.md:386-388 quoted stale messages (fixed in the docs). The doc said
    ``AttentionConfig(..., dropout=0.1, backend="flex")`` raises "dropout: expected 0.0 with
    backend='flex' (no dropout in flex); use sdpa, cudnn or eager, got 0.1"; the code says "...
    (no attention dropout there); use one of ['eager', 'sdpa', 'cudnn', 'flash', 'kernels_flash'],
    got 0.1". For ``logit_clip`` with backend="sdpa" the doc quotes "backend: expected flex or
    eager ..."; the code says "backend: expected one of ['eager', 'flex'] (the per-head logit clip
    is a score_fn) or 'auto', got 'sdpa'". Both still refuse, naming the field."""
    from anyattn.nn import AttentionConfig

    t = re.sub(r"\s+", " ", _text("docs/training.md"))
    quoted = re.search(r"raises `(dropout: [^`]*)`", t).group(1)
    with pytest.raises(Exception) as e1:
        AttentionConfig(dim=64, n_heads=4, dropout=0.1, backend="flex")
    quoted2 = re.search(r"raises `(backend: expected [^`]*)`", t).group(1)
    with pytest.raises(Exception) as e2:
        AttentionConfig(dim=64, n_heads=4, logit_clip=5.0, backend="sdpa")
    assert (str(e1.value), str(e2.value)) == (quoted, quoted2)
