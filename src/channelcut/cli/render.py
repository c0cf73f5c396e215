"""Text rendering of the reports :mod:`channelcut.report` builds: tables and
summary lines. Nothing here computes a number about a model."""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

from ..report import BenchReport, ExportReport, InspectReport


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain-text table: first column left-aligned, the others right-aligned.

    >>> print(format_table(["layer", "in"], [["conv1", 64], ["fc", 512]]))
    layer   in
    -----  ---
    conv1   64
    fc     512
    """
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def fmt_int(n: Optional[float]) -> str:
    """``1234567`` -> ``"1.23M"``.

    >>> fmt_int(1234567), fmt_int(999), fmt_int(None)
    ('1.23M', '999', '-')
    """
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def ratio(a: Optional[float], b: Optional[float]) -> str:
    """``a / b`` as a percentage, ``-`` when undefined.

    >>> ratio(1, 4), ratio(1, 0)
    ('25.0%', '-')
    """
    return f"{a / b:.1%}" if a is not None and b else "-"


def _cell(v: Optional[int]) -> str:
    return "-" if v is None else str(v)


def _rows_or_more(table: str, shown: int, total: int, more: str) -> str:
    return table + (f"\n... {total - shown} {more}" if total > shown else "")


def render_inspect(rep: InspectReport, max_rows: int) -> str:
    """``channelcut inspect``: counts, the layer table, pinned reasons, barrier ops."""
    rows = [
        [r.name, r.kind, _cell(r.in_channels), _cell(r.prunable_in), _cell(r.out_channels), _cell(r.prunable_out)]
        for r in rep.layers[:max_rows]
    ]
    lines = [
        f"{rep.model}: {rep.producers} producers, {rep.consumers} consumers, input {rep.input_shape}",
        f"channel groups: {rep.channel_groups} ({rep.removable_channel_groups} removable, {rep.pinned_channel_groups} pinned)",
        f"prunable: {rep.prunable_consumer_input_channels} of {rep.consumer_input_channels} consumer input channels "
        f"({rep.prunable_fraction:.1%}), "
        f"{rep.prunable_producer_output_channels} of {rep.producer_output_channels} producer output channels",
        "",
        _rows_or_more(
            format_table(["layer", "kind", "in", "prunable in", "out", "prunable out"], rows),
            max_rows, len(rep.layers), "more layers (--max-rows, or --json for all)",
        ),
    ]
    if rep.pinned_reasons:
        lines += ["", "why channels are pinned (channel groups):"]
        lines += [f"  {n:>6}  {r}" for r, n in sorted(rep.pinned_reasons.items(), key=lambda kv: -kv[1])[:15]]
    if rep.barriers:
        lines += ["", "barrier ops (no rule: channels around them are kept):"]
        lines += [f"  {b.count:>3}x {b.op} in {b.module}: {b.reason}" for b in rep.barriers[:20]]
    else:
        lines += ["", "barrier ops: none (the tracer understood every op)"]
    return "\n".join(lines)


def render_export(rep: ExportReport, out: str, max_rows: int) -> str:
    """``channelcut prune``: sizes before/after, groups, copies, changed producers."""
    changed = rep.changed_layers()
    rows = [[r.name, r.kind, r.before, r.after, ratio(r.after, r.before)] for r in changed[:max_rows]]
    b, a = rep.before, rep.after
    return "\n".join(
        [
            f"pruned {rep.model} ({rep.mode}, {rep.heuristic}): saved to {out}",
            "",
            format_table(
                ["", "before", "after", "kept"],
                [
                    ["parameters", fmt_int(b.params), fmt_int(a.params), ratio(a.params, b.params)],
                    ["MACs", fmt_int(b.macs), fmt_int(a.macs), ratio(a.macs, b.macs)],
                ],
            ),
            "",
            f"channel groups removed: {rep.removed_channel_groups} of {rep.total_channel_groups}; consumers reading a subset: "
            f"{rep.views} views, {rep.copies} copies ({rep.copied_channels} channels copied per inference)",
            "verified: the pruned model computes what the mock (masked) model computes" if rep.verified else "",
            "",
            _rows_or_more(
                format_table(["layer (producer)", "kind", "out before", "out after", "kept"], rows),
                max_rows, len(changed), "more (see report.json)",
            ),
            "",
            f"load it with: channelcut.load({out!r}, <the unpruned model>)",
        ]
    )


def render_bench(rep: BenchReport) -> str:
    """``channelcut bench``: dense against pruned, one row per measure."""
    d, p = rep.latency["dense"], rep.latency["pruned"]
    rows: List[List[str]] = [
        ["parameters", fmt_int(rep.dense.params), fmt_int(rep.pruned.params), ratio(rep.pruned.params, rep.dense.params)],
        ["MACs", fmt_int(rep.dense.macs), fmt_int(rep.pruned.macs), ratio(rep.pruned.macs, rep.dense.macs)],
        ["latency median (ms)", f"{d['median_ms']:.2f}", f"{p['median_ms']:.2f}", ratio(p["median_ms"], d["median_ms"])],
        ["latency p10-p90 (ms)", f"{d['p10_ms']:.2f}-{d['p90_ms']:.2f}", f"{p['p10_ms']:.2f}-{p['p90_ms']:.2f}", ""],
        ["channels copied / inference", "0", str(rep.copied_channels), ""],
    ]
    return "\n".join(
        [
            f"bench: {rep.source}; input {rep.input_shape}, {rep.threads} thread(s), median of {rep.repeats} interleaved calls",
            "",
            format_table(["", "dense", "pruned", "pruned/dense"], rows),
            "",
            f"speed-up: {rep.speedup:.2f}x",
        ]
    )


def render_backends(results: Sequence[Any]) -> str:
    """``channelcut export --check``: one row per :class:`channelcut.export.BackendResult`."""
    rows = [
        [r.backend, "ok" if r.ok else "FAILED", "-" if r.max_rel_diff is None else f"{r.max_rel_diff:.1e}", f"{r.seconds:.1f}", r.error or ""]
        for r in results
    ]
    return format_table(["backend", "result", "max rel diff", "s", "error"], rows)
