"""Channel importance heuristics: which channels matter, as one score per channel.

Start at :class:`Importance`; :class:`channelcut.masking.MaskingManager` is the
usual way to use one::

    from channelcut import MaskingManager
    from channelcut.importance import LAMP
    MaskingManager(model).importance(LAMP()).mask(amount=0.3)

Every heuristic scores the **input channels of consumers** (conv/linear
layers whose input columns can be cut): a higher score means "keep".  This is
the unconstrained view of UPSCALE (Wan et al., "UPSCALE: Unconstrained Channel
Pruning", ICML 2023, arXiv:2307.08771): each layer may pick its own inputs.
Weight-based heuristics can also score the **output channels of producers**
(the classic filter view); constrained selection averages both over all layers
of a channel group.

=============  ===========  ================================================
heuristic      needs        idea
=============  ===========  ================================================
:class:`L1`    weights      sum of absolute weights of the channel
:class:`L2`    weights      Euclidean norm of the channel's weights
:class:`LAMP`  weights      squared norm over the norms of larger channels
:class:`FPGM`  weights      distance to the layer's other channels
:class:`HRank` data         rank of the channel's feature maps
:class:`ActivationNorm` data  norm of the channel's activations (Minitron)
:class:`Wanda` data, weights  weight magnitude times activation norm
:class:`Taylor` loss, data  first-order estimate of the loss change
:class:`BNScale` tracing    scale of the BatchNorm that follows the channel
=============  ===========  ================================================

The code is written from the papers' ideas; no code was taken from their
reference implementations.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

__all__ = [
    "Importance",
    "LayerRef",
    "ScoringContext",
    "L1",
    "L2",
    "LAMP",
    "FPGM",
    "HRank",
    "ActivationNorm",
    "Wanda",
    "Taylor",
    "BNScale",
    "Given",
    "ChannelSquares",
    "lamp_normalize",
]

Inputs = Union[torch.Tensor, Sequence[Any], Dict[str, Any]]


@dataclass
class LayerRef:
    """One scored weight: the input channels of a consumer or the output
    channels of a producer.

    ``channel_dim`` is the weight dimension that holds the scored channels
    (1 for the inputs of conv/linear weights, 0 for their outputs; swapped for
    transposed convs).
    """

    name: str  # weight parameter name, e.g. "layer1.0.conv1.weight"
    module_name: str
    module: Optional[nn.Module]
    weight: torch.Tensor
    channel_dim: int
    channels: int
    groups: int = 1
    bias: Optional[torch.Tensor] = None

    def channel_matrix(self) -> torch.Tensor:
        """The weight as a ``(channels, everything else)`` float matrix (detached)."""
        w = self.weight.detach()
        return w.movedim(self.channel_dim, 0).reshape(w.shape[self.channel_dim], -1).double()


@dataclass
class ScoringContext:
    """What a heuristic may look at. Built by :class:`~channelcut.masking.MaskingManager`.

    ``graph`` is the :class:`~channelcut.pruning.graph.TracedGraph` of the model
    when example inputs were given, else ``None``.
    """

    model: nn.Module
    consumers: Dict[str, LayerRef]
    producers: Dict[str, LayerRef] = field(default_factory=dict)
    example_inputs: Optional[Inputs] = None
    graph: Any = None


def _run(model: nn.Module, inputs: Inputs) -> Any:
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs)


def lamp_normalize(scores: torch.Tensor) -> torch.Tensor:
    """LAMP-normalise one layer's non-negative scores (Lee et al., ICLR 2021).

    With the channels sorted by ascending score ``s``, channel ``u`` gets
    ``s_u^2 / sum_{v >= u} s_v^2``: order within the layer is preserved, the
    largest channel of every layer gets 1, so one global ranking across layers
    never empties a layer first and compares layers of different scales.

    >>> lamp_normalize(torch.tensor([3.0, 1.0, 2.0])).tolist()
    [1.0, 0.07142857142857142, 0.3076923076923077]
    """
    s = scores.detach().double().flatten()
    if s.numel() == 0:
        return s
    sq = s * s
    order = torch.argsort(sq, stable=True)
    sorted_sq = sq[order]
    tail = torch.flip(torch.cumsum(torch.flip(sorted_sq, [0]), 0), [0])
    norm = torch.where(tail > 0, sorted_sq / torch.where(tail > 0, tail, torch.ones_like(tail)), torch.zeros_like(tail))
    out = torch.empty_like(s)
    out[order] = norm
    return out


class Importance(abc.ABC):
    """Base class of the heuristics. Higher scores mean more important.

    Subclasses implement :meth:`score_inputs` (one 1-D tensor per consumer
    weight, one entry per input channel) and may implement
    :meth:`score_outputs` (same for producers' output channels). A layer left
    out of the returned dict could not be scored and is not pruned.
    """

    #: whether the heuristic runs the model on data
    needs_data: bool = False

    @abc.abstractmethod
    def score_inputs(self, ctx: ScoringContext) -> Dict[str, torch.Tensor]:
        """Scores of the consumers' input channels, by consumer weight name."""

    def score_outputs(self, ctx: ScoringContext) -> Dict[str, torch.Tensor]:
        """Scores of the producers' output channels (default: none)."""
        return {}

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        """Make one layer's scores comparable with other layers' (order-preserving).

        Used by global selection and to combine layers in constrained
        selection. Default: :func:`lamp_normalize`.
        """
        return lamp_normalize(scores)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Given(Importance):
    """Scores computed elsewhere: ``{consumer weight name: score per input
    channel}``, e.g. :func:`channelcut.calibrate.calibrate_pretrained`'s
    (scored from a checkpoint on disk, one layer at a time) or your own.
    Layers it has no scores for are not pruned (``select`` warns); a score
    vector of the wrong length is an error there.

    >>> import torch
    >>> from torch import nn
    >>> from channelcut import MaskingManager
    >>> net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    >>> mm = MaskingManager(net).importance(Given({"2.weight": torch.tensor([5., 1, 4, 0, 3, 2])}))
    >>> mm.select(0.5, layers=["2"], ignore=[])
    [('2.weight', 1), ('2.weight', 3), ('2.weight', 5)]
    """

    def __init__(self, scores: Dict[str, torch.Tensor]) -> None:
        if not isinstance(scores, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in scores.items()):
            raise TypeError("Given takes a dict {weight name: tensor of scores, one per input channel}")
        self.scores = {k: v.detach().flatten() for k, v in scores.items()}

    def score_inputs(self, ctx: ScoringContext) -> Dict[str, torch.Tensor]:
        return {k: v for k, v in self.scores.items() if k in ctx.consumers}

    def __repr__(self) -> str:
        return f"Given({len(self.scores)} layers)"


# ---------------------------------------------------------------------------
# weight magnitude
# ---------------------------------------------------------------------------


class _WeightImportance(Importance):
    """Scores computed from each channel's weight vector alone."""

    def _score(self, matrix: torch.Tensor) -> torch.Tensor:  # (channels, k) -> (channels,)
        raise NotImplementedError

    def score_inputs(self, ctx: ScoringContext) -> Dict[str, torch.Tensor]:
        return {name: self._score(ref.channel_matrix()) for name, ref in ctx.consumers.items() if ref.groups == 1}

    def score_outputs(self, ctx: ScoringContext) -> Dict[str, torch.Tensor]:
        out = {}
        for name, ref in ctx.producers.items():
            if ref.groups != 1:
                continue
            m = ref.channel_matrix()
            if ref.bias is not None and ref.bias.shape == (m.shape[0],):
                m = torch.cat([m, ref.bias.detach().double()[:, None]], 1)
            out[name] = self._score(m)
        return out


class L1(_WeightImportance):
    """L1 norm of the channel's weights: ``sum |w|``.

    Li, Kadav, Durdanovic, Samet and Graf, "Pruning Filters for Efficient
    ConvNets", ICLR 2017 (arXiv:1608.08710). The paper ranks a layer's filters
    by the L1 norm of their weights and removes the smallest.
    """

    def _score(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.abs().sum(1)


class L2(_WeightImportance):
    """L2 norm of the channel's weights: ``sqrt(sum w^2)``.

    He, Kang, Dong, Fu and Yang, "Soft Filter Pruning for Accelerating Deep
    Convolutional Neural Networks", IJCAI 2018 (arXiv:1808.06866), which ranks
    filters by their L2 norm.
    """

    def _score(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.pow(2).sum(1).sqrt()


class LAMP(_WeightImportance):
    """Layer-adaptive magnitude pruning score.

    Lee, Park, Mo, Ahn and Shin, "Layer-adaptive Sparsity for the
    Magnitude-based Pruning", ICLR 2021 (arXiv:2010.07611). A channel's squared
    L2 norm divided by the sum of the squared norms of the channels at least as
    large in the same layer (:func:`lamp_normalize`). Within a layer it ranks
    like :class:`L2`; with ``scope="global"`` it chooses per-layer amounts.
    """

    def _score(self, matrix: torch.Tensor) -> torch.Tensor:
        return lamp_normalize(matrix.pow(2).sum(1).sqrt())

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.detach().double()  # already layer-normalised


class FPGM(_WeightImportance):
    """Filter pruning via the geometric median.

    He, Liu, Wang, Hu and Yang, "Filter Pruning via Geometric Median for Deep
    Convolutional Neural Networks Acceleration", CVPR 2019 (arXiv:1811.00250).
    Channels close to the geometric median of their layer can be represented
    by the others, whatever their norm. The geometric median minimises the sum
    of distances to all channels, so a channel's score is its summed Euclidean
    distance to the other channels of the layer: the most central ones (lowest
    score) are removed first.
    """

    def _score(self, matrix: torch.Tensor) -> torch.Tensor:
        return torch.cdist(matrix[None], matrix[None])[0].sum(1)


# ---------------------------------------------------------------------------
# data driven
# ---------------------------------------------------------------------------


def _as_batches(data: Any, what: str) -> List[Any]:
    if data is None:
        return []
    if isinstance(data, (torch.Tensor, dict)):
        return [data]
    return list(data)


def _scored_modules(ctx: ScoringContext) -> Dict[str, List[str]]:
    """Module -> consumer weight names whose input is the module's first input."""
    by_module: Dict[str, List[str]] = {}
    for name, ref in ctx.consumers.items():
        if ref.groups != 1 or ref.module is None:
            continue
        if not isinstance(ref.module, (nn.Linear, nn.modules.conv._ConvNd)) or ref.name != (
            f"{ref.module_name}.weight" if ref.module_name else "weight"
        ):
            continue
        by_module.setdefault(ref.module_name, []).append(name)
    return by_module


class _DataImportance(Importance):
    """A heuristic that reads what each scored layer receives on data: the
    batches (``data``, else the manager's example inputs, at most
    ``max_batches``) and a run of the model with a forward pre-hook on each
    scored module (:func:`_scored_modules`)."""

    needs_data = True
    #: what the heuristic needs the data for, in its error message
    _needs = "example data"

    def __init__(self, data: Optional[Iterable[Inputs]] = None, max_batches: Optional[int] = None) -> None:
        if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
            raise ValueError(f"max_batches must be a positive integer or None, got {max_batches!r}")
        self.data = data
        self.max_batches = max_batches

    def _batches(self, ctx: ScoringContext) -> List[Any]:
        batches = _as_batches(self.data, "data")
        if not batches and ctx.example_inputs is not None:
            batches = [ctx.example_inputs]
        if not batches:
            name = type(self).__name__
            raise ValueError(f"{name} needs {self._needs}: pass {name}(data=[x, ...]) "
                             "or MaskingManager(model, example_inputs=[x])")
        return batches if self.max_batches is None else batches[: self.max_batches]

    def _run_hooked(self, ctx: ScoringContext, hook_for: Callable[[str], Callable]) -> Dict[str, List[str]]:
        """Run the model in eval mode on the batches with ``hook_for(module
        name)`` as a forward pre-hook on every scored module; returns the
        scored modules (module -> consumer weight names)."""
        batches = self._batches(ctx)
        by_module = _scored_modules(ctx)
        handles = [ctx.model.get_submodule(m).register_forward_pre_hook(hook_for(m)) for m in by_module]
        was_training = ctx.model.training
        try:
            ctx.model.eval()
            with torch.no_grad():
                for batch in batches:
                    _run(ctx.model, batch)
        finally:
            for h in handles:
                h.remove()
            ctx.model.train(was_training)
        return by_module


class HRank(_DataImportance):
    """Average rank of the channel's feature maps on example data.

    Lin, Ji, Wang, Zhang, Zhang, Tian and Shao, "HRank: Filter Pruning using
    High-Rank Feature Map", CVPR 2020 (arXiv:2002.10179). The rank of a
    channel's feature map barely depends on the image, and low-rank maps carry
    little information: channels whose maps have low average rank are removed.

    The scored feature map is what each consumer reads (e.g. after BatchNorm
    and ReLU). For inputs with two or more spatial dimensions the map of one
    sample is the ``(H, W)`` matrix (leading spatial dims folded into ``H``).
    Inputs without two spatial dimensions (linear layers on tokens) have maps
    of rank 0 or 1; ties in rank are broken by the channel's mean absolute
    activation (scaled below 0.5, so it never outweighs one rank step).

    Args:
        data: an iterable of model inputs (each a tensor, a list of positional
            inputs or a dict of keyword inputs). Defaults to the manager's
            example inputs.
        max_batches: use at most this many batches of ``data``.
    """

    _needs = "example data to compute feature-map ranks"

    def score_inputs(self, ctx: ScoringContext) -> Dict[str, torch.Tensor]:
        ranks: Dict[str, torch.Tensor] = {}
        energy: Dict[str, torch.Tensor] = {}
        counts: Dict[str, int] = {}

        def hook_for(mname: str) -> Callable:
            def hook(module: nn.Module, args: Any) -> None:
                x = args[0].detach()
                if not isinstance(x, torch.Tensor) or x.dim() < 2:
                    return
                if isinstance(module, nn.Linear):
                    x = x.reshape(-1, x.shape[-1])[None].transpose(1, 2)  # (1, C, tokens)
                    n = 1
                else:
                    n = x.shape[0]
                r, e = _map_ranks(x.double())
                ranks[mname] = ranks.get(mname, 0) + r * n
                energy[mname] = energy.get(mname, 0) + e * n
                counts[mname] = counts.get(mname, 0) + n

            return hook

        by_module = self._run_hooked(ctx, hook_for)
        out: Dict[str, torch.Tensor] = {}
        for mname, names in by_module.items():
            if mname not in counts:
                continue
            r = ranks[mname] / counts[mname]
            e = energy[mname] / counts[mname]
            score = r + 0.49 * e / (e.max() + 1e-30) if e.numel() else r
            for name in names:
                if score.numel() == ctx.consumers[name].channels:
                    out[name] = score
        return out


class ChannelSquares:
    """Running sum of squares of each input channel of hooked modules, and
    the token count: a forward pre-hook per module (:meth:`hook`), one
    float64 vector per key. The channel dim is the last for ``nn.Linear``,
    dim 1 otherwise (convolutions); inputs under 2-D are skipped. Used by
    :class:`ActivationNorm` and by :func:`channelcut.calibrate.calibrate_pretrained`."""

    def __init__(self) -> None:
        self.sums: Dict[str, torch.Tensor] = {}
        self.counts: Dict[str, int] = {}

    def hook(self, key: str) -> Callable:
        def pre(module: nn.Module, args: Any) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or x.dim() < 2:
                return
            dim = -1 if isinstance(module, nn.Linear) else 1
            x = x.detach().movedim(dim, -1)
            x = x.reshape(-1, x.shape[-1]).double()
            self.sums[key] = self.sums[key] + (x * x).sum(0) if key in self.sums else (x * x).sum(0)
            self.counts[key] = self.counts.get(key, 0) + x.shape[0]

        return pre

    def rms(self, key: str) -> torch.Tensor:
        return (self.sums[key] / max(self.counts[key], 1)).sqrt()

    def all_rms(self) -> Dict[str, torch.Tensor]:
        return {k: self.rms(k) for k in self.sums}


class ActivationNorm(_DataImportance):
    """Norm of each input channel's activations on calibration data.

    The activation-based importance of Minitron (Muralidharan, Sreenivas,
    Joshi et al., "Compact Language Models via Pruning and Knowledge
    Distillation", 2024, arXiv:2407.14679): a channel that carries little
    signal on real inputs matters little, whatever its weights. The score of
    input channel ``c`` of a consumer is the root mean square of what the
    consumer reads on channel ``c``, over every position (batch, tokens,
    pixels) of every calibration batch.

    Scoring keeps one running sum per input channel: the memory it needs
    beyond a forward pass is one vector per layer, so calibrating a large
    model costs what running it costs.

    Args:
        data: an iterable of model inputs (each a tensor, a list of positional
            inputs or a dict of keyword inputs): the calibration batches.
            Defaults to the manager's example inputs.
        max_batches: use at most this many batches of ``data``.

    >>> import torch
    >>> from torch import nn
    >>> from channelcut import MaskingManager
    >>> net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    >>> x = torch.randn(8, 4)
    >>> scores = MaskingManager(net, [x]).importance(ActivationNorm()).scores()
    >>> sorted(scores), scores["2.weight"].shape
    (['0.weight', '2.weight'], torch.Size([6]))
    """

    _needs = "calibration data"

    def _channel_rms(self, ctx: ScoringContext) -> Dict[str, torch.Tensor]:
        """Module name -> RMS of each channel of its first input."""
        squares = ChannelSquares()
        self._run_hooked(ctx, squares.hook)
        return squares.all_rms()

    def _combine(self, ref: LayerRef, rms: torch.Tensor) -> torch.Tensor:
        return rms

    def score_inputs(self, ctx: ScoringContext) -> Dict[str, torch.Tensor]:
        rms = self._channel_rms(ctx)
        out: Dict[str, torch.Tensor] = {}
        for mname, names in _scored_modules(ctx).items():
            if mname not in rms:
                continue
            for name in names:
                ref = ctx.consumers[name]
                if rms[mname].numel() == ref.channels:
                    out[name] = self._combine(ref, rms[mname])
        return out


class Wanda(ActivationNorm):
    """Weight magnitude times activation norm, per input channel.

    Sun, Liu, Bair and Kolter, "A Simple and Effective Pruning Approach for
    Large Language Models" (Wanda), ICLR 2024 (arXiv:2306.11695), scores a
    weight ``W[i, c]`` by ``|W[i, c]| * ||X_c||``. Removing input channel
    ``c`` removes the whole column, so the channel's score is the column's
    sum: ``||X_c|| * sum_i |W[i, c]|`` (``||X_c||``: the root mean square of
    :class:`ActivationNorm`). Same arguments as :class:`ActivationNorm`.
    """

    def _combine(self, ref: LayerRef, rms: torch.Tensor) -> torch.Tensor:
        return ref.channel_matrix().abs().sum(1) * rms.to(torch.float64)


def _map_ranks(x: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
    """Mean rank over samples of each channel's map, and mean |activation|.

    ``x`` is ``(samples, channels, *spatial)``.
    """
    n, c = x.shape[0], x.shape[1]
    energy = x.abs().reshape(n, c, -1).mean(2).mean(0)
    if x.dim() >= 4:
        maps = x.reshape(n, c, -1, x.shape[-1])
    else:
        maps = x.reshape(n, c, -1, 1)
    rank = torch.linalg.matrix_rank(maps).double().mean(0)
    return rank, energy


class Taylor(Importance):
    """First-order Taylor estimate of how much the loss changes without a channel.

    Molchanov, Mallya, Tyree, Frosio and Kautz, "Importance Estimation for
    Neural Network Pruning", CVPR 2019 (arXiv:1906.10771); first proposed for
    channels in Molchanov, Tyree, Karras, Aila and Kautz, "Pruning
    Convolutional Neural Networks for Resource Efficient Inference", ICLR 2017.
    Removing a set of weights changes the loss by about ``-sum(g * w)``; the
    score is ``(sum over the channel's weights of g * w)^2``, averaged over
    batches.

    Args:
        loss_fn: ``loss_fn(output, target) -> scalar tensor``.
        data: an iterable of ``(inputs, target)`` pairs; ``inputs`` is a tensor,
            a list of positional inputs or a dict of keyword inputs.
        max_batches: use at most this many batches.

    The model is put in eval mode while scoring (BatchNorm statistics are not
    updated) and gradients are taken with :func:`torch.autograd.grad`, so the
    parameters' ``.grad`` fields are left alone.
    """

    needs_data = True

    def __init__(
        self,
        loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None,
        data: Optional[Iterable[Any]] = None,
        max_batches: Optional[int] = None,
    ) -> None:
        if loss_fn is None or not callable(loss_fn):
            raise ValueError("Taylor needs a loss function: Taylor(loss_fn=torch.nn.functional.cross_entropy, data=[(x, y), ...])")
        if data is None:
            raise ValueError("Taylor needs data: Taylor(loss_fn, data=[(inputs, target), ...])")
        if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
            raise ValueError(f"max_batches must be a positive integer or None, got {max_batches!r}")
        self.loss_fn = loss_fn
        self.data = data
        self.max_batches = max_batches
        self._cache: Optional[tuple] = None

    def _compute(self, ctx: ScoringContext) -> "tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]":
        if self._cache is not None and self._cache[0] is ctx:
            return self._cache[1], self._cache[2]
        batches = _as_batches(self.data, "data")
        if self.max_batches is not None:
            batches = batches[: self.max_batches]
        if not batches:
            raise ValueError("Taylor needs at least one (inputs, target) batch in data")
        refs: Dict[str, LayerRef] = {}
        for d in (ctx.consumers, ctx.producers):
            for name, ref in d.items():
                if ref.groups == 1 and isinstance(ref.weight, nn.Parameter):
                    refs.setdefault(name, ref)
        weights = {name: ref.weight for name, ref in refs.items()}
        biases = {name: ref.bias for name, ref in ctx.producers.items() if name in refs and isinstance(ref.bias, nn.Parameter)}
        tensors = list(weights.values()) + list(biases.values())
        unique: List[torch.Tensor] = []
        for t in tensors:
            if not any(t is u for u in unique):
                unique.append(t)
        sums_in: Dict[str, torch.Tensor] = {}
        sums_out: Dict[str, torch.Tensor] = {}
        was_training = ctx.model.training
        flags = [t.requires_grad for t in unique]
        try:
            ctx.model.eval()
            for t in unique:
                t.requires_grad_(True)
            for batch in batches:
                if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                    raise ValueError(f"Taylor data must yield (inputs, target) pairs, got {type(batch).__name__}")
                x, y = batch
                with torch.enable_grad():
                    loss = self.loss_fn(_run(ctx.model, x), y)
                    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                        raise ValueError("Taylor loss_fn must return a scalar tensor")
                    grads = torch.autograd.grad(loss, unique, allow_unused=True)
                gmap = {id(t): g for t, g in zip(unique, grads)}
                for name, ref in refs.items():
                    g = gmap.get(id(ref.weight))
                    if g is None:
                        continue
                    gw = (g.detach() * ref.weight.detach()).double()
                    if name in ctx.consumers and ctx.consumers[name].groups == 1:
                        c = ctx.consumers[name]
                        s = gw.movedim(c.channel_dim, 0).reshape(gw.shape[c.channel_dim], -1).sum(1).pow(2)
                        sums_in[name] = sums_in.get(name, 0) + s
                    if name in ctx.producers:
                        p = ctx.producers[name]
                        s = gw.movedim(p.channel_dim, 0).reshape(gw.shape[p.channel_dim], -1).sum(1)
                        b = biases.get(name)
                        gb = gmap.get(id(b)) if b is not None else None
                        if gb is not None:
                            s = s + (gb.detach() * b.detach()).double()
                        sums_out[name] = sums_out.get(name, 0) + s.pow(2)
        finally:
            for t, f in zip(unique, flags):
                t.requires_grad_(f)
            ctx.model.train(was_training)
        n = len(batches)
        res_in = {k: v / n for k, v in sums_in.items()}
        res_out = {k: v / n for k, v in sums_out.items()}
        self._cache = (ctx, res_in, res_out)
        return res_in, res_out

    def score_inputs(self, ctx: ScoringContext) -> Dict[str, torch.Tensor]:
        return self._compute(ctx)[0]

    def score_outputs(self, ctx: ScoringContext) -> Dict[str, torch.Tensor]:
        return self._compute(ctx)[1]

    def __repr__(self) -> str:
        return f"Taylor(loss_fn={getattr(self.loss_fn, '__name__', self.loss_fn)!r})"


class BNScale(Importance):
    """Network slimming: the absolute scale (gamma) of the BatchNorm on the channel.

    Liu, Li, Shen, Huang, Yan and Zhang, "Learning Efficient Convolutional
    Networks through Network Slimming", ICCV 2017 (arXiv:1708.06519). Trained
    with an L1 penalty on BatchNorm scales, channels with small ``|gamma|`` are
    nearly silent and can be removed. (The sparsity training is the user's;
    this heuristic only reads the scales.)

    With example inputs the BatchNorm is found through the trace: a channel
    normalised by several BatchNorms (a residual stream: each block's last
    BatchNorm adds into it) gets the sum of their ``|gamma|``. Without them it
    is read off the module structure where that is unambiguous: inside an
    ``nn.Sequential``, a conv/linear, then a BatchNorm of its width, then only
    activations, dropout or pooling, then the consumer. Consumers whose input
    channels meet no BatchNorm are not scored (and so not pruned); a channel
    without one in an otherwise scored layer gets the layer's largest score.
    """

    def score_inputs(self, ctx: ScoringContext) -> Dict[str, torch.Tensor]:
        g = ctx.graph
        if g is None:
            out = _bn_scales_from_structure(ctx.model, ctx.consumers)
            if not out:
                raise ValueError(
                    "BNScale found no consumer that directly follows a BatchNorm in an nn.Sequential; "
                    "pass example inputs to find the BatchNorm of each channel through the trace: "
                    "MaskingManager(model, example_inputs=[x])"
                )
            return out
        find = g.sources.find
        modules = dict(ctx.model.named_modules())
        params = dict(ctx.model.named_parameters(remove_duplicate=False))
        gamma: Dict[int, float] = {}
        seen = set()
        for u in g.param_uses:
            mod = modules.get(g.param_modules.get(u.param, ""))
            if not isinstance(mod, nn.modules.batchnorm._BatchNorm) or not u.param.endswith(".weight"):
                continue
            w = params.get(u.param)
            if w is None:
                continue
            w = w.detach().double().abs()
            for pos, a in zip(u.positions, u.ids):
                if a < 0 or (u.param, pos) in seen:
                    continue
                seen.add((u.param, pos))
                root = find(a)
                gamma[root] = gamma.get(root, 0.0) + float(w[pos])
        if not gamma:
            raise ValueError("BNScale found no BatchNorm layer applied to any channel of this model; choose another heuristic (e.g. L1())")
        out: Dict[str, torch.Tensor] = {}
        for name, ref in ctx.consumers.items():
            ops = g.consumers_by_param.get(name)
            if not ops or ref.groups != 1:
                continue
            ids = g.consumers[ops[0]].in_ids
            vals = [gamma.get(find(a)) if a >= 0 else None for a in ids]
            known = [v for v in vals if v is not None]
            if not known:
                continue
            top = max(known)
            out[name] = torch.tensor([top if v is None else v for v in vals], dtype=torch.float64)
        return out


# modules that pass channels through one by one (between a BatchNorm and its reader)
_PASS_THROUGH = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)


def _bn_scales_from_structure(model: nn.Module, consumers: Dict[str, "LayerRef"]) -> Dict[str, torch.Tensor]:
    """``|gamma|`` of the BatchNorm that a consumer reads, for consumers
    whose input the module structure ties to one BatchNorm (see
    :class:`BNScale`), by weight name."""
    out: Dict[str, torch.Tensor] = {}
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for i, (name, m) in enumerate(children):
            if not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) or i < 2:
                continue
            j = i - 1
            while j >= 0 and isinstance(children[j][1], _PASS_THROUGH):
                j -= 1
            if j < 1:
                continue
            bn, before = children[j][1], children[j - 1][1]
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.weight is None:
                continue
            if not isinstance(before, (nn.modules.conv._ConvNd, nn.Linear)):
                continue
            wname = f"{prefix}.{name}.weight" if prefix else f"{name}.weight"
            ref = consumers.get(wname)
            if ref is None or ref.groups != 1 or ref.channels != bn.num_features:
                continue
            out[wname] = bn.weight.detach().double().abs().clone()
    return out
