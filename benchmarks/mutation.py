"""Mutation score: do the tests' oracles catch seeded bugs in the engine?

Each mutant below is one hand-written, plausible bug in the export engine
(resolve, reorder, the mock, the pruner and its Subselect layers, the op
rules, attention, the model's own zeros and constant folds, verification):
a snippet of source text and what it becomes. The
snippet is looked up in *every* ``src/channelcut/**.py`` file (no file paths
are written down, so the mutants survive files being moved or renamed) and
must occur exactly once; a missing or ambiguous snippet is an error that
names the mutant.

For each mutant: copy ``src/`` to a temporary directory, apply the
replacement there, then, in one Python process with ``PYTHONPATH=<tmp>/src``,
check that the mutated module imports from the copy and run a fixed
selection of the test suite against it (:data:`ORACLE`, with ``-x``: a
caught mutant stops at its first failure). The outcome is

- **caught**: a test failed (the first failing test is recorded);
- **survived**: every test passed: the suite has no oracle for this bug;
- **error**: the mutant could not be run (it does not import, or pytest
  could not run): not a catch; mutants are written to import fine;
- **timeout**: the run exceeded ``--timeout`` (reported on its own).

Run the score (about 20-30 minutes on 2 CPU cores) and write the results::

    python benchmarks/mutation.py --out docs/mutation.json --md docs/reliability.md

Quick runs: ``--list`` (the mutants and where their snippets are),
``--only ID,ID``, ``--sample 4 --seed N`` (which 4), ``--jobs 2``;
``--render docs/mutation.json --md docs/reliability.md`` rewrites the
Markdown of a saved run without running anything.
``tests/test_mutation.py`` runs a small sample with a narrowed selection and
checks that every snippet is still found exactly once.

Exit status: 0 when every mutant ran (caught or survived), 1 when the
unmutated source fails the selection or a mutant errored or timed out,
2 for a stale mutant (snippet missing or ambiguous).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    """One seeded bug: ``target`` (source text that must occur exactly once
    under ``src/channelcut``) becomes ``replacement``. ``area`` is the step of
    the engine it belongs to (informational: the file is found by search);
    ``gap`` says which oracle would catch it, shown if it survives."""

    id: str
    area: str
    bug: str
    target: str
    replacement: str
    gap: str = ""


MUTANTS: List[Mutant] = [
    # -- resolve: request -> which channels each weight keeps -----------------
    Mutant(
        "resolve-extra-masked-channel", "resolve",
        "each requested input channel also drops its neighbour (one extra masked channel)",
        "        for op in ops:\n            r.dropped[op] |= chans\n",
        "        for op in ops:\n            r.dropped[op] |= chans | {(c + 1) % _n for c in chans}\n",
        gap="needs a reference built from the request itself (the original model with exactly the "
            "requested columns zeroed) or a check that the spec masks nothing beyond the request "
            "and its reported additions; the mock and the pruned model share the wrong plan",
    ),
    Mutant(
        "resolve-presence-any-drop", "resolve",
        "unconstrained export removes a channel group when any consumer drops it (the constrained rule)",
        "absent = (dropped_by_any - r.kept_by_any) | r.removed_req",
        "absent = dropped_by_any | r.removed_req",
    ),
    Mutant(
        "resolve-constrained-keeps-dropped", "resolve",
        "constrained export keeps a channel group that another consumer still reads (a dropped channel is not removed)",
        "r.absent = {g for g in absent if g not in r.pinned}",
        "r.absent = {g for g in absent if g not in r.pinned and g not in r.kept_by_any}",
        gap="needs an expectation on what constrained export removes: every channel group some "
            "consumer drops is gone from the producers (the model stays correct, only bigger)",
    ),
    Mutant(
        "resolve-subselect-one-based", "resolve",
        "a subset read's kept positions are counted from 1 (off by one in the kept indices)",
        "at = [i for i, p in enumerate(order) if p not in d]",
        "at = [i for i, p in enumerate(order, 1) if p not in d]",
    ),
    Mutant(
        "resolve-constrained-restore", "resolve",
        "constrained growth that would empty a consumer restores the channels it dropped instead of those it kept",
        "restore = {g for p, g in enumerate(gs) if p not in d and g >= 0}",
        "restore = {g for p, g in enumerate(gs) if p in d and g >= 0}",
        gap="needs a spec-level check that constrained growth never leaves a consumer with every input "
            "column masked (resolve's own rule). The mock masks the same columns and the spec reports them "
            "as constrained additions, so neither pruned == mock nor a reference that zeroes the reported "
            "set sees it (a 4-channel producer read by two convs that drop {0, 1} and {2, 3}: the first "
            "ends fully masked and the producer loses channels 2 and 3)",
    ),
    Mutant(
        "resolve-superset-short", "resolve",
        "a wider (superset) view ends one channel early: its last kept channel is not read",
        "lo, hi = idx[0], idx[-1] + 1",
        "lo, hi = idx[0], idx[-1]",
    ),
    Mutant(
        "resolve-superset-zero-offset", "resolve",
        "zero columns of a superset read are numbered from the range start (absolute, not relative, positions)",
        "zero_at = [i for i, p in enumerate(order[lo:hi]) if p in d]",
        "zero_at = [i for i, p in enumerate(order[lo:hi], lo) if p in d]",
    ),
    Mutant(
        "resolve-width-attribute", "resolve",
        "an integer width attribute (head count, GroupNorm groups, split size) keeps its unpruned value",
        "new = len(layout.order(ids)) // divisor",
        "new = len(ids) // divisor",
    ),
    # -- reorder: channel order that makes subsets contiguous --------------------
    Mutant(
        "reorder-concat-canonical", "reorder",
        "a reordered segment read inside a concat is laid out in the original order (wrong order applied)",
        "            self._reordered(gs, p, q, s, res)\n            p = q\n",
        "            res.extend(i for i in range(p, q) if gs[i] not in absent)\n            p = q\n",
    ),
    Mutant(
        "reorder-edge-runs", "reorder",
        "the contiguity test of a consumer's block inside a concat is off by one (edges never pinned)",
        "runs[-1] - runs[0] + 1 == len(runs)",
        "runs[-1] - runs[0] == len(runs)",
        gap="needs a copy-count expectation on a concat whose readers can all be views only if "
            "the kept groups sit at the block's edge",
    ),
    Mutant(
        "reorder-tiled-stride", "reorder",
        "Layout of a reordered segment repeated per position (after flatten) steps by 1 instead of the repeat",
        "res.extend(range(b + i * m, b + i * m + m))",
        "res.extend(range(b + i, b + i + m))",
    ),
    Mutant(
        "reorder-keep-filter", "reorder",
        "ordering ignores consumers that drop exactly one channel of a segment (proper-subset test off by one)",
        "keeps = [k for k in keeps if 0 < len(k - {LEFT, RIGHT}) < len(present)]",
        "keeps = [k for k in keeps if 0 < len(k - {LEFT, RIGHT}) < len(present) - 1]",
        gap="needs a copy-count expectation for a segment where one reader drops a single channel "
            "and a copy-free order exists only if that reader is taken into account",
    ),
    Mutant(
        "reorder-refine-side", "reorder",
        "the exact consecutive-ones search puts a set's new elements at the wrong end of the block order",
        "blocks.insert(0, frozenset(new))",
        "blocks.append(frozenset(new))",
    ),
    # -- mock: the masked copy ------------------------------------------------------
    Mutant(
        "mock-mask-wrong-dim", "mock",
        "input-channel masks (and zero columns) zero output rows: dim 0 instead of the weight's input dim",
        "w.index_fill_(entry.weight_dim, idx, 0)",
        "w.index_fill_(0, idx, 0)",
    ),
    Mutant(
        "mock-eval-only", "mock",
        "the mock masks only in eval mode (not in train mode)",
        "return w * self.mask.to(w.dtype)",
        "return w if self.training else w * self.mask.to(w.dtype)",
    ),
    Mutant(
        "mock-mask-once", "mock",
        "the mock zeroes the weights once instead of masking on every call (a training step brings channels back)",
        "parametrize.register_parametrization(module, attr, ChannelMask(mask), unsafe=True)",
        "getattr(module, attr).data.mul_(mask)",
    ),
    Mutant(
        "mock-grouped-rows", "mock",
        "a grouped conv's masked column is zeroed in all but the last output row of its group",
        "w[q * ko:(q + 1) * ko, local] = 0",
        "w[q * ko:(q + 1) * ko - 1, local] = 0",
        gap="needs an independent reference for grouped convs (the original model with the "
            "requested columns zeroed by hand): the mock and the pruner's zero columns share "
            "this helper",
    ),
    Mutant(
        "mock-no-copy", "mock",
        "get_mock_model masks the user's model itself instead of a copy",
        "mock = copy.deepcopy(model)",
        "mock = model",
    ),
    # -- pruner and Subselect layers: applying the spec -------------------------------
    Mutant(
        "pruner-zero-columns-skipped", "pruner",
        "zero weight columns of the spec are not zeroed in the pruned model",
        "shrink(held, spec.slices.get(name, {}), deltas.get(name), zeros.get(name, []), rb, index, rescales.get(name))",
        "shrink(held, spec.slices.get(name, {}), deltas.get(name), [], rb, index, rescales.get(name))",
    ),
    Mutant(
        "pruner-bn-num-features", "pruner",
        "BatchNorm's num_features is not updated after slicing (attribute not updated)",
        'rb.set_attr(m, "num_features", t.shape[0])',
        'rb.set_attr(m, "num_features", m.num_features)',
        gap="needs an attribute check on every pruned norm layer (num_features equals the "
            "sliced parameter length); BatchNorm's forward never reads it",
    ),
    Mutant(
        "pruner-depthwise-multiplier", "pruner",
        "a depthwise conv with a channel multiplier gets groups = out channels (multiplier ignored)",
        "new_in = new_out // mult",
        "new_in = new_out",
    ),
    Mutant(
        "modules-narrow-dim1", "subselect",
        "a contiguous subset read narrows dim 1 whatever the layer's channel dim (wrong slice dim)",
        "return x.narrow(self.subselect_dim, self.subselect_start, self.subselect_length)",
        "return x.narrow(1, self.subselect_start, self.subselect_length)",
    ),
    Mutant(
        "modules-gather-as-narrow", "subselect",
        "a gathered subset is read as the range from its first index (dropped gather: narrow for index_select)",
        "return x.index_select(self.subselect_dim, self.subselect_index)",
        "return x.narrow(self.subselect_dim, self.subselect_indices[0], len(self.subselect_indices))",
    ),
    Mutant(
        "modules-start-off-by-one", "subselect",
        "a Subselect layer's range starts one channel late",
        '"subselect_start": idx[0],',
        '"subselect_start": idx[0] + 1,',
    ),
    Mutant(
        "pruner-undo-gone-positions", "pruner",
        "undo rebuilds a sliced tensor with the removed values at the wrong positions (the removed indices reversed)",
        "full.index_copy_(dim, gone, values)",
        "full.index_copy_(dim, gone.flip(0), values)",
        gap="needs an undo test that removes two or more channels of one tensor and compares every value "
            "bit for bit with the model before",
    ),
    # -- zeros: channels the model zeroed itself, and the constants they leave ----------
    Mutant(
        "zeros-fold-sign", "zeros",
        "a constant input channel is folded into the reader's bias with the wrong sign",
        "k = torch.tensor(values, dtype=torch.float64)",
        "k = -torch.tensor(values, dtype=torch.float64)",
        gap="needs an export of a model's own zeros whose reader folds a non-zero constant, checked against "
            "the user's model as it is (the mock adds the same wrong delta)",
    ),
    Mutant(
        "zeros-fold-wrong-channel", "zeros",
        "a folded constant is multiplied by the weight column of the next input channel (the wrong channel)",
        "idx = torch.tensor(chans, dtype=torch.long)",
        "idx = (torch.tensor(chans, dtype=torch.long) + 1) % w.shape[1]",
    ),
    Mutant(
        "zeros-zero-as-constant", "zeros",
        "a channel that is exactly zero at its reader is taken for a constant (folded as 0.0 into the bias, "
        "or kept where no bias can absorb it) instead of being dropped",
        "        elif all(lo == 0.0 and hi == 0.0 for lo, hi in values):\n            zero.append(p)\n",
        "",
        gap="needs an expectation that a channel which stays zero is removed without a fold",
    ),
    Mutant(
        "zeros-constant-as-zero", "zeros",
        "a channel that is one non-zero constant at its reader is taken for zero: dropped without a fold",
        "elif all(lo == 0.0 and hi == 0.0 for lo, hi in values):",
        "elif all(lo == hi for lo, hi in values):",
    ),
    # -- verify: the check against a reference that does not come from the plan --------
    Mutant(
        "verify-additions-not-zeroed", "verify",
        "the verification reference zeroes only the request, not the channels the spec reports adding "
        "(constrained coupling, pruned_outputs groups)",
        "    for a in spec.additions:\n        if a.dim is None:\n            cols.setdefault(a.param, set()).update(a.channels)\n",
        "    for a in spec.additions:\n        if a.dim is None:\n            pass\n",
    ),
    Mutant(
        "verify-tolerance-dtype", "verify",
        "the reduced-precision tolerance uses bfloat16's epsilon whatever the output's dtype "
        "(float16 outputs get an 8x looser bound)",
        "tol = 3 * budget + 4 * torch.finfo(x.dtype).eps * scale",
        "tol = 3 * budget + 4 * torch.finfo(torch.bfloat16).eps * scale",
        gap="needs a float16 check that an error of a few tens of float16 epsilons fails verification",
    ),
    # -- op rules ----------------------------------------------------------------------
    Mutant(
        "rules-concat-order", "rules",
        "cat along the channel dim places the first input's channels after the others (wrong concat offset)",
        "ids = torch.cat(parts)",
        "ids = torch.cat(parts[1:] + parts[:1])",
    ),
    Mutant(
        "rules-sdpa-swapped-heads", "rules",
        "scaled_dot_product_attention couples value head h with query/key head H-1-h (swapped heads)",
        "merged = rec.union_pairs(rec.union_pairs(heads[0].ids, heads[1].ids), heads[2].ids)",
        "merged = rec.union_pairs(rec.union_pairs(heads[0].ids, heads[1].ids), heads[2].ids.flip(0))",
    ),
    Mutant(
        "rules-gqa-head-map", "rules",
        "grouped-query attention maps query head h to key/value head h % n_kv instead of h // group",
        "repeat_interleave(nq // nkv)",
        "repeat(nq // nkv)",
    ),
    Mutant(
        "rules-reduction-no-couple", "rules",
        "a reduction over the channel dim (sum, mean, max, ...) does not couple the channels it reads",
        "rec.set(out, CompactTrace.scalar(rec.couple(t.ids), out.dim()))",
        "rec.set(out, CompactTrace.scalar(int(t.ids[0]), out.dim()))",
    ),
    Mutant(
        "rules-permute-keeps-dim", "rules",
        "permute/transpose leave the channel dim where it was (the permutation maps the wrong dim)",
        "rec.set(y, CompactTrace(res.contiguous(), vd[0] if vd else None))",
        "rec.set(y, CompactTrace(res.contiguous(), t.vdim))",
    ),
    Mutant(
        "rules-flatten-order", "rules",
        "flatten/reshape lays channels out position-major instead of channel-major",
        ".expand(shape_in).reshape(shape_out)",
        ".expand(shape_in).transpose(0, -1).reshape(shape_out)",
    ),
    Mutant(
        "rules-chunk-interleaved", "rules",
        "chunk splits the channel dim into interleaved parts instead of consecutive blocks",
        "parts = t.ids.reshape(n, c // n)",
        "parts = t.ids.reshape(c // n, n).t()",
    ),
    Mutant(
        "rules-split-offset", "rules",
        "split with listed section sizes starts each section one channel early (wrong split offsets)",
        "start += v",
        "start += v - 1",
    ),
    Mutant(
        "rules-grouped-conv-coupling", "rules",
        "a grouped conv couples position j of group 0 with position k-1-j of the other groups",
        "in_ids[k:].reshape(groups - 1, k)",
        "in_ids[k:].reshape(groups - 1, k).flip(1)",
    ),
    Mutant(
        "rules-add-no-union", "rules",
        "an elementwise op (residual add) does not union the channels of its operands",
        "        if t.vdim is not None:\n            merged = t.ids if merged is None else rec.union_pairs(merged, t.ids)\n",
        "        if t.vdim is not None:\n            merged = t.ids if merged is None else merged\n",
    ),
    Mutant(
        "rules-full-size-not-unioned", "rules",
        "a full-size operand with one coupled group (a norm's output) is treated as a broadcast, not unioned",
        "merged = rec.union_pairs(merged, t.ids[:1].expand(merged.numel()))  # full size: aligned",
        "scalars.append(int(t.ids[0]))  # full size: treated as a broadcast",
    ),
    Mutant(
        "rules-norm-reversed", "rules",
        "per-channel norm parameters (BatchNorm, InstanceNorm) are aligned with the channels in reverse",
        "rec.record_param_use(name, 0, list(range(p.numel())), ids_l)",
        "rec.record_param_use(name, 0, list(range(p.numel()))[::-1], ids_l)",
    ),
    # -- attention --------------------------------------------------------------------
    Mutant(
        "attention-heads-interleaved", "attention",
        "pruned multi-head attention merges heads dim-major (permute(2, 0, 3, 1)): output channels of heads swapped",
        "out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, -1)",
        "out = out.permute(2, 0, 3, 1).reshape(tgt_len, bsz, -1)",
    ),
    # -- RMS norms rescaled when the stream narrows; the cost model's fixed op cost -------
    Mutant(
        "rmsnorm-eps-unscaled", "resolve",
        "a narrower RMS norm keeps its eps (the mean of squares over fewer channels is larger: eps must grow by d/d')",
        "use.eps * d / kept",
        "use.eps",
    ),
    Mutant(
        "rmsnorm-weight-unscaled", "rmsnorm",
        "a narrower RMS norm's weight is not multiplied by sqrt(d/d') (x * r * w form)",
        "return (w + 1) * factor - 1 if plus_one else w * factor",
        "return (w + 1) * factor - 1 if plus_one else w",
    ),
    Mutant(
        "rmsnorm-stream-not-zeroed", "resolve",
        "the reference and the mock do not zero the removed stream channels where they are made "
        "(a narrower RMS norm is exact only when they are zero)",
        "        spec.masks.append(MaskEntry(param, dim, 1, ordered))\n",
        "",
    ),
    Mutant(
        "cost-whole-read-off-by-one", "resolve",
        "a consumer that reads its whole input (a costly op) starts the range at channel 1",
        "return (0, len(order)) if op_cost > 0 and whole < per_op else None",
        "return (1, len(order)) if op_cost > 0 and whole < per_op else None",
    ),
    Mutant(
        "attention-num-heads", "attention",
        "a pruned nn.MultiheadAttention keeps its old num_heads attribute. Closest equivalent of the original "
        "mutant (fix_multihead_attention alone writing the old value), which changes nothing: the tracer also "
        "records num_heads as a head count and the pruner rewrites it from spec.attributes, so here the pruner "
        "skips num_heads of nn.MultiheadAttention on both paths",
        "                fix_multihead_attention(m, rb.set_attr)\n"
        "        for r in spec.rescales:  # an RMS norm over fewer channels: its eps\n"
        "            rb.set_attr(mods.module(r.module or \"\"), r.eps_attr, r.eps)\n"
        "        for mod_name, attrs in spec.attributes.items():\n"
        "            m = mods.module(mod_name)\n"
        "            for attr, value in attrs.items():\n"
        "                rb.set_attr(m, attr, value)\n",
        "                fix_multihead_attention(m, lambda mod, a, v: None if a == \"num_heads\" else rb.set_attr(mod, a, v))\n"
        "        for r in spec.rescales:  # an RMS norm over fewer channels: its eps\n"
        "            rb.set_attr(mods.module(r.module or \"\"), r.eps_attr, r.eps)\n"
        "        for mod_name, attrs in spec.attributes.items():\n"
        "            m = mods.module(mod_name)\n"
        "            for attr, value in attrs.items():\n"
        "                if not (isinstance(m, nn.MultiheadAttention) and attr == \"num_heads\"):\n"
        "                    rb.set_attr(m, attr, value)\n",
        gap="needs an attribute check after pruning nn.MultiheadAttention heads (num_heads * head_dim equals the "
            "projections' width, invariant 8): the pruned forward derives the head count from the weights, so "
            "outputs stay right and only the attribute lies",
    ),
]

# The oracle selection: run in this order with -x, fast and discriminating
# files first (a caught mutant stops at its first failure). ``{src}`` is the
# mutated copy's src directory (its doctests are part of the suite).
ORACLE: List[str] = [
    "--doctest-modules", "{src}/channelcut/pruning",
    "tests/pruning/test_pruning_core.py",
    "tests/pruning/test_reorder.py",
    "tests/pruning/test_multihead_attention.py",
    "tests/pruning/test_attention_and_attributes.py",
    "tests/pruning/test_shape_only_trace.py",
    "tests/pruning/test_errors.py",
    "tests/pruning/test_constant_channels.py",
    "tests/pruning/test_verification.py",
    "tests/pruning/test_cost_model.py",
    "tests/test_hidden_size.py",
    "tests/test_regressions.py",
    "tests/test_bad_input.py",
    "tests/test_op_rules.py",
    "tests/test_random_networks.py",
    "tests/test_zoo.py",
    "tests/test_io.py",
    "tests/test_hf.py",
    "-m", "not slow",
]


START, END = "<!-- mutation score: written by benchmarks/mutation.py -->", "<!-- end of the mutation score -->"


def write_section(path: Path, text: str) -> None:
    """Write the score into ``path``: between the markers when the file has
    them (docs/reliability.md), else the whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    block = f"{START}\n{text.strip()}\n{END}\n"
    old = path.read_text() if path.exists() else ""
    if START in old and END in old:
        head, rest = old.split(START, 1)
        path.write_text(head + block + rest.split(END, 1)[1].lstrip("\n"))
    else:
        path.write_text(block)


