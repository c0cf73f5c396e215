"""The one "model exactly as before" helper: :func:`snapshot` records
everything a failed (or read-only) call must leave unchanged,
:func:`diff_snapshot` lists what changed, :func:`assert_unchanged` and
:func:`raises_unchanged` assert it (invariants 2 and 3 of DESIGN.md).
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch
from torch import nn

from channelcut import ChannelcutError


_HOOK_DICTS = (
    "_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


def global_hook_counts() -> Dict[str, int]:
    """How many global module hooks torch holds, by kind."""
    mm = torch.nn.modules.module
    names = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_hooks",
             "_global_backward_pre_hooks", "_global_forward_hooks_always_called")
    return {n: len(getattr(mm, n)) for n in names if hasattr(mm, n)}


def _brief(v: Any) -> Any:
    """A module attribute as compared by :func:`snapshot`: tensors by identity."""
    if isinstance(v, torch.Tensor):
        return ("tensor", id(v))
    if isinstance(v, (list, tuple)) and any(isinstance(o, torch.Tensor) for o in v):
        return (type(v).__name__, tuple(_brief(o) for o in v))
    return repr(v)


def snapshot(net: nn.Module) -> Dict[str, Any]:
    """Everything a failed (or read-only) call must leave unchanged: tensor
    objects, values, types and attributes; every module's class, identity,
    mode, attributes (and the repr of the public ones), hooks and children;
    global hooks; the structure and the state_dict keys."""
    tensors = {}
    for k, v in list(net.named_parameters(remove_duplicate=False)) + list(net.named_buffers(remove_duplicate=False)):
        tensors[k] = (id(v), v.detach().clone(), v.dtype, tuple(v.shape), v.requires_grad, type(v), v.grad is None,
                      sorted(vars(v)))
    modules = {}
    for name, m in net.named_modules(remove_duplicate=False):
        hooks = {h: len(getattr(m, h, {}) or {}) for h in _HOOK_DICTS}
        public = {k: _brief(v) for k, v in vars(m).items() if not k.startswith("_")}
        modules[name] = (type(m), id(m), m.training, sorted(vars(m)), public, hooks,
                         sorted(m._parameters), sorted(m._buffers), sorted(m._modules))
    return {"repr": repr(net), "tensors": tensors, "modules": modules, "global_hooks": global_hook_counts(),
            "state_keys": list(net.state_dict().keys())}


def diff_snapshot(net: nn.Module, snap: Dict[str, Any]) -> List[str]:
    """Differences between ``net`` now and ``snap`` (empty list: unchanged)."""
    now = snapshot(net)
    out = []
    if now["repr"] != snap["repr"]:
        out.append("module structure (repr) changed")
    if now["state_keys"] != snap["state_keys"]:
        out.append(f"state_dict keys changed: {snap['state_keys']} -> {now['state_keys']}")
    if now["global_hooks"] != snap["global_hooks"]:
        out.append(f"global module hooks left behind: {snap['global_hooks']} -> {now['global_hooks']}")
    for k, before in snap["tensors"].items():
        after = now["tensors"].get(k)
        if after is None:
            out.append(f"tensor {k} disappeared")
            continue
        if after[0] != before[0]:
            out.append(f"tensor {k} was replaced by a new object")
        if after[2:7] != before[2:7]:
            out.append(f"tensor {k} dtype/shape/requires_grad/type/grad changed: {before[2:7]} -> {after[2:7]}")
        elif not torch.equal(after[1], before[1]):
            out.append(f"tensor {k} values changed")
        if after[7] != before[7]:
            out.append(f"attributes {sorted(set(after[7]) - set(before[7]))} left on tensor {k}")
    for k in now["tensors"]:
        if k not in snap["tensors"]:
            out.append(f"new tensor {k}")
    if now["modules"] != snap["modules"]:
        for name in sorted(set(now["modules"]) | set(snap["modules"])):
            if now["modules"].get(name) != snap["modules"].get(name):
                out.append(f"module {name or '<root>'} changed (class, attributes, hooks, training flag or children): "
                           f"{snap['modules'].get(name)} -> {now['modules'].get(name)}")
    return out


def assert_unchanged(net: nn.Module, before: Dict[str, Any], what: str = "") -> None:
    """``net`` is exactly as in the snapshot ``before``."""
    diffs = diff_snapshot(net, before)
    assert not diffs, f"{what}: " + "; ".join(diffs)


def raises_unchanged(net: nn.Module, exc_type: type, fn: Any, *match: str) -> ChannelcutError:
    """``fn()`` raises ``exc_type`` (a ChannelcutError) whose message contains
    every ``match``, and leaves ``net`` exactly as before. Returns the error."""
    import pytest

    before = snapshot(net)
    with pytest.raises(exc_type) as info:
        fn()
    assert isinstance(info.value, ChannelcutError)
    msg = str(info.value)
    for m in match:
        assert m in msg, f"{m!r} not in the error message: {msg}"
    assert_unchanged(net, before, f"after {exc_type.__name__}")
    return info.value
