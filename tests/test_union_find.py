"""spa.labels.UnionFind directly: union / find / classes, its invariants, and random unions against a naive
reference (classes as sets merged by hand)."""
from __future__ import annotations

import numpy as np
import pytest

from spa.groups import root_table
from spa.labels import UnionFind


def classes(uf: UnionFind) -> set[frozenset[int]]:
    roots = uf.find(np.arange(len(uf.parent)))
    out: dict[int, set[int]] = {}
    for atom, root in enumerate(roots.tolist()):
        out.setdefault(root, set()).add(atom)
    return {frozenset(c) for c in out.values()}


class Naive:
    def __init__(self, n: int):
        self.cls = [{i} for i in range(n)]

    def union(self, a: int, b: int) -> None:
        if self.cls[a] is not self.cls[b]:
            merged = self.cls[a] | self.cls[b]
            for x in merged:
                self.cls[x] = merged

    def classes(self) -> set[frozenset[int]]:
        return {frozenset(c) for c in self.cls}


def check_invariants(uf: UnionFind) -> None:
    p = uf.parent
    n = len(p)
    assert p.dtype == np.int64
    assert ((p >= 0) & (p < n)).all()
    assert (p <= np.arange(n)).all(), "a larger root always hooks under the smaller one"
    roots = uf.find(np.arange(n))
    assert (roots[roots] == roots).all() and (p[roots] == roots).all(), "find returns roots"
    # the root of a class is its smallest atom
    for c in classes(uf):
        assert {int(r) for r in uf.find(np.array(sorted(c)))} == {min(c)}


def test_add_returns_fresh_singletons():
    uf = UnionFind()
    assert len(uf.parent) == 0
    a = uf.add(3)
    b = uf.add(2)
    assert a.tolist() == [0, 1, 2] and b.tolist() == [3, 4]
    assert uf.find(np.arange(5)).tolist() == [0, 1, 2, 3, 4]
    assert uf.add(0).tolist() == [] and len(uf.parent) == 5
    check_invariants(uf)


def test_find_scalar_array_and_minus_one():
    uf = UnionFind()
    uf.add(4)
    uf.union_arrays(np.array([3]), np.array([1]))
    assert int(uf.find(3)) == 1 and uf.find(3).shape == ()
    assert uf.find(np.array([-1, 3, -1, 0])).tolist() == [-1, 1, -1, 0]
    assert uf.find(np.array([], dtype=np.int64)).tolist() == []
    assert uf.find(np.array([[3, 2], [-1, 1]])).tolist() == [[1, 2], [-1, 1]]
    check_invariants(uf)


def test_union_arrays_pairs_and_chains():
    uf = UnionFind()
    uf.add(8)
    uf.union_arrays(np.array([0, 2, 4]), np.array([1, 3, 5]))
    assert classes(uf) == {frozenset(s) for s in ({0, 1}, {2, 3}, {4, 5}, {6}, {7})}
    uf.union_arrays(np.array([1, 7]), np.array([3, 3]))  # two writes aiming at the same root
    assert classes(uf) == {frozenset(s) for s in ({0, 1, 2, 3, 7}, {4, 5}, {6})}
    uf.union_arrays(np.array([], dtype=np.int64), np.array([], dtype=np.int64))
    uf.union_arrays(np.array([5]), np.array([5]))  # self-union is a no-op
    assert len(classes(uf)) == 3
    check_invariants(uf)


def test_union_all_ignores_minus_one():
    uf = UnionFind()
    uf.add(6)
    uf.union_all(np.array([5, -1, 2, 4, -1]))
    assert classes(uf) == {frozenset(s) for s in ({2, 4, 5}, {0}, {1}, {3})}
    uf.union_all(np.array([1]))
    uf.union_all(np.array([-1, -1]))
    assert len(classes(uf)) == 4
    check_invariants(uf)


def test_path_compression_points_asked_atoms_at_their_root():
    uf = UnionFind()
    n = 64
    uf.add(n)
    # a long chain built by hand (each atom under its predecessor): find must still resolve it
    uf.parent[1:] = np.arange(n - 1)
    assert uf.find(np.array([n - 1])).tolist() == [0]
    assert uf.parent[n - 1] == 0, "the atom asked about now points at its root"
    asked = np.array([10, 20, 30])
    assert uf.find(asked).tolist() == [0, 0, 0]
    assert (uf.parent[asked] == 0).all()
    before = uf.parent.copy()
    uf.find(np.array([-1]))
    assert (uf.parent == before).all(), "-1 touches nothing"
    assert (uf.find(np.arange(n)) == 0).all() and (uf.parent == 0).all()
    check_invariants(uf)


@pytest.mark.parametrize("seed", range(6))
def test_random_unions_match_naive_reference(seed):
    rng = np.random.default_rng(seed)
    uf = UnionFind()
    naive = Naive(0)
    for _ in range(5):  # atoms arrive in batches, as ops create them, unions interleaved
        k = int(rng.integers(1, 400))
        start = len(naive.cls)
        assert uf.add(k).tolist() == list(range(start, start + k))
        naive.cls += [{i} for i in range(start, start + k)]
        n = len(naive.cls)
        m = int(rng.integers(0, n))
        a, b = rng.integers(0, n, m), rng.integers(0, n, m)
        if rng.random() < 0.5:
            uf.union_arrays(a, b)
        else:
            for x, y in zip(a, b):
                uf.union_all(np.array([x, -1, y]))
        for x, y in zip(a.tolist(), b.tolist()):
            naive.union(x, y)
        assert classes(uf) == naive.classes()
        check_invariants(uf)
    table = root_table(uf)
    assert (table == uf.find(np.arange(len(uf.parent)))).all()


def test_large_union_is_fast_and_exact():
    """100k atoms, 200k random pairs in one vectorised call (the conv/concat rules' usage)."""
    rng = np.random.default_rng(7)
    n = 100_000
    uf = UnionFind()
    uf.add(n)
    a, b = rng.integers(0, n, 2 * n), rng.integers(0, n, 2 * n)
    uf.union_arrays(a, b)
    roots = uf.find(np.arange(n))
    # reference: scipy's connected components of the same pairs
    sp = pytest.importorskip("scipy.sparse")
    csgraph = pytest.importorskip("scipy.sparse.csgraph")
    g = sp.coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n))
    k, labels = csgraph.connected_components(g, directed=False)
    assert len(np.unique(roots)) == k
    # same partition: each reference label maps to one root and vice versa
    pairs = np.unique(np.stack([labels, roots]), axis=1)
    assert pairs.shape[1] == k
    # roots are the minimal atom of their class
    mins = np.full(k, n)
    np.minimum.at(mins, labels, np.arange(n))
    assert (roots == mins[labels]).all()
    assert (uf.parent <= np.arange(n)).all()


def test_root_table_of_empty():
    assert root_table(UnionFind()).tolist() == [0]
