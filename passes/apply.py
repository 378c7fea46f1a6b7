"""Apply: physically remove the chosen units from every member of their groups.

Parameter slices declared by the rules are cut (an initializer shared by uses that want different cuts is
copied per use; nothing is edited in place), then the rules' rewrites of shape constants and attributes run.
Everything else stays bit-identical. Stale value_info is dropped so the checker re-infers shapes.
"""
from __future__ import annotations

import numpy as np

from spa.groups import Analysis
from spa.ir import release, walk_graphs, walk_nodes

from . import Pass
from .normalize import dead_code


class ApplyContext:
    """What a rule's registered rewrite sees at apply time."""

    def __init__(self, g, keep):
        self.g = g
        self.keep = keep
        self.appended = False
        self.copies: dict[tuple, str] = {}   # (original name, dtype, shape, bytes) -> its copy holding them

    def kept(self, atoms: np.ndarray) -> int:
        return int(self.keep(atoms).sum())

    def private_copy(self, producer, consumer, input_index: int):
        """A producer node that only `consumer` reads: the node itself if nobody else reads its output, else
        a copy appended to the graph (Apply sorts the graph topologically afterwards)."""
        out = producer.output[0]
        readers = [n for n, _ in walk_nodes(self.g.model.graph) if out in n.input]
        if len(readers) <= 1 and out not in self.g.output_names and not self._body_output(out):
            return producer
        clone = self.g.owner.get(id(producer), self.g.model.graph).node.add()  # beside it, in its own body
        clone.CopyFrom(producer)
        clone.name = self.g.unique(producer.name or producer.op_type)
        del clone.output[:]
        clone.output.extend(self.g.unique(o) for o in producer.output)
        consumer.input[input_index] = clone.output[0]
        self.appended = True
        return clone

    def _body_output(self, name: str) -> bool:
        return any(o.name == name for b in walk_graphs(self.g.model.graph) for o in b.output)

    def set_input_const(self, node, i: int, value: np.ndarray) -> None:
        """Point input i of node at an initializer holding `value`: the one it reads where that already holds
        it, else a fresh one (shared constants are never edited in place), one per distinct value of each
        original, so that uses which still agree keep sharing a constant as the original model did
        (onnxruntime's MatMulAddFusion failed to load a BERT whose shared shape constants had been copied
        apart, one copy per Reshape, every copy holding the same value)."""
        value = np.asarray(value)
        base = node.input[i] or f"{node.name}_input{i}"
        current = self.g.const(node.input[i]) if node.input[i] else None
        if current is not None and _value_key(np.asarray(current)) == _value_key(value):
            return
        key = (base, *_value_key(value))
        name = self.copies.get(key)
        if name is None:
            name = self.copies[key] = self.g.add_const(value, base + "_pruned")
        node.input[i] = name


def _value_key(a: np.ndarray) -> tuple:
    """What makes two constants the same value: dtype, shape and bytes."""
    return a.dtype.str, a.shape, a.tobytes()


def cut(array: np.ndarray, slices: list[tuple[int, np.ndarray]]) -> np.ndarray:
    out = array
    for axis, mask in slices:
        if not mask.all():
            out = np.compress(mask, out, axis=axis)
    return out


def toposort(g) -> None:
    """Reorder nodes so every producer precedes its consumers (after copies were appended), in the main graph
    and in every body."""
    for graph in reversed(list(walk_graphs(g.model.graph))):  # bodies first: sorting a graph copies its nodes
        _toposort_graph(graph)


def _toposort_graph(graph) -> None:
    nodes = list(graph.node)
    produced = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    done, order = set(), []
    for start in range(len(nodes)):
        stack = [(start, False)]
        while stack:
            i, expanded = stack.pop()
            if i in done:
                continue
            if expanded:
                done.add(i)
                order.append(i)
                continue
            stack.append((i, True))
            for x in nodes[i].input:
                j = produced.get(x)
                if j is not None and j not in done:
                    stack.append((j, False))
    if order == list(range(len(nodes))):
        return
    copies = [nodes[i] for i in order]
    del graph.node[:]
    graph.node.extend(copies)


def param_cuts(analysis: Analysis, removed_roots: set[int]) -> dict[str, list[tuple]]:
    """The parameter slices the rules declared, resolved for a set of removed units: initializer name ->
    [(node, input index, [(axis, keep mask), ...] sorted by axis)] per use. Apply cuts exactly these (the
    plan file's per-tensor section is written from them too). Read it before Apply runs: Apply points uses
    that cut a shared initializer differently at fresh copies."""
    keep = analysis.keep_mask(removed_roots)
    uses: dict[tuple[int, int], list] = {}
    nodes: dict[int, object] = {}
    for ps in analysis.ctx.params:
        uses.setdefault((id(ps.node), ps.input_index), []).append((ps.axis, keep(ps.atoms)))
        nodes[id(ps.node)] = ps.node
    by_name: dict[str, list] = {}
    for (nid, idx), slices in uses.items():
        node = nodes[nid]
        by_name.setdefault(node.input[idx], []).append((node, idx, sorted(slices, key=lambda s: s[0])))
    return by_name


class Apply(Pass):
    name = "apply"
    rewrites = True

    def __init__(self, analysis: Analysis, removed_roots: set[int]):
        self.analysis = analysis
        self.removed = removed_roots

    def run(self, model) -> dict:
        g = model.graph
        keep = self.analysis.keep_mask(self.removed)
        by_name = param_cuts(self.analysis, self.removed)
        cut_count = 0
        for name, entries in by_name.items():
            if all(m.all() for _, _, sl in entries for _, m in sl):
                continue
            original = g.const(name)
            signatures = {tuple((a, m.tobytes()) for a, m in sl) for _, _, sl in entries}
            all_uses = len(g.consumers.get(name, [])) == len(entries)
            if len(signatures) == 1 and all_uses:
                g.set_const(name, cut(original, entries[0][2]))
                cut_count += 1
                release(original)  # a mapped weight's pages, read once (its cut is in the spill file)
                continue
            for node, idx, sl in entries:  # shared by uses that cut differently: one copy per use
                if all(m.all() for _, m in sl):
                    continue
                node.input[idx] = g.add_const(cut(original, sl), f"{name}_pruned")
                cut_count += 1
            release(original)
        ap = ApplyContext(g, keep)
        for fn in self.analysis.ctx.edits:
            fn(ap)
        for graph in walk_graphs(g.model.graph):  # bodies' too: a kept dim there is stale as well
            del graph.value_info[:]
        if ap.appended:
            toposort(g)
        g.refresh()
        dead_code(g)  # originals of per-use copies, constants the rewrites replaced
        return {"tensors_cut": cut_count, "rewrites": len(self.analysis.ctx.edits)}
