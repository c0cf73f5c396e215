"""The user's model as export takes it. Start at :func:`unwrap_model`.

- :func:`unwrap_model`: ``nn.DataParallel`` / ``DistributedDataParallel`` and
  ``torch.compile`` wrappers are peeled off; export traces and prunes the
  module inside, which the wrapper keeps holding (a compiled wrapper
  recompiles on its next call: dynamo guards on parameter shapes).
  :func:`add_prefix_aliases` lets requests name parameters with the
  wrapper's prefix (``module.`` / ``_orig_mod.``) too.
- :func:`check_weight_reparametrizations`: weights computed on every call
  (``torch.nn.utils.parametrize``, the hook-based ``weight_norm`` /
  ``spectral_norm``) or modules compiled in place (``module.compile()``) are
  refused with what to do instead.
"""

from __future__ import annotations

from typing import List, Tuple

from torch import nn

from ..errors import TracingError
from .trace import TracedGraph


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


def check_weight_reparametrizations(net: nn.Module) -> None:
    """Refuse weights that are recomputed on every call, and modules compiled
    in place: export slices plain parameters, and must run the eager module."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    found: List[str] = []
    hooks: List[str] = []
    compiled: List[str] = []
    for name, m in net.named_modules():
        where = name or "<model>"
        if parametrize.is_parametrized(m):
            for tensor, plist in m.parametrizations.items():
                kinds = ", ".join(type(p).__name__ for p in plist)
                found.append(f"{where}.{tensor} ({kinds})")
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, (WeightNorm, SpectralNorm)):
                hooks.append(f"{where}.{hook.name} ({type(hook).__name__})")
        if getattr(m, "_compiled_call_impl", None) is not None:
            compiled.append(where)
    problems = []
    if found:
        problems.append(
            f"weights parametrised with torch.nn.utils.parametrize: {_listed(found)}. Bake them into plain "
            "weights first: torch.nn.utils.parametrize.remove_parametrizations(module, 'weight') for each "
            "(it keeps the current values)")
    if hooks:
        problems.append(
            f"weights recomputed by the hook-based weight_norm / spectral_norm: {_listed(hooks)}. Remove them "
            "first: torch.nn.utils.remove_weight_norm(module) / torch.nn.utils.remove_spectral_norm(module) "
            "(they keep the current values)")
    if compiled:
        problems.append(
            f"modules compiled in place with module.compile(): {_listed(compiled)}. Export must run them "
            "eagerly: prune before calling .compile(), or compile a wrapper, torch.compile(model), which "
            "channelcut unwraps")
    if problems:
        raise TracingError("channelcut can not export this model as it is: " + "; ".join(problems) + ".")


def _listed(names: List[str]) -> str:
    return ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
