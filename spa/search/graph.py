"""The group graph: coupled groups as nodes, data flow between them as edges, numpy features for GNN policies.

**Nodes** are the coupled groups of the Analysis, in group-id order (all of them; `prunable` marks the ones a
policy controls). **Edges**: group A -> group B when a layer that *creates* B's channels (a Conv/ConvTranspose/
Gemm/MatMul whose weight is a source of B) reads A's channels on its data input. "Reads" is the labelling of that
input tensor: the groups of the atoms on its channel axis. When the data input carries no labelling (the model
input, or channels an unruled op made anonymous) the walk goes upstream through producers until it meets labelled
tensors; such edges are marked `indirect`. Residual additions and concatenations do not create edges: they make
one group (the rules unify or concatenate the channels), so a ResNet stage is a hub whose blocks are 2-cycles
(stage -> conv1 group -> stage). Self-loops (a depthwise conv reading its own group) are dropped. Parallel links
between the same pair of groups are merged (their channel counts summed).

Every feature is computed from the ONNX graph, the cost model and the importance scores; nothing is random.
`NODE_FEATURES` / `EDGE_FEATURES` name the columns; static columns are computed once, the dynamic ones (keep ratio,
decision flags, budget) are filled per observation by `GroupGraph.node_features`.

**Pruned models** (iterative episodes): `build(analysis, scores, scale=original.scale)` measures a pruned model's graph on
the original's scale (largest group, feature-map size, total MACs and parameters, node count, median importance), so
its features change only where the pruning changed something. `unit_map` / `group_map` tie the pruned model's units
and groups back to the original's (through the source layers' kept positions) and `in_original_order` lays the
pruned graph's features out in the original's node and edge order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from spa.operators.weights import WEIGHT_INPUT

from ..errors import SpaError
from ..groups import Analysis
from ..ir import attr

OP_CATEGORIES = ("conv", "grouped_conv", "linear", "norm", "activation", "binary", "pool", "concat_slice",
                 "layout", "other")
_CAT = {
    **{op: "linear" for op in ("Gemm", "MatMul")},
    **{op: "norm" for op in ("BatchNormalization", "InstanceNormalization", "LayerNormalization",
                             "GroupNormalization", "LpNormalization", "MeanVarianceNormalization", "LRN")},
    **{op: "activation" for op in ("Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Clip",
                                   "Gelu", "Erf", "Tanh", "Softplus", "Softsign", "Elu", "Selu", "Celu", "Mish",
                                   "Exp", "Sqrt", "Log", "Abs", "Neg", "Reciprocal", "Softmax", "LogSoftmax",
                                   "Dropout", "Identity", "Cast")},
    **{op: "binary" for op in ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where")},
    **{op: "pool" for op in ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
                             "GlobalLpPool", "ReduceMean", "ReduceMax", "ReduceSum", "Resize", "Upsample", "Pad")},
    **{op: "concat_slice" for op in ("Concat", "Split", "Slice", "Gather")},
    **{op: "layout" for op in ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Expand", "Tile")},
}
_SOURCE_OPS = tuple(WEIGHT_INPUT)  # the weight-layer ops (spa.operators.weights)

STATIC_NODE_FEATURES = (
    *(f"op_{c}" for c in OP_CATEGORIES),   # share of the ONNX nodes touching the group, by category
    "units_log",              # log2(units) / log2(largest group + 1)
    "prunable_fraction",      # prunable units / units
    "frozen",                 # 1 when no unit may go
    "sources_log",            # log2(1 + source layers) / 4
    "residual",               # several source layers whose channels were unified (residual Add, SE Mul, ...)
    "concat",                 # units laid end to end from several sources (Concat)
    "kernel_log",             # mean log2(kernel positions) of the source layers / 6
    "stride_log",             # mean log2(stride) of the source layers / 2
    "depthwise",              # share of source convs with one input channel per group
    "grouped",                # share of source convs with group > 1
    "fmap_log",               # log2(output positions per sample of the sources) / log2(largest + 1)
    "depth",                  # topological position of the first source / number of nodes
    "depth_last",             # topological position of the last node reading the group / number of nodes
    "flops_share",            # first-order MACs that scale with the group / total MACs
    "params_share",           # parameter elements sliced with the group / total parameters
    "latency_share",          # measured latency share (0 until a latency table is given)
    "imp_mean", "imp_std", "imp_min",  # the group's unit scores divided by the group's largest score
    "imp_level",              # log10 of the group's mean score over the median group mean, clipped to [-3, 3] / 3
)
DYNAMIC_NODE_FEATURES = (
    "keep_ratio",             # current kept units / units (1 before a decision)
    "min_keep_ratio",         # smallest keep ratio the constraints allow
    "decided",                # sequential episodes: the group's count is set
    "current",                # sequential episodes: the group being decided now
    "budget_used",            # cost of the current state (undecided groups full) / budget, per budget kind max
    "budget_left",            # 1 - cost of the current state with undecided groups at their minimum / budget
)
NODE_FEATURES = STATIC_NODE_FEATURES + DYNAMIC_NODE_FEATURES
EDGE_FEATURES = (
    "link_fraction",          # units of the source group carried by the link / source group units
    "link_units_log",         # log2(1 + units on the link) / log2(largest group + 1)
    "positions_per_unit_log",  # log2(positions per unit on the link) / 12 (Flatten of C x H x W: H*W)
    "partial",                # the link carries a strict subset of the source group (a concat/split piece)
    "residual",               # the source group is residual-coupled
    "concat",                 # the source group is a concatenation
    "indirect",               # found by walking upstream through unlabelled tensors
)


@dataclass(frozen=True)
class GraphScale:
    """The normalisers of the features. A pruned model's graph built on its original's scale keeps features
    comparable between the steps of an iterative episode (a shrunk group reads smaller, the others do not move)."""

    max_units: float            # log2(largest group + 1)
    max_fmap: float             # largest log2(output positions per sample) of a source layer (>= 1)
    total_macs: float
    params_total: float
    n_nodes: int                # ONNX nodes (depth features are positions / n_nodes)
    imp_ref: float              # median over groups of the mean unit score


@dataclass
class GroupGraph:
    """Nodes (groups), edges (data flow), static features. Build with `GroupGraph.build(analysis, scores)`."""

    analysis: Analysis
    static: np.ndarray          # (N, len(STATIC_NODE_FEATURES)) float32
    edge_index: np.ndarray      # (2, E) int64: row 0 source group, row 1 target group
    edge_attr: np.ndarray       # (E, len(EDGE_FEATURES)) float32
    topo_order: np.ndarray      # group ids by depth of their first source (sequential episodes visit them so)
    sources: list[list[str]]    # source node names per group
    scale: GraphScale | None = None   # the normalisers the features were computed with

    @property
    def num_nodes(self) -> int:
        return self.static.shape[0]

    @property
    def num_edges(self) -> int:
        return self.edge_index.shape[1]

    def set_latency(self, share: np.ndarray) -> None:
        """Fill the latency-share column (e.g. from a measured per-group latency table)."""
        self.static[:, STATIC_NODE_FEATURES.index("latency_share")] = np.asarray(share, dtype=np.float32)

    def node_features(self, keep_ratio: np.ndarray, min_keep_ratio: np.ndarray, decided: np.ndarray,
                      current: int | None, budget_used: float, budget_left: float) -> np.ndarray:
        """Static columns followed by the dynamic ones (budget values broadcast to every node)."""
        n = self.num_nodes
        dyn = np.zeros((n, len(DYNAMIC_NODE_FEATURES)), dtype=np.float32)
        dyn[:, 0] = keep_ratio
        dyn[:, 1] = min_keep_ratio
        dyn[:, 2] = decided
        if current is not None:
            dyn[current, 3] = 1.0
        dyn[:, 4] = budget_used
        dyn[:, 5] = budget_left
        return np.concatenate([self.static, dyn], axis=1)

    # ---- construction ------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, analysis: Analysis, scores: dict, params_total: float | None = None,
              scale: GraphScale | None = None) -> GroupGraph:
        """The graph of `an` with features from `scores` (unit root -> score); `scale` replaces the model's own
        normalisers (a pruned model measured on its original's scale)."""
        g = analysis.ctx.g
        n_groups = len(analysis.groups)
        where = _GroupLocator(analysis)
        by_name = {n.name: n for n in analysis.nodes}
        n_nodes = scale.n_nodes if scale else max(len(analysis.nodes), 1)
        op_mix, last = _op_mix(analysis, where, n_groups)
        sizes = np.array([grp.size for grp in analysis.groups], dtype=np.float64)
        src = _source_features(analysis, where, by_name, n_nodes, sizes)

        # costs
        total_macs = scale.total_macs if scale else max(float(analysis.total_macs), 1.0)
        flops_share = np.array([grp.macs for grp in analysis.groups]) / total_macs
        if scale:
            params_total = scale.params_total
        elif params_total is None:
            params_total = _params_total(g)
        params_share = _params_share(analysis, where.groups_of, n_groups, params_total)
        imp, ref = _importance_stats(analysis, scores, scale)

        max_units = scale.max_units if scale else math.log2(sizes.max(initial=1) + 1)
        max_fmap = scale.max_fmap if scale else max(src.fmap.max(initial=0.0), 1.0)
        static = np.column_stack([
            op_mix,
            np.log2(np.maximum(sizes, 1)) / max_units,
            np.array([grp.prunable for grp in analysis.groups]) / np.maximum(sizes, 1),
            np.array([grp.prunable == 0 for grp in analysis.groups], dtype=np.float64),
            np.log2(1 + src.n_src) / 4,
            src.residual.astype(np.float64),
            src.concat.astype(np.float64),
            src.kernel / 6,
            src.stride / 2,
            src.dw, src.grouped,
            src.fmap / max_fmap,
            src.depth,
            last / n_nodes,
            flops_share, params_share, np.zeros(n_groups),
            imp,
        ]).astype(np.float32)
        assert static.shape[1] == len(STATIC_NODE_FEATURES)

        edge_index, edge_attr = _edge_features(analysis, by_name, where, sizes, src, max_units)
        topo = np.array(sorted(range(n_groups), key=lambda i: (src.depth[i], i)), dtype=np.int64)
        used = scale or GraphScale(max_units, max_fmap, total_macs, max(float(params_total), 1.0), n_nodes, ref)
        return cls(analysis, static, edge_index, edge_attr, topo, src.sources, used)

    def in_original_order(self, group_of: np.ndarray, original: GroupGraph) -> tuple[np.ndarray, np.ndarray, int]:
        """This (pruned) graph's static features and edge features laid out in `original`'s node and edge order
        (`group_of[g]`: the original group of this graph's group g). An original edge this graph lacks gets zero
        features (no link left); edges this graph adds are dropped (the observation's edge list is fixed) and
        counted: (static, edge_attr, edges dropped or missing)."""
        static = np.empty_like(self.static)
        static[group_of] = self.static
        where = {(int(a), int(b)): i for i, (a, b) in enumerate(original.edge_index.T.tolist())}
        edge_attr = np.zeros_like(original.edge_attr)
        found = 0
        for k, (a, b) in enumerate(self.edge_index.T.tolist()):
            i = where.get((int(group_of[a]), int(group_of[b])))
            if i is not None:
                edge_attr[i] = self.edge_attr[k]
                found += 1
        return static, edge_attr, (self.num_edges - found) + (original.num_edges - found)


# ---- pruned models: their units and groups in terms of the original's ---------------------------------------
def unit_map(analysis: Analysis, removed, pruned: Analysis) -> tuple[np.ndarray, np.ndarray]:
    """(pruned roots, original roots): the unit of the pruned model's analysis that each original unit kept
    became. Source layers are matched by node name; source k's channels in the pruned model are its original
    channels whose unit was not removed, in order. Raises SpaError unless every pruned unit comes from exactly
    one original unit and every kept original unit is found."""
    keep = analysis.keep_mask(removed)
    originals: dict[str, list[np.ndarray]] = {}
    for s in analysis.ctx.sources:
        originals.setdefault(s.node, []).append(s.atoms)
    seen: dict[str, int] = {}
    new, old = [], []
    for s in pruned.ctx.sources:
        k = seen[s.node] = seen.get(s.node, -1) + 1
        olds = originals.get(s.node, [])
        if k >= len(olds):
            raise _mapping_error(f"the pruned model has a source layer '{s.node}' the original lacks")
        atoms = olds[k][keep(olds[k])]
        if len(atoms) != len(s.atoms):
            raise _mapping_error(f"source layer '{s.node}' has {len(s.atoms)} channels, {len(atoms)} were kept")
        new.append(pruned.find(s.atoms))
        old.append(analysis.find(atoms))
    pairs = np.unique(np.stack([np.concatenate(new), np.concatenate(old)]), axis=1) if new else np.zeros((2, 0),
                                                                                                          np.int64)
    kept_units = np.setdiff1d(np.fromiter(analysis.unit_group, np.int64), np.asarray(sorted(removed), np.int64))
    if len(np.unique(pairs[0])) != pairs.shape[1] or len(np.unique(pairs[1])) != pairs.shape[1] \
            or len(pairs[0]) != len(pruned.unit_group) or not np.array_equal(np.unique(pairs[1]), kept_units):
        raise _mapping_error("the pruned model's units do not correspond one to one to the kept original units")
    return pairs[0], pairs[1]


def group_map(analysis: Analysis, pruned: Analysis, new_roots: np.ndarray, old_roots: np.ndarray) -> np.ndarray:
    """group_of[g]: the original group of the pruned model's group g. Raises SpaError unless the groups
    correspond one to one (channel pruning keeps every group alive: min_channels >= 1)."""
    pairs = np.unique(np.array([[pruned.unit_group[int(r)] for r in new_roots],
                                [analysis.unit_group[int(r)] for r in old_roots]], dtype=np.int64).reshape(2, -1), axis=1)
    n = len(analysis.groups)
    if len(pruned.groups) != n or pairs.shape[1] != n or len(np.unique(pairs[0])) != n \
            or len(np.unique(pairs[1])) != n:
        raise _mapping_error(f"the pruned model has {len(pruned.groups)} coupled groups, the original {n}, and "
                             "they do not correspond one to one (the pruning changed how channels are coupled)")
    group_of = np.empty(n, dtype=np.int64)
    group_of[pairs[0]] = pairs[1]
    return group_of


def _mapping_error(why: str) -> SpaError:
    return SpaError(f"iterative episodes: cannot map the pruned model back onto the original: {why}. This happens "
                    "when pruning changes how channels couple: a depthwise or grouped convolution left with one "
                    "channel per group turns into an ordinary or a depthwise one (min_channels >= 2 prevents it), "
                    "attention heads regroup once heads or head_dim shrink. Use one-shot episodes for this model")



class _GroupLocator:
    """Coupled group of every position of a labelling (-1: no atom)."""

    def __init__(self, analysis: Analysis):
        self.analysis = analysis
        self.roots = np.array(sorted(analysis.unit_group), dtype=np.int64)
        self.group_of_root = np.array([analysis.unit_group[int(r)] for r in self.roots], dtype=np.int64)

    def pos_groups(self, atoms: np.ndarray) -> np.ndarray:
        """Group of every position of a labelling (-1: no atom)."""
        r = self.analysis.find(atoms)
        out = np.full(len(r), -1, dtype=np.int64)
        ok = r >= 0
        out[ok] = self.group_of_root[np.searchsorted(self.roots, r[ok])]
        return out

    def groups_of(self, atoms: np.ndarray) -> np.ndarray:
        p = self.pos_groups(atoms)
        return p[p >= 0]


def _op_mix(analysis: Analysis, where: _GroupLocator, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(share of the nodes touching each group by OP_CATEGORIES, topological index of its last node)."""
    g = analysis.ctx.g
    tensor_groups = {name: np.unique(where.groups_of(lab.atoms)) for name, lab in analysis.ctx.labels.items()}
    op_counts = np.zeros((n_groups, len(OP_CATEGORIES)))
    last = np.zeros(n_groups)
    for i, node in enumerate(analysis.nodes):
        touched = set()
        for x in list(node.input) + list(node.output):
            if x in tensor_groups:
                touched.update(tensor_groups[x].tolist())
        if not touched:
            continue
        cat = _category(node, g)
        for gid in touched:
            op_counts[gid, OP_CATEGORIES.index(cat)] += 1
            last[gid] = max(last[gid], i)
    return op_counts / np.maximum(op_counts.sum(axis=1, keepdims=True), 1.0), last


@dataclass
class _Sources:
    """Per group: its source layers (names) and their geometry, depth and kind (residual / concat)."""

    sources: list[list[str]]
    kernel: np.ndarray
    stride: np.ndarray
    dw: np.ndarray
    grouped: np.ndarray
    fmap: np.ndarray
    depth: np.ndarray
    n_src: np.ndarray
    residual: np.ndarray
    concat: np.ndarray


def _source_features(analysis: Analysis, where: _GroupLocator, by_name: dict, n_nodes: int,
                     sizes: np.ndarray) -> _Sources:
    g = analysis.ctx.g
    n_groups = len(analysis.groups)
    node_pos = {n.name: i for i, n in enumerate(analysis.nodes)}
    sources: list[list[str]] = [[] for _ in range(n_groups)]
    src_width = np.zeros(n_groups)
    for s in analysis.ctx.sources:
        for gid in np.unique(where.groups_of(s.atoms)).tolist():
            if s.node not in sources[gid]:
                sources[gid].append(s.node)
                src_width[gid] += len(s.atoms)
    kernel, stride, dw, grouped, fmap = (np.zeros(n_groups) for _ in range(5))
    depth = np.ones(n_groups)
    for gid, names in enumerate(sources):
        geo = [_geometry(by_name[nm], g) for nm in names if nm in by_name]
        if geo:
            kernel[gid] = np.mean([math.log2(max(k, 1)) for k, _, _, _, _ in geo])
            stride[gid] = np.mean([math.log2(max(s, 1)) for _, s, _, _, _ in geo])
            dw[gid] = np.mean([d for _, _, d, _, _ in geo])
            grouped[gid] = np.mean([gr for _, _, _, gr, _ in geo])
            fmap[gid] = np.mean([math.log2(max(f, 1)) for _, _, _, _, f in geo])
            depth[gid] = min(node_pos.get(nm, n_nodes) for nm in names) / n_nodes
    n_src = np.array([len(s) for s in sources], dtype=np.float64)
    residual = (n_src > 1) & (src_width > sizes + 0.5)  # the sources' channels were unified
    concat = (n_src > 1) & ~residual                   # the sources' channels lie end to end
    return _Sources(sources, kernel, stride, dw, grouped, fmap, depth, n_src, residual, concat)


def _importance_stats(analysis: Analysis, scores: dict, scale: GraphScale | None) -> tuple[np.ndarray, float]:
    """(per group: mean, std, min of its unit scores over the largest, clipped log10 level over `ref`; ref: the
    median group mean, or the scale's)."""
    imp = np.zeros((len(analysis.groups), 4))
    means = np.array([np.mean([scores[int(u)] for u in grp.units]) for grp in analysis.groups])
    if scale:
        ref = scale.imp_ref
    else:
        ref = float(np.median(means[means > 0])) if (means > 0).any() else 1.0
    for grp in analysis.groups:
        v = np.array([scores[int(u)] for u in grp.units], dtype=np.float64)
        top = np.abs(v).max()
        w = v / top if top > 0 else v
        level = math.log10(max(means[grp.id], 1e-300) / ref) if means[grp.id] > 0 else -3.0
        imp[grp.id] = [w.mean(), w.std(), w.min(), float(np.clip(level, -3, 3)) / 3]
    return imp, ref


def _edge_features(analysis: Analysis, by_name: dict, where: _GroupLocator, sizes: np.ndarray, src: _Sources,
                   max_units: float) -> tuple[np.ndarray, np.ndarray]:
    """(edge_index (2, E), edge_attr (E, EDGE_FEATURES)) in sorted edge order."""
    edges = _edges(analysis, by_name, where.pos_groups)
    rows, attrs = [], []
    for (a, b), (units, positions, indirect) in sorted(edges.items()):
        rows.append((a, b))
        attrs.append([min(units / sizes[a], 1.0), math.log2(1 + units) / max_units,
                      math.log2(max(positions / max(units, 1), 1.0)) / 12, float(units < sizes[a]),
                      float(src.residual[a]), float(src.concat[a]), float(indirect)])
    edge_index = np.array(rows, dtype=np.int64).T.reshape(2, -1)
    edge_attr = np.array(attrs, dtype=np.float32).reshape(-1, len(EDGE_FEATURES))
    return edge_index, edge_attr


def _category(node, g) -> str:
    if node.op_type in ("Conv", "ConvTranspose"):
        return "grouped_conv" if int(attr(node, "group", 1)) > 1 else "conv"
    if node.op_type == "MatMul" and not any(g.is_const(x) for x in node.input):
        return "linear"  # activation x activation (attention) counts as linear algebra too
    return _CAT.get(node.op_type, "other")


def _geometry(node, g) -> tuple[int, int, float, float, int]:
    """(kernel positions, max stride, depthwise, grouped, output positions per sample) of a source layer."""
    if node.op_type in ("Conv", "ConvTranspose"):
        w = g.const(node.input[1])
        kernel = int(np.prod(w.shape[2:])) if w is not None else 1
        strides = attr(node, "strides", None) or [1]
        group = int(attr(node, "group", 1))
        cin_per_group = w.shape[0 if node.op_type == "ConvTranspose" else 1] if w is not None else 0
        out = g.shapes.get(node.output[0])
        positions = int(np.prod(out[2:])) if out and all(isinstance(d, int) for d in out[2:]) else 1
        return kernel, int(max(strides)), float(group > 1 and cin_per_group == 1), float(group > 1), positions
    out = g.shapes.get(node.output[0]) if node.output else None
    positions = 1
    if node.op_type == "MatMul" and out and len(out) > 2 and all(isinstance(d, int) for d in out[1:-1]):
        positions = int(np.prod(out[1:-1]))
    return 1, 1, 0.0, 0.0, positions


def _params_total(g) -> float:
    """Float initializer elements (the default denominator of `params_share`)."""
    return sum(float(np.prod(g.const_info(n)[0])) for n in g.initializer_names()
               if np.dtype(g.const_info(n)[1]).kind == "f")


def _params_share(analysis: Analysis, groups_of, n_groups: int, total: float | None) -> np.ndarray:
    """Per group: parameter elements of the slices labelled by the group (a tensor sliced on two axes counts
    its share on each axis)."""
    g = analysis.ctx.g
    out = np.zeros(n_groups)
    for ps in analysis.ctx.params:
        name = ps.node.input[ps.input_index]
        if not g.is_const(name):
            continue
        shape, dtype = g.const_info(name)
        if np.dtype(dtype).kind != "f" or not len(ps.atoms):
            continue
        gids = groups_of(ps.atoms)
        if len(gids):
            out += np.bincount(gids, minlength=n_groups) * (float(np.prod(shape)) / len(ps.atoms))
    if total is None:
        total = _params_total(g)
    return out / max(total, 1.0)


def _data_input(node, g) -> str | None:
    if node.op_type == "MatMul":
        for x in node.input:
            if x and not g.is_const(x):
                return x
        return None
    return node.input[0] if node.input else None


def _edges(analysis: Analysis, by_name, pos_groups) -> dict:
    """(A, B) -> [units of A on the links, positions on the links, all links indirect] over the source layers of B."""
    g = analysis.ctx.g
    labels = analysis.ctx.labels
    edges: dict[tuple[int, int], list] = {}
    for s in analysis.ctx.sources:
        node = by_name.get(s.node)
        if node is None or node.op_type not in _SOURCE_OPS:
            continue
        targets = np.unique(pos_groups(s.atoms))
        targets = targets[targets >= 0].tolist()
        x = _data_input(node, g)
        if not x:
            continue
        found = []  # (tensor name, indirect)
        if x in labels:
            found.append((x, False))
        else:  # walk upstream to the nearest labelled tensors
            seen, stack = {x}, [x]
            while stack:
                prod = g.producer.get(stack.pop())
                if prod is None:
                    continue
                for y in prod.input:
                    if not y or y in seen or g.is_const(y):
                        continue
                    seen.add(y)
                    if y in labels:
                        found.append((y, True))
                    else:
                        stack.append(y)
        for t, indirect in found:
            atoms = labels[t].atoms
            pg = pos_groups(atoms)
            roots = analysis.find(atoms)
            for a in np.unique(pg[pg >= 0]).tolist():
                on = pg == a
                units, positions = len(np.unique(roots[on])), int(on.sum())
                for b in targets:
                    if a == b:
                        continue
                    e = edges.setdefault((a, b), [0, 0, True])
                    e[0] += units
                    e[1] += positions
                    e[2] = e[2] and indirect
    return edges
