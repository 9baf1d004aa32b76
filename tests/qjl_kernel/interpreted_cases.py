"""Running a test file's Triton cases under Triton's interpreter, in one child process.

Interpreter mode is fixed for a whole process when triton is imported (``tl.sum`` and friends are
themselves ``@triton.jit`` functions), and other test modules import triton long before the Triton
test files (transformers does). So a Triton test file defines its cases as ``{key: (check, args)}``
and is also a script: the parent (pytest) runs the selected keys in ONE child started with
``TRITON_INTERPRET=1`` (``python FILE OUT.json KEY...``), which reports each case (None or the
traceback) as JSON. When pytest itself runs with ``TRITON_INTERPRET=1`` the cases run in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from qjl_kernel import triton_ops

ROOT = Path(__file__).resolve().parents[2]
CHILD_TIMEOUT_S = 600


def run_cases(cases: dict, keys) -> dict[str, str | None]:
    """Run the named cases here: None for a pass, else the traceback."""
    results = {}
    for key in keys:
        check, args = cases[key]
        torch.manual_seed(0)
        try:
            check(*args)
            results[key] = None
        except Exception:  # reported per case by the parent
            results[key] = traceback.format_exc()
    return results


def child_main(cases: dict, argv: list[str]) -> None:
    """A test file's ``__main__`` when run as the interpreted child: ``OUT.json KEY...``."""
    out_path, *selected = argv
    assert triton_ops.interpreted(), "the child must run with TRITON_INTERPRET=1"
    start = time.perf_counter()
    results = run_cases(cases, selected)
    Path(out_path).write_text(json.dumps({"results": results, "seconds": time.perf_counter() - start}))
    sys.exit(0)


def child_results(test_file: str, cases: dict, request, tmp_path_factory) -> dict | None:
    """For a module-scoped fixture: the results of the test file's selected cases from one
    ``TRITON_INTERPRET=1`` child (None when this process already interprets)."""
    import pytest

    if triton_ops.interpreted():
        return None
    this = Path(test_file).resolve()
    selected = [item.callspec.params["key"] for item in request.session.items
                if hasattr(item, "callspec") and "key" in item.callspec.params
                and Path(str(item.fspath)).resolve() == this] or sorted(cases)
    out = tmp_path_factory.mktemp(f"{this.stem}_interpreter") / "results.json"
    paths = [str(ROOT), str(this.parent)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(paths))
    env.pop("QJL_BACKEND", None)
    proc = subprocess.run([sys.executable, str(this), str(out), *selected], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"the TRITON_INTERPRET=1 child failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-6000:]}")
    report = json.loads(out.read_text())
    print(f"interpreted Triton cases of {this.name}: {len(selected)} in {report['seconds']:.1f} s")
    return report["results"]


def case_error(cases: dict, key: str, interpreted_results: dict | None) -> str | None:
    """Case ``key``'s error (None: it passed), from the child's results, or run here when this
    process already interprets (``interpreted_results`` None)."""
    return run_cases(cases, [key])[key] if interpreted_results is None else interpreted_results[key]


def triton_mark():
    """The skip mark of the tests that need an importable Triton (pytest is imported here, on use:
    the interpreted child needs no pytest)."""
    import pytest

    return pytest.mark.skipif(triton_ops.TRITON_ERROR is not None,
                              reason=f"triton is not importable: {triton_ops.TRITON_ERROR}")
