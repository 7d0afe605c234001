"""Which images must share a split: groups, identical files and near-duplicates as a graph.

Images are nodes; an edge joins two images of one patient/slide group, two identical
files (same sha256), or a near-duplicate pair (neardup.py). The connected components are
the split units; the components of the identical/near-duplicate edges alone are the
near-duplicate clusters the manifest records.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from organtrain.data.split import cluster_key, group_key


@dataclass(frozen=True)
class Node:
    """What the graph needs to know of one image."""

    key: str
    sha256: str
    group: str | None


@dataclass(frozen=True)
class Units:
    unit: np.ndarray  # per node: its split unit (component) number
    unit_key: list[str]  # per unit: the key its split is hashed from (split.py)
    cluster: list[str | None]  # per node: its near-duplicate cluster id, None when alone


def split_units(
    organ: str, nodes: Sequence[Node], neardup_pairs: Sequence[tuple[int, int]]
) -> Units:
    """The split units of one organ's images."""
    copies = _chain(_indices_by(nodes, lambda n: n.sha256))
    groups = _chain(_indices_by(nodes, lambda n: n.group, skip_none=True))
    pairs = list(neardup_pairs)
    unit = _components(len(nodes), copies + groups + pairs)
    cluster_of = _components(len(nodes), copies + pairs)
    return Units(unit, _unit_keys(organ, nodes, unit), _cluster_ids(nodes, cluster_of))


def _indices_by(nodes, attribute, skip_none=False) -> list[list[int]]:
    members: dict[str, list[int]] = defaultdict(list)
    for i, node in enumerate(nodes):
        value = attribute(node)
        if value is None and skip_none:
            continue
        members[value].append(i)
    return [m for m in members.values() if len(m) > 1]


def _chain(families: list[list[int]]) -> list[tuple[int, int]]:
    """Edges that connect each family (a path through it is enough)."""
    return [(a, b) for family in families for a, b in itertools.pairwise(family)]


def _components(n: int, edges: Sequence[tuple[int, int]]) -> np.ndarray:
    if not edges:
        return np.arange(n)
    rows, cols = np.asarray(edges, dtype=np.int64).T
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _unit_keys(organ: str, nodes: Sequence[Node], unit: np.ndarray) -> list[str]:
    """Per unit: its smallest group key if it has a group, else its near-duplicate cluster
    key, else its content hash (split.py)."""
    groups: dict[int, set[str]] = defaultdict(set)
    hashes: dict[int, set[str]] = defaultdict(set)
    for node, u in zip(nodes, unit.tolist(), strict=True):
        if node.group is not None:
            groups[u].add(group_key(organ, node.group))
        hashes[u].add(node.sha256)

    def key(u: int) -> str:
        if groups[u]:
            return min(groups[u])
        return min(hashes[u]) if len(hashes[u]) == 1 else cluster_key(min(hashes[u]))

    return [key(u) for u in range(int(unit.max(initial=-1)) + 1)]


def _cluster_ids(nodes: Sequence[Node], cluster_of: np.ndarray) -> list[str | None]:
    """A cluster id (its smallest hash, shortened) for clusters of two or more distinct
    images; identical copies alone are no near-duplicate cluster (duplicate_of says it)."""
    distinct: dict[int, set[str]] = defaultdict(set)
    for node, c in zip(nodes, cluster_of.tolist(), strict=True):
        distinct[c].add(node.sha256)
    return [
        f"nd-{min(distinct[c])[:12]}" if len(distinct[c]) > 1 else None for c in cluster_of.tolist()
    ]
