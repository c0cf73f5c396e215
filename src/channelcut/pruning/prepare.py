"""The user's model as export takes it. Start at :func:`unwrap_model`.

- :func:`unwrap_model`: ``nn.DataParallel`` / ``DistributedDataParallel`` and
  ``torch.compile`` wrappers are peeled off; export traces and prunes the
  module inside, which the wrapper keeps holding (a compiled wrapper
  recompiles on its next call: dynamo guards on parameter shapes).
  :func:`add_prefix_aliases` lets requests name parameters with the
  wrapper's prefix (``module.`` / ``_orig_mod.``) too.
- :func:`reparametrized_weights`: weights computed on every call
  (``torch.nn.utils.parametrize``, the hook-based ``weight_norm`` /
  ``spectral_norm``) are kept as they are (their layers keep their channels,
  with a warning); a request that names one is refused with what to do
  instead (:func:`refuse_reparametrized`). Modules compiled in place
  (``module.compile()``) are refused.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

from torch import nn

from ..errors import ExportError, NotPrunableError, TracingError
from .graph import TracedGraph


def unwrap_model(net: nn.Module) -> Tuple[nn.Module, str]:
    """The module inside any DataParallel / DistributedDataParallel /
    ``torch.compile`` wrappers of ``net``, and the prefix those wrappers add to
    parameter names (``""`` for a plain module).

    >>> inner = nn.Linear(2, 3)
    >>> m, prefix = unwrap_model(nn.DataParallel(inner))
    >>> m is inner, prefix
    (True, 'module.')
    """
    prefix = ""
    while True:
        if isinstance(net, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            net, prefix = net.module, prefix + "module."
        elif type(net).__name__ == "OptimizedModule" and isinstance(getattr(net, "_orig_mod", None), nn.Module):
            net, prefix = net._orig_mod, prefix + "_orig_mod."
        else:
            return net, prefix


def add_prefix_aliases(graph: TracedGraph, prefix: str) -> None:
    """Every parameter name of ``graph`` also answers to ``prefix + name``
    (the name it has in the wrapper's ``named_parameters()``)."""
    if not prefix:
        return
    for name in list(graph.param_shapes):
        graph.param_aliases.setdefault(prefix + name, graph.param_aliases.get(name, name))


def reparametrized_weights(net: nn.Module) -> Dict[str, str]:
    """Weights recomputed on every call (``torch.nn.utils.parametrize``, the
    hook-based ``weight_norm`` / ``spectral_norm``): every name a request
    could use for one (``conv.weight``, ``conv.parametrizations.weight.original0``,
    ``conv.weight_g``, ...) -> a description of it. Export can not slice such
    a weight: its layer reads a computed weight, so its channels are kept.

    Refuses modules compiled in place (``module.compile()``), which export
    can not run eagerly."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    found: Dict[str, str] = {}
    compiled: List[str] = []
    for name, m in net.named_modules():
        prefix = f"{name}." if name else ""
        if parametrize.is_parametrized(m):
            for tensor, plist in m.parametrizations.items():
                what = f"{prefix}{tensor} (parametrized: {', '.join(type(p).__name__ for p in plist)})"
                found[prefix + tensor] = what
                for pname, _ in plist.named_parameters():
                    found[f"{prefix}parametrizations.{tensor}.{pname}"] = what
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, (WeightNorm, SpectralNorm)):
                what = f"{prefix}{hook.name} ({type(hook).__name__} hook)"
                for suffix in ("", "_g", "_v", "_orig", "_u", "_v"):
                    found[f"{prefix}{hook.name}{suffix}"] = what
        if getattr(m, "_compiled_call_impl", None) is not None:
            compiled.append(name or "<model>")
    if compiled:
        raise TracingError(
            f"channelcut can not export this model as it is: modules compiled in place with module.compile(): "
            f"{_listed(compiled)}. Export must run them eagerly: prune before calling .compile(), or compile a "
            "wrapper, torch.compile(model), which channelcut unwraps.")
    return found


def refuse_reparametrized(found: Dict[str, str], names: List[str]) -> None:
    """A request that names a recomputed weight gets what to do instead."""
    hit = sorted({found[n] for n in names if n in found})
    if hit:
        raise NotPrunableError(
            f"{_listed(hit)} is recomputed on every call, so export can not slice it. Bake it into a plain "
            "weight first (it keeps the current values): torch.nn.utils.parametrize.remove_parametrizations("
            "module, 'weight'), torch.nn.utils.remove_weight_norm(module) or "
            "torch.nn.utils.remove_spectral_norm(module)")


def _listed(names: List[str]) -> str:
    return ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")


def refuse_offloaded(net: nn.Module, names: Iterable[str]) -> None:
    """``prune()`` slices tensors in place; a layer that accelerate offloads
    (``dispatch_model`` / ``device_map`` with ``"cpu"`` or ``"disk"`` entries
    on a model whose main device is another) keeps its weights in a weights
    map and loads them into a fresh tensor before each forward, so slicing
    the module's tensor would not prune what runs. Refused before anything
    changes, with the paths that work."""
    hit = []
    for mname, m in net.named_modules():
        hook = getattr(m, "_hf_hook", None)
        if hook is not None and (getattr(hook, "offload", False) or getattr(hook, "weights_map", None) is not None):
            prefix = f"{mname}." if mname else ""
            if any(n.startswith(prefix) for n in names):
                hit.append(mname or "<model>")
    if hit:
        raise ExportError(
            f"layers {_listed(hit)} are offloaded by accelerate: their weights live in its weights map (CPU or disk) "
            "and are loaded for each forward, so prune() can not slice them in place. The plan from compute() is "
            "fine: write the pruned checkpoint with channelcut.hf.prune_pretrained(src_dir, dst_dir, ...) (it reads "
            "and slices one tensor at a time from disk), or load the model without offloading and prune it")
