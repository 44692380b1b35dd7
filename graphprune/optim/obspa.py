"""OBSPA (Optimal-Brain-SPA): data-free group saliency and compensation.

For each consumer of a group it uses a second-moment proxy ``M ≈ E[x xᵀ]`` of its input
units (see :func:`input_moments`): correlations from the producers' filters, scale and
mean from the norm's gamma/beta (or from the producer and the norm right before it),
passed through the activation the traced graph shows between them (:class:`GraphRoutes`:
ReLU, ReLU6, GELU, SiLU, attention values or none).  It scores unit q by the Optimal
Brain Surgeon error ``||W[:, Q]||²_{([H⁻¹]_QQ)⁻¹}`` with ``H = M + damping``, and
:func:`compensate` moves the removed units' contribution onto the kept ones (and their
mean into the consumer's bias or the BatchNorm after it, or, asked to, into a bias the
consumer gets: :func:`mean_sink`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import torch

from graphprune.analysis.groups import Group, Slice
from graphprune.errors import GraphPruneError
from graphprune.ops.catalog import rule_for
from graphprune.ops.registry import BiasSite, Rule

if TYPE_CHECKING:
    from graphprune.ir.graph import Graph

Activation = Literal["relu", "relu6", "gelu", "silu", "identity"]


@dataclass
class InputMoments:
    """Data-free first and second moments of a group's units as one consumer sees them.

    ``cov`` is ``[n, n]``, ``mean`` is ``[n]``; ``E[x xᵀ] = cov + mean meanᵀ``.  ``block``
    says what ``n`` counts: with ``block == 1`` one entry per unit (a channel, read by the
    consumer at several taps or positions, each with the same statistics); with
    ``block == k > 1`` one entry per *feature* of a unit that owns ``k`` distinct
    features (an attention head's value dimensions), ``n = size * k``, unit-major.
    """

    cov: torch.Tensor
    mean: torch.Tensor
    block: int = 1

    @property
    def second(self) -> torch.Tensor:
        return self.cov + torch.outer(self.mean, self.mean)


@dataclass
class Route:
    """What the graph puts between a group's units and one consumer (see :class:`GraphRoutes`).

    ``norms``/``producers`` are the group's slices whose outputs reach the consumer first
    (several: a residual sum); ``feeders`` the producers that feed those norms directly
    (not through a depthwise conv or an activation, which decorrelate); ``activation`` is the elementwise nonlinearity met on the
    way; ``attention`` says the units reach it as the *values* of an attention.
    """

    activation: str = "identity"
    norms: list[Slice] = field(default_factory=list)
    producers: list[Slice] = field(default_factory=list)
    attention: bool = False
    feeders: list[Slice] = field(default_factory=list)


def _activation_of(node: Any) -> str | None:
    """The activation a node applies, as its registry entry says (:meth:`Rule.activation`)."""
    return rule_for(node.op).activation(node)


class GraphRoutes:
    """Reads, from the traced IR, which ops lie between a group's units and each consumer.

    Walking back from a consumer's data input through data movement, pooling, sums and
    activations, the walk stops at the first of the group's norms or producers on each
    branch; at an attention it follows the values only.  A producer's own input is
    read the same way: a norm right before it (a pre-norm transformer's LayerNorm, a
    BN-ReLU before a conv) gives the per-channel scale and mean of what it reads.
    """

    def __init__(self, ir: Graph, params: dict[str, torch.Tensor]) -> None:
        self.values, self.params, self._ir = ir.values, params, ir
        self.maker = ir.producers()
        self.key: dict[str, str] = {}
        for v in ir.values.values():
            if v.kind == "param":
                k = v.name if v.name in params else v.source_name
                if k in params:
                    self.key[v.name] = k
        self.readers: dict[str, list[Any]] = {}
        self.users: dict[str, list[Any]] = {}
        for n in ir.nodes:
            for i in n.inputs:
                self.users.setdefault(i, []).append(n)
                if i in self.key:
                    self.readers.setdefault(self.key[i], []).append(n)

    def _data(self, n: Any) -> list[str]:
        return [i for i in n.inputs if self.values[i].kind in ("act", "input")]

    def _params(self, n: Any) -> list[str]:
        return [self.key[i] for i in n.inputs if i in self.key]

    def route(self, g: Group, consumer: Slice) -> Route | None:
        """The route from ``g``'s units to ``consumer``; None when the graph does not say."""
        readers = self.readers.get(consumer.param)
        data = self._data(readers[0]) if readers else []
        if not data:
            return None
        mine: dict[str, list[Slice]] = {}
        for s in g.slices:
            mine.setdefault(s.param, []).append(s)
        r, stack, seen = Route(), [data[0]], set()
        while stack and len(seen) < 500:
            v = stack.pop()
            n = self.maker.get(v)
            if v in seen or n is None:
                continue
            seen.add(v)
            ps = self._params(n)
            own = [s for p in ps for s in mine.get(p, ()) if not s.is_block]
            norms = [s for s in own if s.role == "norm"]
            prods = [s for s in own if s.role == "producer"]
            rule = rule_for(n.op)
            if norms and rule.normalises:
                r.norms += norms
                r.feeders += self._feeding(n, mine)
                continue
            if prods:
                r.producers += prods
                continue
            if rule.mixes_channels and any(p not in mine for p in ps):
                continue  # a layer outside the group: nothing of the units passes unmixed
            act = _activation_of(n)
            if act and r.activation == "identity":
                r.activation = act
            d = self._data(n)
            values = rule.attention_values(n, d, self._producer_rule)
            if values is not None:
                r.attention = True
                stack.append(d[values])
                continue
            stack.extend(d)
        return r if (r.norms or r.producers) else None

    def _producer_rule(self, value: str) -> Rule | None:
        n = self.maker.get(value)
        return rule_for(n.op) if n is not None else None

    def _feeding(self, norm: Any, mine: dict[str, list[Slice]]) -> list[Slice]:
        """The group's producers whose output reaches ``norm`` through data movement alone."""
        d = self._data(norm)
        v = d[0] if d else None
        for _ in range(64):
            n = self.maker.get(v) if v is not None else None
            if n is None:
                return []
            prods = [s for p in self._params(n) for s in mine.get(p, ()) if s.role == "producer"]
            if prods:
                return prods
            d = self._data(n)
            if len(d) != 1 or self._params(n) or _activation_of(n):
                return []
            v = d[0]
        return []

    def input_stats(self, param: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-channel (variance, mean) of what the layer owning ``param`` reads, when a norm
        (then at most an activation and data movement) sits right before it."""
        readers = self.readers.get(param)
        data = self._data(readers[0]) if readers else []
        v, act = (data[0] if data else None), None
        for _ in range(64):
            n = self.maker.get(v) if v is not None else None
            if n is None:
                return None
            if rule_for(n.op).normalises:
                ps = self._params(n)
                if not ps:
                    return None
                gamma = self._param(ps[0])
                beta = self._param(ps[1]) if len(ps) > 1 and ps[1] is not None else torch.zeros_like(gamma)
                if gamma.shape != beta.shape:
                    return None
                mom = _activate(InputMoments(torch.diag(gamma.pow(2)), beta), act or "identity")
                return mom.cov.diagonal(), mom.mean
            act = act or _activation_of(n)
            d = self._data(n)
            if len(d) != 1 or self._params(n):
                return None  # a sum or a weighted op: the statistics are no longer the norm's
            v = d[0]
        return None

    def following_norm(self, param: str) -> tuple[str, str, torch.Tensor, float] | None:
        """``(gamma, beta, running_var, eps)`` of an inference-mode BatchNorm that alone reads
        the output of the layer owning ``param`` (a bias-free conv followed by BN): a shift of
        that layer's output mean can be absorbed into ``beta``."""
        readers = self.readers.get(param)
        if not readers or len(readers) != 1 or not readers[0].outputs:
            return None
        users = self.users.get(readers[0].outputs[0], [])
        if len(users) != 1 or users[0].op != "batch_norm":
            return None
        bn = users[0]
        refs = {k: getattr(bn.attrs.get(k), "name", None) for k in ("weight", "bias", "running_var")}
        if refs["weight"] not in self.key or refs["bias"] not in self.key or refs["running_var"] is None:
            return None
        rv = refs["running_var"]
        var = self.params[self.key[rv]] if rv in self.key else self.values[rv].data
        if var is None or bn.attrs.get("training", False) is True:
            return None
        eps = float(bn.attrs.get("eps", bn.attrs.get("epsilon", 1e-5)))
        return self.key[refs["weight"]], self.key[refs["bias"]], var.detach().double().cpu().reshape(-1), eps

    def bias_site(self, param: str) -> BiasSite | None:
        """Where the layer owning ``param`` (its only reader) could get a bias it lacks
        (:meth:`~graphprune.ops.registry.Rule.bias_site`), with ``param`` as its weight."""
        readers = self.readers.get(param)
        if not readers or len(readers) != 1:
            return None
        site = rule_for(readers[0].op).bias_site(readers[0], self._ir)
        return site if site is not None and self.key.get(site.weight) == param else None

    def _param(self, name: str) -> torch.Tensor:
        return self.params[name].detach().double().cpu().reshape(-1)


def _routes(graph: Graph | GraphRoutes | None, params: dict[str, torch.Tensor]) -> GraphRoutes | None:
    if graph is None or isinstance(graph, GraphRoutes):
        return graph
    return GraphRoutes(graph, params)


def _rows(g: Group, s: Slice, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The slice as a ``[size, n]`` matrix (each unit's rows flattened)."""
    return Group(g.id, g.name, g.kind, g.size, [s]).gather(params).detach().double()


def _producer_moments(g: Group, s: Slice, params: dict[str, torch.Tensor], block: int,
                      routes: GraphRoutes | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(covariance, mean) of a producer's outputs: ``W Σ_in Wᵀ`` and ``W μ_in + b``.

    The input is white (``Σ_in = I``, ``μ_in = 0``) unless the graph shows a norm right
    before the producer, whose affine parameters give each input channel's scale and mean.
    With ``block > 1`` every one of a unit's rows is its own feature.
    """
    p = params[s.param].detach().double()
    rows = p.movedim(s.dim, 0)[s.index.reshape(-1).to(p.device)].cpu()
    rows = rows.reshape(g.size * block, -1) if block > 1 else rows.reshape(g.size, -1)
    stats = routes.input_stats(s.param) if routes is not None and s.dim == 0 else None
    var = mean = None
    if stats is not None and p.dim() >= 2 and p.shape[1] == stats[0].numel():
        taps = int(torch.tensor(p.shape[2:]).prod()) if p.dim() > 2 else 1
        per_row = p.shape[1] * taps
        if rows.shape[1] % per_row == 0:
            reps = rows.shape[1] // per_row
            var = stats[0].repeat_interleave(taps).repeat(reps)
            mean = stats[1].repeat_interleave(taps).repeat(reps)
    cov = (rows * var) @ rows.T if var is not None else rows @ rows.T
    mu = rows @ mean if mean is not None else torch.zeros(rows.shape[0], dtype=torch.float64)
    bias = _bias_of(s, params)
    if bias:
        b = params[bias].detach().double().cpu()[s.index.reshape(-1)]
        mu = mu + (b if block > 1 else b.reshape(g.size, -1).sum(1))
    return cov, mu


def block_of(consumer: Slice | None, route: Route | None) -> int:
    """Features per unit: a consumer reading ``k`` columns per unit that are the producers'
    ``k`` rows (a head's value dims) reads ``k`` distinct features; else 1 (taps of one channel)."""
    if consumer is None or route is None or not route.producers or route.norms:
        return 1
    k = consumer.index.shape[1]
    return k if k > 1 and all(s.index.shape[1] == k for s in route.producers) else 1


def input_moments(g: Group, params: dict[str, torch.Tensor], activation: Activation | None = None, *,
                  graph: Graph | GraphRoutes | None = None, consumer: Slice | None = None) -> InputMoments:
    """Estimate what one consumer of the group reads, from weights alone.

    * **Which slices.**  With the traced graph (``graph``, the IR) and a ``consumer``, the
      route from the units to that consumer (:class:`GraphRoutes`) says which norms and
      producers feed it and through which activation; without them every norm and
      producer of the group is used and the activation defaults to ReLU.
    * **Correlation** between units comes from the producers: a producer reading inputs
      of per-channel variance ``Σ_in`` (white, or the scale of the norm right before it)
      gives outputs of covariance ``W Σ_in Wᵀ`` (rows = units), so two units whose
      filters point the same way carry the same signal and can stand in for each other.
    * **Scale and mean** come from the norms on the route when there are any: an affine
      norm outputs, per unit, mean ``beta`` and standard deviation ``|gamma|`` by
      construction (parallel norms of a residual sum add).  Without a norm they are the
      producer's ``W Σ_in Wᵀ`` and ``W μ_in + b`` (a pre-norm transformer: the LayerNorm
      before the producer gives ``Σ_in = diag(γ²)``, ``μ_in = β``).
    * **Activation**: ``relu`` (:func:`rectify`), ``relu6``/``gelu``/``silu``
      (:func:`smooth_activation`, Gaussian quadrature) or ``identity``; read from the
      graph per consumer unless ``activation`` forces one.  Attention heads reach their
      out-projection as softmax averages of the values: identity moments of the value
      projection (averaging keeps the mean and shrinks the covariance by a factor that
      OBS does not see), with one feature per value dimension (``block``).
    """
    routes = _routes(graph, params)
    route = routes.route(g, consumer) if routes is not None and consumer is not None else None
    block = block_of(consumer, route)
    all_norms = [s for s in g.slices if s.role == "norm"]
    all_prods = [s for s in g.slices if s.role == "producer"]
    norms = route.norms if route is not None else all_norms
    if route is None:
        prods = all_prods
    elif norms:
        prods = route.feeders  # none: units reach the norm decorrelated, take them as independent
    else:
        prods = route.producers
    moments = [_producer_moments(g, s, params, block, routes) for s in prods]
    n = g.size * block
    if norms:
        corr = torch.stack([_correlation(c) for c, _ in moments]).mean(0) if moments \
            else torch.eye(n, dtype=torch.float64)
        gammas = [_rows(g, s, params).reshape(n, -1).pow(2).sum(1) for s in norms]
        betas = []
        for s in norms:
            beta = s.bias if s.bias in params else None
            betas.append(_rows(g, Slice(beta, s.dim, s.index), params).reshape(n, -1).sum(1) if beta
                         else torch.zeros(n, dtype=torch.float64))
        std = torch.stack(gammas).sum(0).sqrt()
        mom = InputMoments(corr * torch.outer(std, std), torch.stack(betas).sum(0), block)
    elif moments:
        mom = InputMoments(torch.stack([c for c, _ in moments]).sum(0), torch.stack([m for _, m in moments]).sum(0),
                           block)
    else:
        mom = InputMoments(torch.eye(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), block)
    if activation is None:
        activation = ("identity" if route.attention else route.activation) if route is not None else "relu"
    return _activate(mom, activation)


def _activate(mom: InputMoments, activation: str) -> InputMoments:
    if activation == "relu":
        return rectify(mom)
    if activation in _SMOOTH:
        return smooth_activation(mom, activation)
    if activation == "identity":
        return mom
    raise GraphPruneError(f"unknown activation {activation!r}", hint="use relu, relu6, gelu, silu or identity")


def rectify(mom: InputMoments) -> InputMoments:
    """Moments after a ReLU, each unit taken as Gaussian ``N(mu, sigma²)``.

    Mean and variance are the rectified-Gaussian closed forms
    ``E = mu Φ(a) + sigma φ(a)``, ``E[x²] = (mu² + sigma²) Φ(a) + mu sigma φ(a)``,
    ``a = mu / sigma``; correlations are kept (a first-order choice: the exact
    bivariate form with means has no closed form worth its cost here).
    """
    std = mom.cov.diagonal().clamp_min(1e-12).sqrt()
    a = mom.mean / std
    normal = torch.distributions.Normal(torch.zeros((), dtype=a.dtype), torch.ones((), dtype=a.dtype))
    cdf, pdf = normal.cdf(a), normal.log_prob(a).exp()
    mean = mom.mean * cdf + std * pdf
    second = (mom.mean.pow(2) + std.pow(2)) * cdf + mom.mean * std * pdf
    new_std = (second - mean.pow(2)).clamp_min(1e-12).sqrt()
    return InputMoments(_correlation(mom.cov) * torch.outer(new_std, new_std), mean, mom.block)


_SMOOTH: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": lambda x: torch.nn.functional.gelu(x),
    "silu": lambda x: torch.nn.functional.silu(x),
    "relu6": lambda x: x.clamp(0.0, 6.0),
}


def _hermite(points: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of Gauss–Hermite quadrature for ``E[f(z)]``, ``z ~ N(0, 1)``."""
    import numpy as np

    z, w = np.polynomial.hermite_e.hermegauss(points)
    return torch.from_numpy(z), torch.from_numpy(w / w.sum())


def smooth_activation(mom: InputMoments, activation: str, points: int = 48, order: int = 4) -> InputMoments:
    """Moments after an elementwise ``f`` (GELU, SiLU, ReLU6), each unit ``N(mu, sigma²)``.

    Per unit, ``E[f(x)]``, ``Var f(x)`` and the Hermite coefficients
    ``a_k = E[f(x) He_k(z)]`` (``x = mu + sigma z``) come from a deterministic
    Gauss–Hermite quadrature (no sampling).  Between units, Mehler's expansion gives
    ``Cov(f(x_i), f(x_j)) = Σ_k a_ik a_jk ρ_ij^k / k!`` (``ρ`` the correlation), kept to
    ``order`` terms: the first is Price's linearisation, the second matters for GELU
    units sitting near its minimum, where the slope vanishes.  Every term is positive
    semi-definite (Schur products of ``ρ``), and so is the diagonal's surplus
    ``Var f − Σ_k a_k² / k!``, the variance the truncated terms leave.
    """
    f = _SMOOTH[activation]
    z, w = _hermite(points)
    std = mom.cov.diagonal().clamp_min(1e-12).sqrt()
    fx = f(mom.mean[:, None] + std[:, None] * z[None, :])
    mean = fx @ w
    var = ((fx - mean[:, None]).pow(2) @ w).clamp_min(0)
    corr = _correlation(mom.cov)
    cov = torch.zeros_like(mom.cov)
    he_prev, he = torch.ones_like(z), z  # He_0, He_1; He_{k+1} = z He_k - k He_{k-1}
    factorial = 1.0
    for k in range(1, order + 1):
        factorial *= k
        a = (fx * he[None, :]) @ w
        cov = cov + torch.outer(a, a) * corr.pow(k) / factorial
        he_prev, he = he, z * he - k * he_prev
    cov = cov + torch.diag((var - cov.diagonal()).clamp_min(0))
    return InputMoments(cov, mean, mom.block)


def _correlation(gram: torch.Tensor) -> torch.Tensor:
    d = gram.diagonal().clamp_min(1e-12).rsqrt()
    return gram * torch.outer(d, d)


def obs_hessian(m: torch.Tensor, damping: float = 0.1) -> torch.Tensor:
    """``M + damping·mean(diag M)·I``: OBS needs an invertible H, and the proxy needs humility.

    A producer with fewer inputs than outputs makes ``W Wᵀ`` singular, which would say
    some units are exact linear combinations of others; nonlinearities break that, so
    the ridge is larger than the usual 1% used with real activations.
    """
    scale = m.diagonal().mean().clamp_min(1e-12)
    return m + damping * scale * torch.eye(m.shape[0], dtype=m.dtype)


def consumer_rows(p: torch.Tensor, s: Slice, block: int = 1) -> torch.Tensor:
    """Consumer weight as ``[R, size]`` (or ``[R, size * block]``): one column per unit or feature.

    ``s.index[u, j]`` is unit u's j-th input column.  With ``block == 1`` those are one
    channel at several positions (after a flatten) or taps: with ``H = M ⊗ I``
    (positions and taps uncorrelated) every such row sees the same ``M``, so OBS
    decouples row by row.  With ``block == k`` they are k distinct features (a head's
    value dims), each its own column, unit-major.
    """
    w = p.detach().movedim(s.dim, -1)
    if block > 1:
        return w[..., s.index.reshape(-1).to(w.device)].reshape(-1, s.index.numel()).double().cpu()
    cols = w[..., s.index.T.reshape(-1).to(w.device)]
    return cols.reshape(-1, s.index.shape[0]).double().cpu()


def _write_consumer_rows(p: torch.Tensor, s: Slice, rows: torch.Tensor, block: int = 1) -> None:
    w = p.detach().movedim(s.dim, -1).clone()
    order = s.index.reshape(-1) if block > 1 else s.index.T.reshape(-1)
    w[..., order.to(w.device)] = rows.reshape(*w.shape[:-1], -1).to(w.dtype).to(w.device)
    with torch.no_grad():
        p.copy_(w.movedim(-1, s.dim))


def obs_saliency(rows: torch.Tensor, h: torch.Tensor, block: int = 1) -> torch.Tensor:
    """Per-unit OBS error ``Σ_r W[r, Q] ([H⁻¹]_QQ)⁻¹ W[r, Q]ᵀ``: output energy lost after compensation.

    ``Q`` is the unit's column (``block == 1``: ``Σ_r W[r, q]² / [H⁻¹]_qq``) or its
    ``block`` feature columns, removed together.
    """
    hinv = torch.linalg.inv(h)
    if block == 1:
        return rows.pow(2).sum(0) / hinv.diagonal()
    size = h.shape[0] // block
    idx = torch.arange(size)
    blocks = hinv.reshape(size, block, size, block)[idx, :, idx, :]  # [size, k, k]
    wq = rows.reshape(rows.shape[0], size, block).permute(1, 0, 2)  # [size, R, k]
    return (torch.linalg.solve(blocks, wq.transpose(1, 2)).transpose(1, 2) * wq).sum((1, 2))


def obs_compensate(rows: torch.Tensor, h: torch.Tensor, remove: torch.Tensor) -> torch.Tensor:
    """Rows with the removed columns zeroed and their signal re-expressed by the kept ones.

    Removing set Q at once, the least-squares optimum under ``E[x xᵀ] = H`` is
    ``W_K += W_Q H_QK H_KK⁻¹`` — the block form of the OBS update
    ``δw = −W_Q [H⁻¹]_QQ⁻¹ [H⁻¹]_Q,:`` — and ``W_Q = 0``.
    """
    keep = ~remove
    out = rows.clone()
    if remove.any() and keep.any():
        h_kk, h_qk = h[keep][:, keep], h[remove][:, keep]
        out[:, keep] += torch.linalg.solve(h_kk, (rows[:, remove] @ h_qk).T).T
    out[:, remove] = 0
    return out


def consumer_slices(g: Group) -> list[Slice]:
    """The group's consumer slices (columns of the layers that read its units), in a fixed order."""
    return [s for s in g.slices if not s.is_block and s.role == "consumer"]


def _bias_of(s: Slice, params: dict[str, torch.Tensor]) -> str | None:
    """The bias of the layer whose weight ``s`` slices, if it has one along its outputs."""
    b = params.get(s.bias) if s.bias is not None else None
    w = params[s.param]
    out = w.shape[s.dim if s.role == "producer" else 1 - s.dim]  # a consumer's outputs: its weight's other dim
    return s.bias if b is not None and b.dim() == 1 and b.numel() == out else None


def consumer_moments(g: Group, params: dict[str, torch.Tensor], activation: Activation | None = None,
                     graph: Graph | GraphRoutes | None = None) -> list[InputMoments]:
    """:func:`input_moments` for every consumer of ``g`` (in :func:`consumer_slices` order)."""
    routes = _routes(graph, params)
    return [input_moments(g, params, activation, graph=routes, consumer=s) for s in consumer_slices(g)]


def obspa(groups: Sequence[Group], params: dict[str, torch.Tensor], *, damping: float = 0.1,
          activation: Activation | None = None, graph: Graph | GraphRoutes | None = None,
          moments: Sequence[Sequence[InputMoments]] | None = None, add_biases: bool = False,
          **_: Any) -> list[torch.Tensor]:
    """Optimal-Brain-SPA: OBS error summed over every layer that reads the unit.

    Each consumer is scored under its own input model: ``moments[i]`` (one per consumer of
    ``groups[i]``, measured on calibration data by :mod:`graphprune.optim.calibration`)
    when given, else the data-free :func:`input_moments` (routed through ``graph``).
    Consumers with a bias (or, with ``add_biases``, that can be given one) let the unit's
    mean go into the bias, so they are scored with the covariance; others with the full
    second moment.
    A group with no parametric consumer (e.g. attention scores) falls back to l2.
    """
    routes = _routes(graph, params)
    out = []
    for i, g in enumerate(groups):
        consumers = consumer_slices(g)
        if not consumers:
            out.append(g.norms(params, p=2))
            continue
        score = torch.zeros(g.size, dtype=torch.float64)
        moms = moments[i] if moments is not None else consumer_moments(g, params, activation, routes)
        for s, mom in zip(consumers, moms):
            h = obs_hessian(mom.cov if mean_sink(s, params, routes, add_biases) else mom.second, damping)
            rows = consumer_rows(params[s.param], s, mom.block)
            score += obs_saliency(rows, h, mom.block)
        out.append(score.float())
    return out


def compensate(g: Group, remove: torch.Tensor, params: dict[str, torch.Tensor],
               mom: InputMoments | Sequence[InputMoments] | None = None, damping: float = 0.1,
               activation: Activation | None = None, graph: Graph | GraphRoutes | None = None, rescale: float = 2.0,
               added: dict[str, torch.Tensor] | None = None) -> None:
    """Apply the OBS update to every consumer of ``g`` for the units in ``remove`` (in place).

    ``mom`` is one model for every consumer, or one per consumer (:func:`consumer_moments`,
    computed here when missing).  Kept columns absorb the removed units' fluctuation;
    where the consumer has a bias (``[out]``, output along dim 0) it absorbs the mean
    shift as well: ``b += Σ (W_Q μ_Q − δW_K μ_K)`` over taps; a bias-free consumer
    followed by an inference BatchNorm (found through ``graph``) shifts that norm's beta
    by the same amount times ``gamma / sqrt(var + eps)``; with ``added`` (a dict), a
    consumer with neither gets the shift as a new bias, accumulated in ``added`` under its
    weight's name (see :func:`mean_sink`).  Removed columns are zeroed.

    That norm's running statistics were measured on the full layer; with fewer inputs
    the layer's output spreads less, and every later layer sees a shrunken signal.
    Without data to re-estimate them, ``gamma`` of each output channel is scaled by
    ``sqrt(diag(W M Wᵀ) / diag(W' M W'ᵀ))`` (modelled spread before / after, at most
    ``rescale``; ``rescale <= 1`` turns this off), the data-free counterpart of
    re-estimating BatchNorm statistics after pruning.
    """
    consumers = consumer_slices(g)
    if mom is None:
        moms = consumer_moments(g, params, activation, graph)
    elif isinstance(mom, InputMoments):
        moms = [mom] * len(consumers)
    else:
        moms = list(mom)
    remove = remove.cpu().bool()
    routes = _routes(graph, params)
    for s, m in zip(consumers, moms):
        p = params[s.param]
        rows = consumer_rows(p, s, m.block)
        sink = mean_sink(s, params, routes, new_bias=added is not None)
        h = obs_hessian(m.cov if sink else m.second, damping)
        new = obs_compensate(rows, h, remove.repeat_interleave(m.block))
        if sink:
            name, scale = sink.param, sink.scale
            if rescale > 1.0 and isinstance(scale, torch.Tensor) and routes is not None:
                # the norm was calibrated on the full layer's output: keep its modelled spread
                gname = routes.following_norm(s.param)[0]
                old = ((rows @ m.cov) * rows).reshape(p.shape[0], -1).sum(1)
                now = ((new @ m.cov) * new).reshape(p.shape[0], -1).sum(1)
                k = (old / now.clamp_min(1e-12)).sqrt().clamp(1.0, rescale)
                with torch.no_grad():
                    params[gname].mul_(k.to(params[gname].dtype).to(params[gname].device))
                scale = scale * k
            shift = ((rows - new) @ m.mean).reshape(sink.out, -1).sum(1) * scale
            if sink.new:
                held = added.get(name, torch.zeros(sink.out, dtype=p.dtype, device=p.device))
                added[name] = held + shift.to(dtype=p.dtype, device=p.device)
            else:
                with torch.no_grad():
                    params[name].add_(shift.to(params[name].dtype).to(params[name].device))
        _write_consumer_rows(p, s, new, m.block)


@dataclass(frozen=True)
class Sink:
    """Where a consumer's output-mean shift goes: ``param`` (its bias, or the beta of an
    inference BatchNorm after it) takes it times ``scale``.  With ``new`` the layer has no
    bias: ``param`` is its weight's name, and the shift is kept apart, under that name, as
    the bias the compact model gives the layer (:mod:`graphprune.passes.add_bias`)."""

    param: str
    scale: torch.Tensor | float
    out: int
    new: bool = False


def mean_sink(s: Slice, params: dict[str, torch.Tensor], routes: GraphRoutes | None,
              new_bias: bool = False) -> Sink | None:
    """Where a consumer's output-mean shift can go: its own bias (scale 1), the beta of an
    inference BatchNorm right after it (scale ``gamma / sqrt(var + eps)``), or with
    ``new_bias`` a bias the layer gets (its registry entry says where: a linear layer's or
    a convolution's bias argument, ONNX Gemm's ``C``, an add after a MatMul); None if nowhere.

    The consumer's outputs are the weight's dim 0 when it reads its units along dim 1
    (``[out, in, ...]``), or dim 1 of a 2-D ``[in, out]`` weight read along dim 0 (MatMul)."""
    p = params[s.param]
    if s.dim == 1:
        out = p.shape[0]
    elif s.dim == 0 and p.dim() == 2:
        out = p.shape[1]
    else:
        return None
    bias = _bias_of(s, params)
    if bias is not None:
        return Sink(bias, 1.0, out)
    bn = routes.following_norm(s.param) if routes is not None and s.dim == 1 else None
    if bn is not None and params[bn[0]].numel() == out:
        gamma, beta, var, eps = bn
        return Sink(beta, params[gamma].detach().double().cpu().reshape(-1) / (var + eps).sqrt(), out)
    site = routes.bias_site(s.param) if new_bias and routes is not None else None
    if site is not None and site.out_dim == (0 if s.dim == 1 else 1):
        return Sink(s.param, 1.0, out, new=True)
    return None
