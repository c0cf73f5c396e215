"""The mutation-score harness (``benchmarks/mutation.py``), kept honest cheaply.

- every mutant's target snippet occurs exactly once in the current source
  (a refactoring that moves or rewrites the code makes a mutant stale: this
  test names it), and every mutated file still compiles;
- a small fixed sample of mutants from different files, run through the same
  harness with a narrowed oracle selection (the doctests of the mutated
  file), is caught, and the unmutated source passes those doctests (so the
  harness tells the two apart).

The full score is ``python benchmarks/mutation.py --out docs/mutation.json
--md docs/reliability.md`` (about half an hour).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    name = "channelcut_mutation_harness"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "mutation.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # (dataclasses look their module up)
    spec.loader.exec_module(mod)
    return mod


mutation = _load()


def test_every_target_occurs_exactly_once():
    found = mutation.check_all(mutation.MUTANTS, ROOT / "src")
    assert len(found) == len(mutation.MUTANTS) >= 40
    engine = ROOT / "src" / "channelcut" / "pruning"
    files = {path.relative_to(engine).as_posix() for path, _ in found.values()}
    assert {"resolve.py", "reorder.py", "mock.py", "pruner.py", "subselect.py", "attention.py", "zeros.py",
            "verify.py"} <= files, files
    assert len({f for f in files if f.startswith("rules/")}) >= 5, files  # the op rules, across their families
    areas = {m.area for m in mutation.MUTANTS}
    assert {"resolve", "reorder", "mock", "pruner", "subselect", "rules", "attention", "zeros", "verify"} <= areas
    for m in mutation.MUTANTS:
        assert m.bug and m.replacement != m.target, m.id


def test_stale_mutants_fail_loudly(tmp_path):
    pkg = tmp_path / "channelcut" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\ny = x + 1\n")
    (pkg / "b.py").write_text("z = x + 1\n")
    ok = mutation.Mutant("ok", "test", "bug", "y = x + 1", "y = x + 2")
    assert mutation.locate(ok, tmp_path) == (pkg / "a.py", 2)
    with pytest.raises(mutation.StaleMutant, match="found 0"):
        mutation.locate(mutation.Mutant("gone", "test", "bug", "w = 3", "w = 4"), tmp_path)
    with pytest.raises(mutation.StaleMutant, match=r"found 2 \(channelcut/sub/a.py:2, channelcut/sub/b.py:1\)"):
        mutation.locate(mutation.Mutant("twice", "test", "bug", "x + 1", "x + 2"), tmp_path)
    bad = mutation.Mutant("syntax", "test", "bug", "y = x + 1", "y = x +")
    with pytest.raises(mutation.StaleMutant, match="does not compile"):
        mutation.check_all([bad], tmp_path)


# A fixed sample from different files, each with a narrowed oracle selection:
# the doctests of the file its snippet is in ({file}: found by search, in the
# mutated copy), which exercise the mutated code.
SAMPLE = ["attention-heads-interleaved", "reorder-keep-filter"]
NARROW = ["--doctest-modules", "{file}"]


def test_a_sample_of_mutants_is_caught():
    by_id = {m.id: m for m in mutation.MUTANTS}
    for mid in SAMPLE:
        res = mutation.run_one(by_id[mid], NARROW, timeout=120)
        assert res.status == "caught", res
        assert res.first_failure.startswith(f"src/{res.file}::"), res


def test_the_unmutated_source_passes_the_narrowed_selection():
    """(the harness tells caught from survived: the same doctests pass on an
    unmutated copy)"""
    files = sorted({str(mutation.locate(m, ROOT / "src")[0].relative_to(ROOT / "src"))
                    for m in mutation.MUTANTS if m.id in SAMPLE})
    res = mutation.run_one(None, ["--doctest-modules"] + [f"{{src}}/{f}" for f in files], timeout=120)
    assert res.status == "passed", res


def test_a_mutant_that_does_not_import_is_an_error_not_a_catch():
    broken = mutation.Mutant("broken-import", "test", "a NameError at import time",
                             'MODES = ("unconstrained", "constrained", "baseline")', "MODES = UNDEFINED_NAME")
    res = mutation.run_one(broken, NARROW, timeout=120)
    assert res.status == "error" and "NameError" in res.detail, res
