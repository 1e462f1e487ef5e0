"""Fault injection for the reliability tests: kill a stage at a chosen call, and count outcomes.

``run_killed(argv, point)`` starts ``python -m pipeline <argv>`` in a subprocess whose chosen
function (``"module:attr"`` or ``"module:Class.attr"``) SIGKILLs the process at its n-th call
(optionally only calls whose arguments contain ``match``), before or after the real call. No
hook lives in the product code: the wrapper monkeypatches the function, as the resume test in
test_features.py does.

``FIGURES`` counts what the suite tried and how many cases failed a check; ``CHECKS`` says, per
kind, what every case of that kind checked. The README's reliability table is the summary
``pytest`` prints at the end (see conftest.py).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

REPO = Path(__file__).resolve().parents[1]

# kind -> {case name: True when the case passed every check}
FIGURES: Dict[str, Dict[str, bool]] = defaultdict(dict)

# kind -> what each case of that kind checks (printed with the figures; the README quotes it).
CHECKS: Dict[str, str] = {
    "kill points": "SIGKILLed there (a real subprocess); every file under its final name whole; the rerun "
                   "exits 0 and equals an uninterrupted run; no temporary files left",
    "concurrent runs": "real subprocesses; both exit 0; the result equals a clean run; no temporary files left",
    "corruptions": "exit 2, one error line naming the file and its fix, no traceback (a damaged cache or "
                   "checkpoint left byte for byte as it was; a damaged head then refitted by `heads` to the same "
                   "predictions); a damaged run JSON: exit 0, rewritten equal to a clean run's; where tried, "
                   "the named fix (--rebuild) gives a result equal to a clean run",
    "bit flips (checksums)": "exit 2 (or DamagedCacheError), one error line naming the file, the data set and "
                             "--rebuild, no traceback; the file unchanged",
    "bad inputs": "exit 0 with bad files skipped and listed, or exit 2 with one error line and no traceback; "
                  "nothing written for an unusable data set; after a full disk the rerun keeps every computed batch",
    "data changed during a run": "exit 0; deleted images skipped and listed; each feature under the sha1 of "
                                 "the bytes it came from; the next run equals a clean run on the data as it is",
    "fuzzed command lines (in process)": "cli.main returns 0, or 2 with exactly one error line; no traceback "
                                         "(outputs not compared)",
    "fuzzed command lines (subprocess)": "the process exits 0, or 2 with exactly one error line; no traceback "
                                         "(outputs not compared)",
}


@contextlib.contextmanager
def case(kind: str, name: str) -> Iterator[None]:
    """Record one tried fault; it counts as "lost or corrupted" unless the block completes."""
    FIGURES[kind][name] = False
    yield
    FIGURES[kind][name] = True


def summary() -> List[str]:
    lines = []
    for kind in sorted(FIGURES):
        results = FIGURES[kind]
        failed = sum(1 for ok in results.values() if not ok)
        lines.append(f"{kind:<34} tried {len(results):>4}   failed a check: {failed}")
        if kind in CHECKS:
            lines.append(f"    checked: {CHECKS[kind]}")
    return lines


@dataclass(frozen=True)
class KillPoint:
    """Where to SIGKILL a stage: the ``call``-th call of ``target`` (matching ``match``), ``when``."""

    name: str
    target: str
    call: int = 1
    when: str = "before"  # before | after the real call
    match: str = ""  # only calls whose repr(args) contains this count
    sleep: float = 0.0  # instead of killing: sleep this long after every matching call (a slow run)

    def spec(self) -> str:
        return json.dumps({"target": self.target, "call": self.call, "when": self.when, "match": self.match,
                           "sleep": self.sleep})


# Runs in the child: patch the target, then run the CLI. The tests' small crops are applied
# here too, so a run killed here and resumed in the test process has the same settings.
_WRAPPER = r"""
import importlib, json, os, signal, sys, time
spec, preprocess = json.loads(sys.argv[1]), json.loads(sys.argv[2])
from pipeline import config
config.PREPROCESS.update(preprocess)
from pipeline.cli import main
if not spec["target"]:
    sys.exit(main(sys.argv[3:]))
module_name, attr = spec["target"].split(":")
owner = importlib.import_module(module_name)
parts = attr.split(".")
for name in parts[:-1]:
    owner = getattr(owner, name)
original = getattr(owner, parts[-1])
calls = [0]

def die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)

def wrapper(*args, **kwargs):
    if spec["match"] and spec["match"] not in repr(args) + repr(kwargs):
        return original(*args, **kwargs)
    calls[0] += 1
    if spec["sleep"]:
        out = original(*args, **kwargs)
        time.sleep(spec["sleep"])
        return out
    if calls[0] == spec["call"] and spec["when"] == "before":
        die()
    out = original(*args, **kwargs)
    if calls[0] == spec["call"]:
        die()
    return out

setattr(owner, parts[-1], wrapper)
sys.exit(main(sys.argv[3:]))
"""


def slow(target: str, seconds: float, match: str = "") -> KillPoint:
    """Not a kill: every matching call of ``target`` takes ``seconds`` longer."""
    return KillPoint(f"slow {target}", target, match=match, sleep=seconds)


def start(argv: List[str], point: Optional[KillPoint] = None, preprocess: Optional[dict] = None,
          env: Optional[dict] = None) -> subprocess.Popen:
    """Start ``python -m pipeline <argv>`` (with a kill point, or a slow call, when given)."""
    point = point or KillPoint("none", "")
    cmd = [sys.executable, "-c", _WRAPPER, point.spec(), json.dumps(preprocess or {}), *argv]
    full_env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_killed(argv: List[str], point: KillPoint, preprocess: Optional[dict] = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the stage until ``point`` kills it; fails if it was not killed there."""
    proc = start(argv, point, preprocess)
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != -9:
        raise AssertionError(f"kill point {point.name!r} was never reached (exit {proc.returncode}):\n{err[-2000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)
