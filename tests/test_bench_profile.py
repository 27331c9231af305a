"""The interval arithmetic of bench/profile_streaming.py (the profiling itself needs a GPU)."""

from bench.profile_streaming import overlap, summarize, union


def test_union_and_overlap():
    assert union([(5, 7), (0, 2), (1, 3)]) == [(0, 3), (5, 7)]
    assert overlap([(0, 10)], [(2, 3), (5, 8)]) == 4
    assert overlap([(0, 1)], [(2, 3)]) == 0


def test_summary_counts_copies_hidden_under_kernels():
    ev = [
        ("Memcpy HtoD (Pinned -> Device)", True, 0, 100),
        ("gemm", True, 50, 150),
        ("Memcpy HtoD (Pinned -> Device)", True, 200, 300),
        ("residency._before", False, 0, 20),
    ]
    s = summarize(ev)
    assert s["copy_ms"] == 0.2 and s["copy_overlapped_pct"] == 25.0 and s["hook_cpu_ms"] == 0.0


def test_kernel_breakdown_subtracts_the_short_run_and_sorts_kernels_by_kind():
    from bench.kernels import kind_of
    from bench.kernels import summarize as breakdown

    assert kind_of("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert kind_of("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention"
    assert kind_of("triton_per_fused_add_mul_native_layer_norm_0") == "triton"
    assert kind_of("triton_red_fused__fused_rms_norm__scaled_dot_product_cudnn_attention_0") == "triton"
    assert kind_of("triton_red_fused__scaled_mm__to_copy_abs_amax_clamp_div_gelu_t_view_5") == "triton"
    assert kind_of("triton_tem_fused_mm_0") == "matmul"
    assert kind_of("void at::native::vectorized_elementwise_kernel") == "other"
    # a step: a 100 µs gemm then a 50 µs attention; both runs decode once (500 µs, "other")
    lo = (
        0.010,
        [("decode", 0, 500)]
        + [("gemm", 600 + 200 * i, 700 + 200 * i) for i in range(2)]
        + [("flash_fwd", 700 + 200 * i, 750 + 200 * i) for i in range(2)],
    )
    hi = (
        0.012,
        [("decode", 0, 500)]
        + [("gemm", 600 + 200 * i, 700 + 200 * i) for i in range(4)]
        + [("flash_fwd", 700 + 200 * i, 750 + 200 * i) for i in range(4)],
    )
    s = breakdown(lo, hi, steps=2)
    assert s["kind_ms"] == {"matmul": 0.1, "attention": 0.05, "other": 0.0}
    assert s["step_ms"] == 1.0 and s["gpu_busy_ms"] == 0.15 and s["gpu_idle_pct"] == 85.0
    assert s["top"][0] == dict(name="gemm", ms=0.1, calls=1.0, kind="matmul")


def test_speed_variants_name_their_compile_settings():
    import pytest

    from bench.bench_speed import parse_variant, recompiles

    assert parse_variant("eager") is None
    assert parse_variant("ours_fp8") == (True, 1.0, {})
    assert parse_variant("ours_bf16_end08_flash") == (False, 0.8, dict(attention="flash"))
    fp8, end, cfg = parse_variant("ours_fp8_static_tuned")
    assert fp8 and cfg["dynamic"] is False and dict(cfg["options"])["coordinate_descent_tuning"] is True
    assert recompiles("ours_bf16_autotune") and not recompiles("ours_bf16_flash")
    with pytest.raises(ValueError, match="unknown modifier 'fastest'"):
        parse_variant("ours_bf16_fastest")


def test_gaps_are_the_idle_stretches_between_kernels():
    from bench.kernels import gaps

    ks = [("a", 0, 100), ("b", 50, 120), ("c", 300, 400), ("d", 420, 500), ("e", 1000, 1100)]
    g = gaps(ks, min_us=50)
    assert g["count"] == 2 and g["total_ms"] == 0.68
    assert g["longest"][0] == dict(us=500.0, after="d", before="e") and g["longest"][1]["after"] == "b"
