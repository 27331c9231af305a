"""The interval arithmetic of bench/profile_streaming.py (the profiling itself needs a GPU)."""
from bench.profile_streaming import overlap, summarize, union


def test_union_and_overlap():
    assert union([(5, 7), (0, 2), (1, 3)]) == [(0, 3), (5, 7)]
    assert overlap([(0, 10)], [(2, 3), (5, 8)]) == 4
    assert overlap([(0, 1)], [(2, 3)]) == 0


def test_summary_counts_copies_hidden_under_kernels():
    ev = [("Memcpy HtoD (Pinned -> Device)", True, 0, 100), ("gemm", True, 50, 150),
          ("Memcpy HtoD (Pinned -> Device)", True, 200, 300), ("residency._before", False, 0, 20)]
    s = summarize(ev)
    assert s["copy_ms"] == 0.2 and s["copy_overlapped_pct"] == 25.0 and s["hook_cpu_ms"] == 0.0
