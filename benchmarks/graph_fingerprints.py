"""Dump what the engine makes of a fixed set of models, to compare two versions.

For each model: the traced graph's fingerprint (atoms, groups, pins with
their reasons, producers, consumers, parameter uses, needs, attribute
records, barriers: ``export_props.graph_fingerprint``), the warnings tracing
gave, and the resolved spec (``spec.to_dict()``) of a fixed seeded request,
or the error it raised. The models: ``--nets`` random networks
(``tests/randnet.py``, with the request of ``export_props.make_request``) and
a dozen zoo models of ``tests/test_zoo.py`` (30% of every consumer's inputs,
unconstrained and constrained), and every op-rule case of
``tests/test_op_rules.py`` (the graph, the atom of every output element and
the rules that ran: each rule's path, barriers and reasons included).

A refactoring of the engine must leave this file byte for byte the same::

    PYTHONPATH=OLD/src python benchmarks/graph_fingerprints.py --tests OLD/tests -o old.json
    PYTHONPATH=src python benchmarks/graph_fingerprints.py -o new.json
    cmp old.json new.json

(``--tests`` points at the test helpers that go with the code under test.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from typing import Any, Dict, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

ZOO = (
    "tv-resnet18", "tv-mobilenet_v3_small", "tv-shufflenet_v2_x0_5", "tv-regnet_x_400mf", "tv-densenet121",
    "tv-convnext_small_config", "tv-vit_small_config", "tv-resnet18_fpn_backbone", "timm-mixnet_s",
    "timm-swin_tiny", "timm-levit_128s", "timm-eva02_tiny", "timm-mobilevitv2_050", "timm-skresnet18",
)


def _plain(o: Any) -> Any:
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o, key=repr)
    return repr(o)


def _run(manager: Any, inputs: Any, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Trace and compute; the fingerprint, the warnings and the spec (or error)."""
    from export_props import graph_fingerprint

    rec: Dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = manager.trace(inputs)
    rec["graph"] = graph_fingerprint(graph)
    rec["warnings"] = [str(w.message) for w in caught]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            manager.compute(inputs, **kwargs)
        rec["spec"] = manager.spec.to_dict()
    except Exception as exc:  # a rejection is part of the behaviour
        rec["error"] = f"{type(exc).__name__}: {exc}"
    return rec


def random_nets(n: int) -> Dict[str, Any]:
    from channelcut import PruningManager
    from export_props import make_request
    from randnet import make_net

    out = {}
    for seed in range(n):
        torch.manual_seed(seed)
        net, inputs = make_net(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            req = make_request(seed, net, inputs)
        out[f"randnet-{seed}"] = _run(PruningManager(net), inputs, req.kwargs())
    return out


def zoo_models(names: List[str]) -> Dict[str, Any]:
    from channelcut import PruningManager
    from test_zoo import MODELS, SEED, _request

    out = {}
    for mid, build, size in MODELS:
        if mid not in names:
            continue
        for constrained in (False, True):
            torch.manual_seed(SEED)
            net = build().double().eval()
            x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)
            m = PruningManager(net)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m.trace([x])
                pruned = _request(m.consumers())
            out[f"{mid}-{'constrained' if constrained else 'unconstrained'}"] = _run(
                m, [x], dict(pruned_inputs=pruned, constrained=constrained))
    return out


def op_cases() -> Dict[str, Any]:
    from export_props import graph_fingerprint
    from op_oracle import trace_case
    from test_op_rules import CASES

    out = {}
    for case in CASES:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                t = trace_case(case)
            except Exception as exc:
                out[f"op-{case.id}"] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
        out[f"op-{case.id}"] = {
            "graph": graph_fingerprint(t.graph), "claims": [c.tolist() for c in t.claims], "vdims": t.vdims,
            "rules": sorted(t.hits), "warnings": [str(w.message) for w in caught],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tests", default=os.path.join(HERE, "..", "tests"), help="the test helpers' folder")
    ap.add_argument("--nets", type=int, default=300, help="random networks (seeds 0..N-1)")
    ap.add_argument("--zoo", default=",".join(ZOO), help="comma-separated test_zoo model ids ('' for none)")
    ap.add_argument("--no-ops", action="store_true", help="leave out the op-rule cases")
    ap.add_argument("-o", "--out", default="graph_fingerprints.json")
    a = ap.parse_args()
    sys.path.insert(0, os.path.abspath(a.tests))
    torch.set_num_threads(1)
    result = random_nets(a.nets)
    result.update(zoo_models([z for z in a.zoo.split(",") if z]))
    if not a.no_ops:
        result.update(op_cases())
    with open(a.out, "w") as f:
        json.dump(result, f, default=_plain, separators=(",", ":"))
    print(f"{len(result)} models -> {a.out}")


if __name__ == "__main__":
    main()