class StaleMutant(Exception):
    """A mutant whose target snippet is missing from the source or ambiguous."""


# ---------------------------------------------------------------------------
# locating and applying
# ---------------------------------------------------------------------------


def source_files(src: Path) -> List[Path]:
    """Every Python file of the package under ``src`` (sorted)."""
    return sorted(p for p in (src / "channelcut").rglob("*.py") if "__pycache__" not in p.parts)


def locate(m: Mutant, src: Path) -> Tuple[Path, int]:
    """The one file under ``src`` that holds ``m.target``, and the line where it
    starts. Raises :class:`StaleMutant` when the snippet occurs nowhere or more
    than once (in one file or in several)."""
    hits: List[Tuple[Path, int]] = []
    for path in source_files(src):
        text = path.read_text()
        start = text.find(m.target)
        while start >= 0:
            hits.append((path, text.count("\n", 0, start) + 1))
            start = text.find(m.target, start + 1)
    if len(hits) != 1:
        where = ", ".join(f"{p.relative_to(src)}:{line}" for p, line in hits) or "nowhere"
        raise StaleMutant(
            f"mutant {m.id!r}: its target snippet must occur exactly once in {src}/channelcut/**.py, "
            f"found {len(hits)} ({where}); update the mutant to the current source. Snippet:\n{m.target}"
        )
    return hits[0]


