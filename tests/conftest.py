"""Shared fixtures. ``catalogue``: tests/test_reliability.py records each (item, backend, device)
outcome; with ANYATTN_CATALOGUE_OUT=path set, the records are written there as JSON at the end of
the session (merged with what the file already holds, so a CPU and a GPU run can share one file),
and ``python3 tests/catalogue_table.py path`` renders the docs table.

With ANYATTN_FAILLOG=path set, every failing test's report is appended to that file as soon as
it fails (each xdist worker writes its own), so a run cut short by a time limit still leaves
its tracebacks (the GPU scripts use it)."""

from __future__ import annotations

import json
import os

import pytest

_RECORDS: list[dict] = []


@pytest.fixture(scope="session")
def catalogue():
    def record(item: str, backend: str, device: str, outcome: str) -> None:
        _RECORDS.append({"item": item, "backend": backend, "device": device, "outcome": outcome})

    return record


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("ANYATTN_CATALOGUE_OUT")
    if not path or not _RECORDS:
        return
    old = []
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f).get("records", [])
    mine = {(r["item"], r["backend"], r["device"]) for r in _RECORDS}
    merged = [r for r in old if (r["item"], r["backend"], r["device"]) not in mine] + _RECORDS
    import torch

    meta = {"torch": torch.__version__, "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    with open(path, "w") as f:
        json.dump({"meta": meta, "records": merged}, f, indent=1)


def pytest_runtest_logreport(report):
    path = os.environ.get("ANYATTN_FAILLOG")
    if not path or not report.failed:
        return
    with open(path, "a") as f:
        f.write(f"=== {report.nodeid} [{report.when}]\n{report.longreprtext}\n\n")

