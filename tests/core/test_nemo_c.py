from __future__ import annotations

from fbmem.jobs.core.nemo_c import union_by_cluster


def test_union_is_per_cluster_and_per_layer():
    refined = {
        "a": {0: [5, 1], 6: [3]},
        "b": {0: [1, 2], 3: [7]},
        "c": {0: [9]},
        "lonely": {1: [4]},  # no cluster: not part of any union
    }
    clusters = {"a": 0, "b": 0, "c": 1, "d": 1, "lonely": None}
    unions = union_by_cluster(refined, clusters)
    assert unions == {0: {0: [1, 2, 5], 3: [7], 6: [3]}, 1: {0: [9]}}


def test_union_of_nothing_is_empty():
    assert union_by_cluster({}, {"a": 0}) == {}