def mutated_text(m: Mutant, path: Path) -> str:
    text = path.read_text()
    if m.replacement == m.target:
        raise StaleMutant(f"mutant {m.id!r}: the replacement equals the target")
    return text.replace(m.target, m.replacement, 1)


def check_all(mutants: Sequence[Mutant], src: Path) -> Dict[str, Tuple[Path, int]]:
    """Locate every mutant (raising for the first stale one), check ids are
    unique and each mutated file still compiles."""
    seen = set()
    found = {}
    for m in mutants:
        if m.id in seen:
            raise StaleMutant(f"duplicate mutant id {m.id!r}")
        seen.add(m.id)
        path, line = locate(m, src)
        try:
            compile(mutated_text(m, path), str(path), "exec")
        except SyntaxError as exc:
            raise StaleMutant(f"mutant {m.id!r} does not compile: {exc}") from None
        found[m.id] = (path, line)
    return found


# ---------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------


@dataclass
class Result:
    id: str
    area: str
    file: str
    line: int
    bug: str
    status: str  # caught / survived / error / timeout (baseline: passed / failed)
    first_failure: str = ""
    detail: str = ""
    seconds: float = 0.0
    gap: str = ""


def _run(cmd: List[str], env: Dict[str, str], timeout: float) -> Tuple[Optional[int], str]:
    """Run ``cmd`` in its own process group; kill the group on timeout
    (returns None as the exit status then)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out


_SUMMARY = re.compile(r"^(FAILED|ERROR) (\S+)(?: - (.*))?$", re.M)


def _first_failure(output: str, src: Path) -> Tuple[str, str]:
    """(node id, message) of the first failure in pytest's short summary."""
    m = _SUMMARY.search(output)
    if m is None:
        tail = [ln for ln in output.strip().splitlines() if ln.strip()][-1:] or [""]
        return "", tail[0][:300]
    node = m.group(2)
    path, sep, name = node.partition("::")
    if sep and not path.startswith("tests/") and name.startswith("channelcut."):
        # a doctest of the mutated copy (pytest names it relative to the
        # repository, which the copy is outside of): name it by its file
        parts = name.split(".")
        for k in range(len(parts), 0, -1):
            for f in (Path(*parts[:k]).with_suffix(".py"), Path(*parts[:k]) / "__init__.py"):
                if (src / f).is_file():
                    return f"src/{f.as_posix()}::{name}", (m.group(3) or "")[:300]
    return node, (m.group(3) or "")[:300]


