"""The step profiler: kernel and operator names land in the right category, the summary adds up,
and a tiny CPU profile of a real step finds its matmuls, attention and optimizer."""
from __future__ import annotations

import json
import math

import pytest

from benchmarks.profile_step import OTHER, Row, categorize, main, summarize

KERNEL_NAMES = {  # names as the CUDA profiler and the ATen dispatcher print them
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_"
    "kernel__5x_cublas": "matmul and convolution",
    "nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN": "matmul and convolution",
    "aten::addmm": "matmul and convolution",
    "aten::convolution_backward": "matmul and convolution",
    "pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64, 128>>": "attention",
    "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel)": "attention",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64": "attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "_adaln_fwd_kernel": "triton: adaLN LayerNorm+modulate / gated residual",
    "_adaln_bwd_kernel": "triton: adaLN LayerNorm+modulate / gated residual",
    "_gather_kernel": "triton: token gather / scatter",
    "_scatter_bwd_kernel": "triton: token gather / scatter",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>":
        "optimizer (AdamW) and EMA",
    "aten::lerp_": "optimizer (AdamW) and EMA",
    "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>":
        "layer norm (PyTorch)",
    "void at::native::index_elementwise_kernel<128, 4>": "gather / scatter / index (PyTorch)",
    "Memcpy DtoD (Device -> Device)": "copies, casts, memset",
    "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>": "copies, casts, memset",
    "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>": "elementwise / reductions",
    "aten::mul_": "elementwise / reductions",
    "aten::expand": "allocation and views (host bookkeeping)",  # not aten::exp
    "aten::empty_strided": "allocation and views (host bookkeeping)",
    "triton_poi_fused_add_mul_0": "torch.compile (Inductor) kernels",
    "triton_red_fused_native_layer_norm_1": "torch.compile (Inductor) kernels",
    "some_unknown_kernel": OTHER,
}


@pytest.mark.parametrize("name, category", KERNEL_NAMES.items())
def test_categorize(name, category):
    assert categorize(name) == category


def test_summarize_adds_up_and_sorts():
    rows = [Row("nvjet_gemm", 4, 600.0), Row("_adaln_fwd_kernel", 8, 300.0), Row("aten::mm", 2, 300.0),
            Row("mystery", 1, 100.0)]
    s = summarize(rows, wall_us=2600.0, steps=2)
    assert s["wall_ms_per_step"] == pytest.approx(1.3)
    assert s["profiled_ms_per_step"] == pytest.approx(0.65)
    assert s["busy"] == pytest.approx(1300 / 2600)
    names = [c["category"] for c in s["categories"]]
    assert names[0] == "matmul and convolution" and names[-1] == OTHER
    assert s["categories"][0]["ms_per_step"] == pytest.approx(0.45) and s["categories"][0]["rows"] == 2
    assert math.isclose(sum(c["share"] for c in s["categories"]), 1.0)


def test_tiny_profile_of_a_real_step(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = tmp_path / "prof"
    assert main(["--tiny", "--variant", "mask50", "--steps", "1", "--warmup", "0", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["settings"] == {"model": "tiny/2", "variant": "mask50", "batch": 2, "warmup": 0, "steps": 1}
    summary = report["summary"]
    by_name = {c["category"]: c for c in summary["categories"]}
    # a MaskDiT step runs linear layers, attention, AdamW + EMA and the PyTorch token gather
    for needed in ("matmul and convolution", "attention", "optimizer (AdamW) and EMA",
                   "gather / scatter / index (PyTorch)"):
        assert by_name[needed]["ms_per_step"] > 0, needed
    assert sum(c["ms_per_step"] for c in summary["categories"]) == pytest.approx(summary["profiled_ms_per_step"])
    assert 0 < summary["busy"] <= 1
    assert sum(r["us"] for r in report["rows"]) / 1e3 == pytest.approx(summary["profiled_ms_per_step"])
    text = out.with_suffix(".md").read_text()
    assert "| matmul and convolution |" in text and report["command"] in text


def test_bad_arguments_say_what_to_do(capsys):
    with pytest.raises(SystemExit):
        main(["--tiny", "--steps", "0"])
    assert "--steps must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--tiny", "--model", "huge/2"])
    assert "SIZE/PATCH" in capsys.readouterr().err
