"""Render the reliability catalogue (JSON written by tests/conftest.py) as a markdown table.

    ANYATTN_CATALOGUE_OUT=/tmp/cat.json PYTHONPATH=src python3 -m pytest tests/test_reliability.py
    python3 tests/catalogue_table.py /tmp/cat.json > table.md

One table per device (cpu, cuda): rows are catalogue items, columns backends ("any" for items
that do not depend on a backend), cells the recorded outcome.
"""

from __future__ import annotations

import json
import sys

ORDER = ["any", "eager", "sdpa", "cudnn", "flex", "flash_torch", "flash", "kernels_flash", "fa4"]


def _cell(s: str, width: int = 70) -> str:
    s = s.replace("|", "\\|").replace("\n", " ")
    if s.startswith("unavailable: "):  # the same machine-level reason in every row: keep it short
        s = "unavailable: " + s[len("unavailable: ") :].split(" (")[0].split(";")[0]
    return s if len(s) <= width else s[: width - 3] + "..."


def render(data: dict) -> str:
    recs = data["records"]
    out = []
    meta = data.get("meta", {})
    for device in sorted({r["device"] for r in recs}):
        rs = [r for r in recs if r["device"] == device]
        backends = [b for b in ORDER if any(r["backend"] == b for r in rs)]
        items = list(dict.fromkeys(r["item"] for r in rs))
        cells = {(r["item"], r["backend"]): r["outcome"] for r in rs}
        out.append(f"### {device} (torch {meta.get('torch', '?')}{', ' + meta['cuda'] if device == 'cuda' and meta.get('cuda') else ''})\n")
        out.append("| item | " + " | ".join(backends) + " |")
        out.append("|---|" + "---|" * len(backends))
        for it in items:
            row = [_cell(cells.get((it, b), "")) for b in backends]
            out.append(f"| {_cell(it)} | " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(render(json.load(f)))