# One interpreter per mutant: import the mutated module from the copy (an
# import failure is an *error*, exit status IMPORT_FAILED), then run pytest.
IMPORT_FAILED = 97
_DRIVER = """\
import importlib, sys, traceback
module, copy = sys.argv[1], sys.argv[2]
try:
    m = importlib.import_module(module)
    assert m.__file__.startswith(copy), f"imported {m.__file__}, not the mutated copy"
except BaseException as exc:
    traceback.print_exc()
    print(f"MUTANT-IMPORT-FAILED: {type(exc).__name__}: {exc}")
    sys.exit(%d)
import pytest
sys.exit(pytest.main(sys.argv[3:]))
""" % IMPORT_FAILED


def pytest_command(oracle: Sequence[str], src: Path, module: str = "channelcut", file: Optional[Path] = None) -> List[str]:
    """The command that checks ``module`` imports from ``src`` and runs the
    selection: ``{src}`` in ``oracle`` is the copy's src directory, ``{file}``
    the mutated file in the copy."""
    args = []
    for a in oracle:
        if "{file}" in a:
            if file is None:
                raise ValueError("an oracle selection with {file} needs a mutant")
            a = a.replace("{file}", str(file))
        args.append(a.replace("{src}", str(src)))
    return [sys.executable, "-c", _DRIVER, module, str(src), "-x", "-q", "-p", "no:cacheprovider", "-rfE",
            "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml"), *args]


