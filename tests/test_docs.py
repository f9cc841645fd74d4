"""Docs are code that must run: every ```python and ```bash block of README.md and docs/*.md, in document order.

Each page runs in a fresh directory (with ``data/`` linked to the bundled datasets), as one Python session: Python
blocks share one namespace, bash blocks run where they stand (with this venv's ``interp`` on PATH), so a page can make
a file in Python and use it from the command line. A block is skipped only when its fence says why, either ``gpu``
(```python gpu: needs a CUDA device) or ``no-test`` (```bash no-test: a command that runs this very suite).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)([^\n]*)\n(.*?)^```\s*$", re.S | re.M)
SKIP_TAGS = {"gpu", "no-test"}

DRIVER = r"""
import json, os, subprocess, sys, traceback
blocks = json.load(open(sys.argv[1]))
ns = {"__name__": "__main__"}
for b in blocks:
    where = f"{b['page']}:{b['line']}"
    print(f"--- {where} ({b['lang']})", flush=True)
    if b["lang"] == "python":
        exec(compile(b["code"], where, "exec"), ns)
    else:
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", b["code"]])
        if r.returncode:
            sys.exit(f"{where}: bash block exited {r.returncode}")
"""


def blocks(page: Path) -> list[dict]:
    text = page.read_text()
    out = []
    for m in FENCE.finditer(text):
        lang, info, code = m.group(1), m.group(2).split(), m.group(3)
        if lang not in ("python", "bash") or SKIP_TAGS & set(info):
            continue
        line = text[: m.start()].count("\n") + 1
        out.append({"page": str(page.relative_to(ROOT)), "line": line, "lang": lang, "code": code})
    return out


def test_fences_parse():
    """The block finder sees every fence: a page whose fences it cannot pair would silently test nothing."""
    for page in PAGES:
        n_fences = sum(1 for line in page.read_text().splitlines() if line.startswith("```"))
        found = len(FENCE.findall(page.read_text()))
        assert n_fences == 2 * found, f"{page.name}: {n_fences} fence lines but {found} blocks parsed"


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_runs(page, tmp_path):
    todo = blocks(page)
    if not todo:
        pytest.skip(f"{page.name} has no runnable block")
    (tmp_path / "data").symlink_to(ROOT / "interp" / "data")
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps(todo))
    (tmp_path / "driver.py").write_text(DRIVER)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}".rstrip(os.pathsep)
    env["PLOTLY_RENDERER"] = "json"  # fig.show() outside a notebook would wait for a browser
    r = subprocess.run([sys.executable, "driver.py", str(spec)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, f"{page.name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-4000:]}"
