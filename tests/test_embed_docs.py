"""The examples of docs/embed.md run as written (CPU): the end-to-end example, then every block
marked ``# runs as is`` (Python and the command line), in order, in one directory standing in for
/tmp; their printed results are the ones the comments show."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from .test_embed_support import cli_env  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs" / "embed.md"


def _blocks():
    text = DOC.read_text()
    first = text.split("A runnable end-to-end example", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    marked = re.findall(r"```(python|bash)\n# runs as is\n(.*?)```", text, flags=re.DOTALL)
    return [("python", first), *marked]


def test_the_marked_examples_run_and_print_what_their_comments_say(tmp_path):
    blocks = _blocks()
    assert [k for k, _ in blocks].count("python") >= 3 and ("bash" in [k for k, _ in blocks])
    outs = []
    for kind, code in blocks:
        code = code.replace("/tmp/", f"{tmp_path}/")
        if kind == "python":
            p = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
        else:
            code = re.sub(r"^anyattn ", f"{sys.executable} -m anyattn ", code, flags=re.MULTILINE)
            p = subprocess.run(["bash", "-ec", code], env=cli_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert p.returncode == 0, (kind, code, p.stderr[-3000:])
        outs.append(p.stdout)
    assert "(32,)" in outs[0]
    assert "['p1', 'p2', 'p1', 'p3'] ['p1', 'p2', 'p3']" in outs[1] and "(4, 2, 96) ['layer', 'column']" in outs[1]
    assert "Column(layer=0, pooler='mean', start=0, stop=32)" in outs[1]
    assert "['res-00001-of-00009.safetensors', 'res-00002-of-00009.safetensors']" in outs[2] and "(7, 32)" in outs[2]
    assert os.path.exists(tmp_path / "cli.npz") and "records" in outs[3]


def test_every_test_the_cli_and_store_catalogue_names_exists():
    """docs/reliability.md's CLI / embedding-store catalogue points at tests by name: each one
    exists (a name ending in '...' is a prefix)."""
    text = (DOC.parent / "reliability.md").read_text().split("## The CLI and the embedding store", 1)[1]
    sources = "\n".join(p.read_text() for p in Path(__file__).resolve().parent.glob("test_*.py"))
    names = re.findall(r"(?<![/\w])(test_\w+)(?!\w)(\.\.\.)?(?!\.py)", text)  # not the file names
    assert len(names) > 40
    missing = [n + d for n, d in names if (f"def {n}" not in sources if d else not re.search(rf"def {n}\(", sources))]
    assert not missing, missing