def run_one(m: Optional[Mutant], oracle: Sequence[str], timeout: float) -> Result:
    """Run the oracle selection against a copy of ``src/`` with mutant ``m``
    applied (``m`` None: the unmutated copy, the baseline)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="channelcut-mutant-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        module, path = "channelcut", None
        if m is None:
            res = Result("(unmutated)", "", "", 0, "the current source, no mutation", "")
        else:
            path, line = locate(m, src)
            rel = path.relative_to(src)
            res = Result(m.id, m.area, str(rel), line, m.bug, "", gap=m.gap)
            path.write_text(mutated_text(m, path))
            module = ".".join(rel.with_suffix("").parts)
            if module.endswith(".__init__"):
                module = module[: -len(".__init__")]
        env = dict(os.environ, PYTHONPATH=str(src), PYTHONDONTWRITEBYTECODE="1")
        rc, out = _run(pytest_command(oracle, src, module, path), env, timeout)
        node, msg = _first_failure(out, src)
        if rc is None:
            res.status = "timeout"
            res.detail = f"over {timeout:.0f} s"
        elif rc == IMPORT_FAILED:
            res.status = "error"
            res.detail = next((ln for ln in out.splitlines() if ln.startswith("MUTANT-IMPORT-FAILED")), "import failed")[:300]
        elif rc == 0:
            res.status = "survived" if m is not None else "passed"
        elif rc in (1, 2) and node:  # a failed test, or a collection error of a test module
            res.status = "caught" if m is not None else "failed"
            res.first_failure, res.detail = node, msg
        else:
            res.status = "error" if m is not None else "failed"
            res.detail = f"pytest exit {rc}: {msg}"
    res.seconds = time.perf_counter() - t0
    return res


def run_all(mutants: Sequence[Mutant], oracle: Sequence[str], timeout: float, jobs: int = 1,
            progress: bool = True) -> List[Result]:
    results: Dict[str, Result] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(run_one, m, oracle, timeout): m for m in mutants}
        for fut in concurrent.futures.as_completed(futures):
            r = fut.result()
            results[r.id] = r
            if progress:
                print(f"[{len(results):2d}/{len(mutants)}] {r.status:8s} {r.seconds:6.1f}s  {r.id}"
                      + (f"  <- {r.first_failure}" if r.first_failure else f"  {r.detail}" if r.detail else ""),
                      flush=True)
    return [results[m.id] for m in mutants]


# ---------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def counts(results: Sequence[Result]) -> Dict[str, int]:
    c = {"caught": 0, "survived": 0, "error": 0, "timeout": 0}
    for r in results:
        c[r.status] = c.get(r.status, 0) + 1
    return c


def table(results: Sequence[Result]) -> str:
    rows = [("id", "file", "result", "first failing test")]
    rows += [(r.id, f"{r.file}:{r.line}", r.status, r.first_failure or r.detail) for r in results]
    w = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{a:<{w[0]}}  {b:<{w[1]}}  {c:<{w[2]}}  {d}" for a, b, c, d in rows)


def markdown(report: Dict) -> str:
    c = report["counts"]
    n = len(report["mutants"])
    load = report.get("load_average")
    lines = [
        "## Mutation score",
        "",
        f"**{c['caught']} of {n} seeded bugs caught** ({c['survived']} survived, {c['error']} errors"
        + (f", {c['timeout']} timed out" if c.get("timeout") else "") + ").",
        "",
        "```bash",
        report["command"],
        "```",
        "",
        f"Run on {report['date']} at commit `{report['commit']}`{' (with uncommitted changes)' if report['dirty'] else ''}, "
        f"{report['total_seconds'] / 60:.1f} minutes on this project's 2-core CPU machine "
        f"({report['jobs']} mutant{'s' if report['jobs'] > 1 else ''} at a time"
        + (f"; load average {load[0]:.1f} at the start, {load[1]:.1f} at the end: the cores are shared)."
           if load else ")."),
        "",
        "Each mutant is one hand-written, plausible bug in the export engine (`benchmarks/mutation.py`): a snippet of "
        "source text, found by searching every `src/channelcut/**.py` file, and its replacement. The script copies "
        "`src/` to a temporary directory, applies the mutant there, checks that the mutated module imports, and runs "
        "the oracle selection below against the copy with `pytest -x`. *caught*: a test failed; *survived*: every test "
        "passed, so no oracle of the suite sees this bug; *error*: the mutant could not run (not a catch). "
        f"The unmutated source passes the same selection ({report['baseline']['seconds']:.0f} s)."
        if report.get("baseline") else
        "Each mutant is one hand-written, plausible bug in the export engine (`benchmarks/mutation.py`); "
        "the same selection was not run on the unmutated source in this run (`--no-baseline`).",
        "",
        "Oracle selection (in this order, `-x`): `" + shlex.join(a.replace("{src}", "src") for a in report["oracle"]) + "`. "
        "Left out: `tests/test_cli.py` (a minute of subprocesses; the CLI renders what the library builds), "
        "`tests/test_export.py` (TorchScript/ONNX/compile of pruned models), the masking and importance tests "
        "(they choose channels, not export them), `tests/test_report.py` and `tests/test_stats.py` (reports and "
        "counts built from a spec), `tests/test_support_widths.py` (the widths oracle's own test), "
        "`tests/test_mutation.py` (this harness) and the tests marked slow.",
        "",
        "| id | file | bug | result | first failing test |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in report["mutants"]:
        first = r["first_failure"] or r["detail"]
        first = f"`{first}`" if r["first_failure"] else first
        result = f"**{r['status']}**" if r["status"] != "caught" else r["status"]
        bug = r["bug"].replace("|", "\\|")
        lines.append(f"| `{r['id']}` | `{r['file']}:{r['line']}` | {bug} | {result} | {first.replace('|', chr(92) + '|')} |")
    survivors = [r for r in report["mutants"] if r["status"] != "caught"]
    if survivors:
        lines += ["", "What the survivors need (the oracle that would catch each):", ""]
        for r in survivors:
            lines.append(f"- `{r['id']}` ({r['status']}): {r['gap'] or r['detail'] or 'see the table'}")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="list the mutants and where their snippets are, then exit")
    ap.add_argument("--only", type=str, default=None, help="comma-separated mutant ids to run")
    ap.add_argument("--sample", type=int, default=0, help="run a random sample of this many mutants (0: all)")
    ap.add_argument("--seed", type=int, default=0, help="which sample --sample draws (default 0)")
    ap.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mutant before it counts as a timeout")
    ap.add_argument("--baseline", dest="baseline", action="store_true", default=None,
                    help="first run the selection on the unmutated source (default: only for a full run)")
    ap.add_argument("--no-baseline", dest="baseline", action="store_false")
    ap.add_argument("--out", type=str, default=None, help="write the results as JSON here (e.g. docs/mutation.json)")
    ap.add_argument("--md", type=str, default=None, help="write the results as a Markdown section here")
    ap.add_argument("--render", type=str, default=None, metavar="JSON",
                    help="run nothing: write the Markdown (--md, else stdout) of a saved --out file, and with --out "
                         "that file again, with the bug and gap texts of the current mutant list")
    args = ap.parse_args(argv)
    if args.render:
        # re-render the Markdown of a saved run (bug and gap texts from the current list)
        report = json.loads(Path(args.render).read_text())
        current = {m.id: m for m in MUTANTS}
        for r in report["mutants"]:
            if r["id"] in current:
                r["bug"], r["gap"] = current[r["id"]].bug, current[r["id"]].gap
        text = markdown(report)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        if args.md:
            write_section(Path(args.md), text)
        else:
            print(text)
        return 0

    try:
        where = check_all(MUTANTS, ROOT / "src")
    except StaleMutant as exc:
        print(f"mutation.py: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for m in MUTANTS:
            path, line = where[m.id]
            print(f"{m.id:32s} {str(path.relative_to(ROOT / 'src')) + ':' + str(line):40s} {m.bug}")
        print(f"{len(MUTANTS)} mutants")
        return 0
    chosen = list(MUTANTS)
    if args.only:
        ids = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [i for i in ids if i not in where]
        if unknown:
            print(f"mutation.py: unknown mutant id(s) {unknown}; --list shows them", file=sys.stderr)
            return 2
        chosen = [m for m in MUTANTS if m.id in ids]
    if args.sample:
        picked = set(random.Random(args.seed).sample(range(len(chosen)), min(args.sample, len(chosen))))
        chosen = [m for i, m in enumerate(chosen) if i in picked]
    full = len(chosen) == len(MUTANTS)
    do_baseline = full if args.baseline is None else args.baseline

    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    baseline = None
    if do_baseline:
        print("baseline: the oracle selection on the unmutated source ...", flush=True)
        baseline = run_one(None, ORACLE, args.timeout)
        print(f"baseline: {baseline.status} in {baseline.seconds:.1f}s {baseline.first_failure} {baseline.detail}", flush=True)
        if baseline.status != "passed":
            print("mutation.py: the unmutated source fails the oracle selection; every mutant would look caught. "
                  "Fix the suite first.", file=sys.stderr)
            return 1
    results = run_all(chosen, ORACLE, args.timeout, jobs=args.jobs)
    total = time.perf_counter() - t0
    c = counts(results)
    print()
    print(table(results))
    print(f"\nscore: {c['caught']}/{len(results)} caught, {c['survived']} survived, {c['error']} error"
          + (f", {c['timeout']} timeout" if c["timeout"] else "") + f"  ({total / 60:.1f} min)")

    command = "python benchmarks/mutation.py " + shlex.join(list(argv) if argv is not None else sys.argv[1:])
    report = {
        "command": command.strip(),
        "date": datetime.date.today().isoformat(),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--", "src", "tests")),
        "python": sys.version.split()[0],
        "jobs": args.jobs,
        "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "oracle": ORACLE,
        "total_seconds": round(total, 1),
        "counts": c,
        "baseline": None if baseline is None else {"status": baseline.status, "seconds": round(baseline.seconds, 1)},
        "mutants": [dict(asdict(r), seconds=round(r.seconds, 1)) for r in results],
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    if args.md:
        write_section(Path(args.md), markdown(report))
    return 1 if c["error"] or c["timeout"] else 0


if __name__ == "__main__":
    sys.exit(main())
