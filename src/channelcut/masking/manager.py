"""The front door for choosing channels: :class:`MaskingManager`.

>>> import torch
>>> from torch import nn
>>> from channelcut import MaskingManager, PruningManager
>>> from channelcut.importance import L1
>>> _ = torch.manual_seed(0)
>>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(),
...                     nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
>>> x = torch.rand(1, 3, 8, 8)
>>> masks = MaskingManager(net, [x]).importance(L1()).mask(amount=0.25)
>>> masks.selection.layers["2.weight"]
(16, 4)
>>> _ = PruningManager(net).compute([x]).prune()
>>> net[2].in_channels, net[0].out_channels
(12, 12)
"""

from __future__ import annotations

import difflib
import warnings
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn

from ..importance import L1, Importance, ScoringContext
from ..moe import split_experts
from .select import Selection, select_constrained, select_unconstrained
from .structure import Segment, Structure, build_structure

Inputs = Union[torch.Tensor, Sequence[Any], Dict[str, Any]]
Pair = Tuple[str, int]

MODES = ("unconstrained", "constrained")
SCOPES = ("local", "global")


class MaskingManager:
    """Choose channels to remove with an importance heuristic.

    Args:
        model: the model; only :meth:`mask` changes it (it zeroes weights).
        example_inputs: example inputs (a tensor, a list of positional inputs
            or a dict of keyword inputs). With them the model is traced once,
            which is needed for constrained selection, :meth:`segments`,
            :class:`~channelcut.importance.BNScale`, finding the classifier
            head exactly and keeping producers non-empty. Without them every
            ``nn.Conv*``/``nn.Linear`` module counts as a layer and the last
            one registered is taken as the head.

    A heuristic is set with :meth:`importance` (default:
    :class:`~channelcut.importance.L1`). :meth:`mask` zeroes the chosen input
    columns of each consumer weight; export them with
    ``PruningManager(model).compute(inputs).prune()``, which prunes all-zero
    columns. :meth:`select` returns the same choice as the
    ``(weight name, input channel)`` list that
    ``PruningManager.compute(pruned_inputs=...)`` takes, without touching the
    weights.
    """

    def __init__(self, model: nn.Module, example_inputs: Optional[Inputs] = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"MaskingManager needs a torch.nn.Module, got {type(model).__name__}")
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = [example_inputs]
        self.model = model
        self.example_inputs = example_inputs
        #: mixture-of-experts blocks rewritten as one MLP per expert (same
        #: function; see :func:`channelcut.moe.split_experts`)
        self.split_blocks: List[str] = split_experts(model)
        self._structure: Structure = build_structure(model, example_inputs)
        self._heuristic: Importance = L1()
        #: the last selection made by :meth:`select` or :meth:`mask`
        self.selection: Optional[Selection] = None

    # ------------------------------------------------------------------
    @property
    def head(self) -> Optional[str]:
        """Weight name of the classifier head (the layer producing the model
        output), ignored by default."""
        return self._structure.head

    def layers(self) -> Dict[str, int]:
        """Consumer weight name -> number of input channels, for every layer
        whose input channels can be masked (grouped convs excluded)."""
        return {n: r.channels for n, r in self._structure.consumers.items() if r.groups == 1}

    def segments(self) -> List[Segment]:
        """The segments of the traced model and their channel groups, for
        writing your own selection (needs example inputs)."""
        self._need_graph("segments()")
        return list(self._structure.segments)

    def importance(self, heuristic: Optional[Importance] = None) -> "MaskingManager":
        """Set the heuristic that scores channels (default: L1 magnitude, as
        in ``.importance().mask(0.3)``); returns ``self``."""
        if heuristic is None:
            heuristic = L1()
        if isinstance(heuristic, type) and issubclass(heuristic, Importance):
            raise TypeError(f"pass an instance, e.g. importance({heuristic.__name__}()), not the class")
        if not isinstance(heuristic, Importance):
            raise TypeError(f"importance() needs a channelcut.importance.Importance, got {type(heuristic).__name__}")
        self._heuristic = heuristic
        return self

    def scores(self) -> Dict[str, torch.Tensor]:
        """The current heuristic's raw score per input channel of each layer."""
        return self._heuristic.score_inputs(self._context())

    # ------------------------------------------------------------------
    def select(
        self,
        amount: float,
        mode: str = "unconstrained",
        scope: str = "local",
        round_to: Optional[int] = None,
        ignore: Optional[Iterable[str]] = None,
        layers: Optional[Iterable[str]] = None,
    ) -> List[Pair]:
        """Choose channels to remove and return them as ``(weight name, input channel)``
        pairs for ``PruningManager.compute(pruned_inputs=...)``. Weights are not changed.

        Args:
            amount: fraction of channels to remove, in ``[0, 1)``: of each
                layer's input channels (unconstrained, local), of each
                segment's removable channel groups (constrained, local) or of
                all of them together (``scope="global"``).
            mode: ``"unconstrained"`` (each layer picks its own input channels;
                export may read subsets) or ``"constrained"`` (whole channel
                groups, scored over all their layers: no copies at inference).
            scope: ``"local"`` (the same amount everywhere) or ``"global"``
                (one ranking over all layers, on normalised scores).
            round_to: keep each layer's (constrained: each segment's) channel
                count a multiple of this number; narrower layers are left alone.
            ignore: layers (module or weight names) that keep their width: their
                input channels are never masked and their output channels never
                removed (without example inputs only their inputs are kept:
                the readers of their outputs are unknown). ``None`` ignores the
                classifier head (:attr:`head`); pass ``[]`` to prune every layer.
            layers: only mask these layers (module or weight names). Default:
                every layer except those that read only the model's inputs
                (e.g. the first conv reading image channels).
        """
        amount, mode, scope, round_to = _check_args(amount, mode, scope, round_to)
        st = self._structure
        if mode == "constrained":
            self._need_graph('mode="constrained"')
        ignored = self._resolve(ignore, "ignore") if ignore is not None else ({st.head} if st.head else set())
        chosen = self._resolve(layers, "layers") if layers is not None else None
        in_scope = {
            n for n, r in st.consumers.items()
            if r.groups == 1 and r.channels >= 2 and n not in ignored
            and (n in chosen if chosen is not None else n not in st.input_layers)
        }
        protected = {n for n in st.producers if n in ignored}
        ctx = self._context(in_scope)
        h = self._heuristic
        raw_in = {k: v for k, v in h.score_inputs(ctx).items() if k in in_scope}
        for k, v in raw_in.items():
            if v.shape != (st.consumers[k].channels,):
                raise ValueError(
                    f"{h!r} returned {tuple(v.shape)} scores for {k!r}, which has {st.consumers[k].channels} input channels"
                )
        zero = {n: self._zero_columns(n) for n in in_scope}
        if mode == "unconstrained":
            unscored = sorted(in_scope - set(raw_in))
            sel = select_unconstrained(st, raw_in, zero, h.normalize, amount, scope, round_to, protected)
        else:
            raw_out = {k: v for k, v in h.score_outputs(ctx).items() if k in st.producers}
            sel, unscored = select_constrained(
                st, raw_in, raw_out, zero, h.normalize, amount, scope, round_to, in_scope, protected
            )
        if unscored and amount > 0:
            shown = ", ".join(unscored[:6]) + (", ..." if len(unscored) > 6 else "")
            warnings.warn(f"{h!r} could not score {len(unscored)} layer(s), which are not pruned: {shown}", stacklevel=3)
        self.selection = sel
        return list(sel.pruned_inputs)

    def mask(
        self,
        amount: float,
        mode: str = "unconstrained",
        scope: str = "local",
        round_to: Optional[int] = None,
        ignore: Optional[Iterable[str]] = None,
        layers: Optional[Iterable[str]] = None,
    ) -> "MaskingManager":
        """Like :meth:`select`, then zero the chosen input columns of each
        consumer weight in place. Returns ``self``; the choice is in
        :attr:`selection`."""
        pairs = self.select(amount, mode=mode, scope=scope, round_to=round_to, ignore=ignore, layers=layers)
        by_layer: Dict[str, List[int]] = defaultdict(list)
        for name, ch in pairs:
            by_layer[name].append(ch)
        with torch.no_grad():
            for name, chans in by_layer.items():
                ref = self._structure.consumers[name]
                idx = torch.tensor(chans, dtype=torch.long, device=ref.weight.device)
                ref.weight.index_fill_(ref.channel_dim, idx, 0)
            self._zero_unread_normed_channels()
        return self

    def _zero_unread_normed_channels(self) -> None:
        """A channel that an RMS norm normalises and that no consumer reads
        any more is removed by the export, and the norm rescaled: exact only
        when the channel is zero where it is made (its value counts in the
        norm of the others). So its producers' rows (and bias entries) are
        zeroed too, and the masked model is the model the export gives
        (DeepSeek's latent attention: a norm between ``kv_a_proj`` and
        ``kv_b_proj``)."""
        st = self._structure
        graph = st.graph
        if graph is None or not graph.rms_norms:
            return
        find = graph.sources.find
        normed = {find(a) for use in graph.rms_norms for a in use.ids if a >= 0}
        zero: Dict[str, List[bool]] = {}
        for g in st.groups:
            if g.id not in normed or g.pinned is not None or not g.consumers or not g.producers:
                continue
            for c, _ in g.consumers:
                if c in st.consumers and c not in zero:
                    zero[c] = self._zero_columns(c).tolist()
            if not all(zero[c][i] for c, i in g.consumers if c in st.consumers):
                continue
            if any(p not in st.producers for p, _ in g.producers):
                continue
            for p, j in g.producers:
                ref = st.producers[p]
                ref.weight.select(ref.channel_dim, j).zero_()
                if ref.bias is not None and ref.bias.dim() == 1 and ref.bias.numel() == ref.channels:
                    ref.bias[j] = 0

    # ------------------------------------------------------------------
    def _context(self, consumers: Optional[Set[str]] = None) -> ScoringContext:
        st = self._structure
        cons = st.consumers if consumers is None else {n: r for n, r in st.consumers.items() if n in consumers}
        return ScoringContext(self.model, cons, st.producers, self.example_inputs, st.graph)

    def _need_graph(self, what: str) -> None:
        if self._structure.graph is None:
            raise ValueError(f"{what} needs the traced model: create MaskingManager(model, example_inputs=[x])")

    def _zero_columns(self, name: str) -> torch.Tensor:
        ref = self._structure.consumers[name]
        w = ref.weight.detach()
        dims = tuple(d for d in range(w.dim()) if d != ref.channel_dim)
        return (w == 0).all(dim=dims).cpu() if dims else (w == 0).cpu()

    def _resolve(self, names: Iterable[str], what: str) -> Set[str]:
        if isinstance(names, str):
            names = [names]
        valid = self._structure.names()
        out: Set[str] = set()
        for n in names:
            if not isinstance(n, str):
                raise ValueError(f"{what} takes layer names (strings), got {n!r}")
            if n in valid:
                w = valid[n]
                out.add(w)
                continue
            close = difflib.get_close_matches(n, list(valid), n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            shown = ", ".join(sorted(valid)[:10]) + (", ..." if len(valid) > 10 else "")
            raise ValueError(f"{what}: unknown layer {n!r}.{hint} Valid names (module or weight): {shown}")
        return out


def _check_args(amount: Any, mode: Any, scope: Any, round_to: Any) -> Tuple[float, str, str, Optional[int]]:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 <= float(amount) < 1:
        raise ValueError(f"amount must be a fraction in [0, 1) (0.3 removes 30% of the channels), got {amount!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(repr(m) for m in MODES)}, got {mode!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(repr(s) for s in SCOPES)}, got {scope!r}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive integer (e.g. 8) or None, got {round_to!r}")
    return float(amount), mode, scope, round_to
