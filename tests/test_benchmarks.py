"""The benchmarks' pure parts: the machine description from /proc/cpuinfo text, the peak estimate, the bf16 skip
decision and the FLOP counter. Never timing (the benchmarks measure; tests do not assert speed)."""
import json

import pytest
import torch

from benchmarks.bench_model import Row, bf16_skip_reason, count_flops, format_flops
from benchmarks.machine import (describe_cpuinfo, describe_machine, format_machine, is_noisy, limit_to_kernels,
                                parse_cpuinfo)
from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection

COMMON_FLAGS = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht "
                "syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid pni "
                "pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor "
                "lahf_lm abm bmi1 avx2 smep bmi2 rdseed adx smap clflushopt sha_ni xsaveopt xsavec xgetbv1")
ZEN1_FLAGS = COMMON_FLAGS + " cmp_legacy cr8_legacy sse4a misalignsse 3dnowprefetch osvw topoext perfctr_core"
SAPPHIRE_RAPIDS_FLAGS = COMMON_FLAGS + (" avx512f avx512dq avx512ifma avx512cd avx512bw avx512vl avx_vnni avx512_bf16 "
                                        "avx512vbmi avx512_vnni avx512_bitalg avx512_vpopcntdq amx_bf16 avx512_fp16 "
                                        "amx_tile amx_int8")


def cpuinfo_text(vendor, family, model, name, mhz, flags, cores, threads_per_core=1) -> str:
    """/proc/cpuinfo as Linux writes it (a block per logical CPU, SMT siblings sharing a core id)."""
    blocks = []
    for processor in range(cores * threads_per_core):
        blocks.append(f"""processor\t: {processor}
vendor_id\t: {vendor}
cpu family\t: {family}
model\t\t: {model}
model name\t: {name}
stepping\t: 2
microcode\t: 0x1000065
cpu MHz\t\t: {mhz}
cache size\t: 512 KB
physical id\t: 0
siblings\t: {cores * threads_per_core}
core id\t\t: {processor % cores}
cpu cores\t: {cores}
apicid\t\t: {processor}
fpu\t\t: yes
cpuid level\t: 13
wp\t\t: yes
flags\t\t: {flags}
bugs\t\t: sysret_ss_attrs null_seg spectre_v1 spectre_v2
bogomips\t: 3992.50
TLB size\t: 2560 4K pages
clflush size\t: 64
address sizes\t: 48 bits physical, 48 bits virtual
power management:
""")
    return "\n".join(blocks) + "\n"


EPYC_ZEN1 = cpuinfo_text("AuthenticAMD", 23, 1, "AMD EPYC 7551 32-Core Processor", "1996.250", ZEN1_FLAGS, 2, 2)
EPYC_ZEN2 = cpuinfo_text("AuthenticAMD", 23, 49, "AMD EPYC 7B12", "2249.998", ZEN1_FLAGS, 2)
XEON_SPR = cpuinfo_text("GenuineIntel", 6, 143, "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "2699.998",
                        SAPPHIRE_RAPIDS_FLAGS, 4, 2)


def test_parse_cpuinfo_gives_one_entry_per_logical_cpu():
    processors = parse_cpuinfo(EPYC_ZEN1)
    assert len(processors) == 4
    assert processors[3]["model name"] == "AMD EPYC 7551 32-Core Processor"
    assert processors[3]["core id"] == "1" and processors[3]["power management"] == ""
    with pytest.raises(ValueError):
        describe_cpuinfo("")


@pytest.mark.parametrize("text, capability, bf16_flags, cores, logical, flop_per_cycle, peak_fp32, peak_bf16", [
    # Zen 1 splits each 256-bit AVX2 instruction over 2 x 128-bit FMA datapaths; SMT siblings share a core
    (EPYC_ZEN1, "AVX2", [], 2, 4, 16, 2 * 1.99625 * 16, None),
    (EPYC_ZEN2, "AVX2", [], 2, 2, 32, 2 * 2.249998 * 32, None),
    (XEON_SPR, "AVX-512", ["amx_bf16", "amx_tile", "avx512_bf16"], 4, 8, 64, 4 * 2.699998 * 64, 4 * 2.699998 * 1024),
])
def test_describe_cpuinfo_capability_and_peak(text, capability, bf16_flags, cores, logical, flop_per_cycle,
                                              peak_fp32, peak_bf16):
    machine = describe_cpuinfo(text)
    assert machine["capability"] == capability
    assert machine["native_bf16_flags"] == bf16_flags
    assert machine["cores"] == cores and machine["logical_cpus"] == logical
    assert machine["fp32_flop_per_cycle"] == flop_per_cycle
    assert machine["peak_fp32_gflops"] == pytest.approx(peak_fp32)
    assert machine["peak_bf16_gflops"] == (peak_bf16 and pytest.approx(peak_bf16))


def test_cpufreq_max_clock_wins_over_cpu_mhz():
    machine = describe_cpuinfo(EPYC_ZEN2, max_mhz=3300.0)
    assert machine["mhz_source"] == "cpufreq max"
    assert machine["peak_fp32_gflops"] == pytest.approx(2 * 3.3 * 32)


def test_peak_follows_the_kernels_that_run():
    # AVX-512 switched off on an AVX-512 CPU (how the AVX2 figures are measured): the AVX2 peak, half of AVX-512's
    machine = describe_cpuinfo(XEON_SPR)
    limited = limit_to_kernels(machine, "AVX2")
    assert limited["fp32_flop_per_cycle"] == 32 and "AVX2 kernels" in limited["peak_assumption"]
    assert limited["peak_fp32_gflops"] == pytest.approx(machine["peak_fp32_gflops"] / 2)
    assert limit_to_kernels(machine, "AVX512") is machine
    assert limit_to_kernels(describe_cpuinfo(EPYC_ZEN2), "AVX2")["fp32_flop_per_cycle"] == 32


def test_machine_description_names_the_bf16_and_layout_choices(monkeypatch):
    monkeypatch.setenv("DETR_CUSTOM_CPU_BF16", "emulated")
    monkeypatch.setenv("DETR_CUSTOM_CPU_BACKWARD_LAYOUT", "contiguous")
    text = format_machine(describe_machine())
    assert "bf16 autocast on CPU: replaced by fp32 (DETR_CUSTOM_CPU_BF16=emulated)" in text
    assert "trained convolutions run NCHW (DETR_CUSTOM_CPU_BACKWARD_LAYOUT=contiguous)" in text


def test_machine_description_of_this_machine_formats():
    machine = describe_machine(threads=3)
    text = format_machine(machine)
    assert machine["model_name"] in text and "torch threads 3" in text
    assert f"torch {torch.__version__}" in text and "transformers " in text and "timm " in text
    assert ("WARNING" in text) == is_noisy(machine)
    assert is_noisy({**machine, "load_1min": machine["usable_cpus"] * 0.5 + 0.01})
    assert not is_noisy({**machine, "load_1min": machine["usable_cpus"] * 0.5})


@pytest.mark.parametrize("forced, skipped", [("native", False), ("emulated", True)])
def test_bf16_rows_are_skipped_where_bf16_is_emulated(monkeypatch, forced, skipped):
    monkeypatch.setenv("DETR_CUSTOM_CPU_BF16", forced)
    reason = bf16_skip_reason()
    assert (reason is not None) == skipped
    if skipped:
        assert reason == "skipped: DETR_CUSTOM_CPU_BF16=emulated"      # cpu_bf16_support's why, verbatim


def test_count_flops_counts_matmuls_and_cpu_attention():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
    q = k = v = torch.randn(2, 3, 10, 8)                                # [batch, heads, tokens, head_dim]
    # two matrix products (q k^T, then weights v) of 2 * tokens * tokens * head_dim each, per batch and head
    attention = torch.nn.functional.scaled_dot_product_attention
    assert count_flops(lambda: attention(q, k, v)) == 2 * 3 * 2 * (2 * 10 * 10 * 8)


def test_count_flops_counts_the_fused_convolutions_like_plain_ones():
    # our folded backbone runs conv + ReLU (+ shortcut) as one oneDNN op at inference: same FLOPs as the plain body
    from modeling_detr_custom.testing_utils import padded_batch, tiny_kwargs

    model = DetrCustomForObjectDetection(DetrCustomConfig(**tiny_kwargs())).eval()
    backbone = model.model.backbone
    pixel_values = padded_batch()[0].contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fused = count_flops(lambda: backbone.folded_body()(pixel_values))
        plain = count_flops(lambda: backbone.body(pixel_values))
    assert fused == plain > 0


def test_format_flops():
    machine = {"peak_fp32_gflops": 100.0, "peak_bf16_gflops": 1000.0}
    assert format_flops(Row("fp32", 2.0, 1.0, "", 40e9, 40e9), machine) == ("40.0", "20/40", " 40.0%")
    assert format_flops(Row("bf16", 2.0, 1.0, "", 40e9, 40e9, bf16=True), machine) == ("40.0", "20/40", "  4.0%")
    assert format_flops(Row("b2", 2.0, 1.0, "", 40e9, 30e9), machine)[0] == "40.0/30.0"
    assert format_flops(Row("skipped", None, None, "skipped: why"), machine) == ("", "", "")
    assert format_flops(Row("no peak", 2.0, 1.0, "", 40e9, 40e9), {})[2] == ""


def test_convergence_variants_with_missing_fields_fail_naming_them():
    from benchmarks.bench_convergence import VARIANTS, check_variants

    check_variants(["baseline", "ema"])
    with pytest.raises(ValueError, match=r"'x' sets not_a_field, other_missing: not a config field of this "
                                         r"checkout's training script .*--variants baseline"):
        check_variants(["baseline", "x"], variants={**VARIANTS, "x": {"not_a_field": 1, "other_missing": 2}})
    with pytest.raises(ValueError, match=r"unknown variant\(s\) \['nope'\]"):
        check_variants(["nope"])


def test_convergence_table_format():
    from benchmarks.bench_convergence import format_table

    rows = [{"variant": "baseline", "AP": 0.0112, "AP50": 0.0581, "AR@100": 0.1, "steps/s": 2.345, "wall time": 612.0},
            {"variant": "ema", "AP": 0.02, "AP50": 0.07, "AR@100": 0.125, "steps/s": 2.3, "wall time": 42.0}]
    assert format_table(rows).splitlines() == [
        "| variant | AP | AP50 | AR@100 | steps/s | wall time |", "|---|---:|---:|---:|---:|---:|",
        "| baseline | 0.011 | 0.058 | 0.100 | 2.35 | 10.2 min |", "| ema | 0.020 | 0.070 | 0.125 | 2.30 | 42 s |"]


def test_convergence_benchmark_runs_at_a_tiny_size(tmp_path, data_dir):
    """Two steps of the tiny model, in a process as the benchmark runs each variant: the row read back from the run,
    the markdown written."""
    import yaml
    from tiny_run import TINY_ARGS

    from benchmarks.bench_convergence import COLUMNS, main

    base = tmp_path / "tiny.yaml"
    base.write_text(yaml.safe_dump({**TINY_ARGS, "data_dir": str(data_dir), "seed": 3}))
    rows = main(["--base-config", str(base), "--steps", "2", "--variants", "ema", "--output-dir", str(tmp_path / "b")])
    assert len(rows) == 1 and list(rows[0]) == list(COLUMNS) and rows[0]["variant"] == "ema"
    assert all(0 <= rows[0][c] <= 1 for c in ("AP", "AP50", "AR@100"))
    assert rows[0]["steps/s"] > 0 and rows[0]["wall time"] > 0
    run = json.loads((tmp_path / "b" / "ema" / "run" / "metrics.json").read_text())["run"]
    assert run["ema"]["decay"] == 0.993 and run["global_steps"] == 2 and run["budget"] is None
    table = (tmp_path / "b" / "convergence.md").read_text().splitlines()
    assert table[0] == "| variant | AP | AP50 | AR@100 | steps/s | wall time |" and table[2].startswith("| ema | ")


def test_side_by_side_gives_every_model_the_same_batches_and_a_finite_loss(data_dir):
    """bench_side_by_side's pure parts: square images, flipped boxes, seeded batches shared by the models; each model
    (ours and transformers') builds, takes the batch and returns a finite loss and detections in pixels."""
    from benchmarks.bench_side_by_side import MODELS, SIZE_FOR_LW_DETR, batches, build, load_demo_data, to_example

    SIZE = SIZE_FOR_LW_DETR   # LW-DETR's ViT is built for it (and needs more patches than queries)

    train, _, categories = load_demo_data(data_dir)
    mapping = categories.category_id_to_label
    row = next(r for r in train if len(r["objects"]["bbox"]) and not any(r["objects"]["iscrowd"]))
    pixels, labels = to_example(row, SIZE, False, mapping)
    flipped_pixels, flipped = to_example(row, SIZE, True, mapping)
    assert pixels.shape == (3, SIZE, SIZE) and torch.equal(flipped_pixels, pixels.flip(-1))
    assert torch.allclose(flipped["boxes"][:, 0], 1 - labels["boxes"][:, 0])
    first, second = (list(batches(train, 2, 2, SIZE, 0, mapping)) for _ in range(2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second))
    pixel_values, batch_labels = first[0]
    for name in MODELS:
        torch.manual_seed(0)
        model, post_process = build(name, len(categories.names), categories.id2label)
        loss = model.train()(pixel_values=pixel_values, pixel_mask=torch.ones(2, SIZE, SIZE, dtype=torch.int64),
                             labels=batch_labels).loss
        assert torch.isfinite(loss), name
        with torch.no_grad():
            outputs = model.eval()(pixel_values=pixel_values, pixel_mask=torch.ones(2, SIZE, SIZE, dtype=torch.int64))
        detections = post_process(outputs, [(90, 120), (90, 120)])
        assert len(detections) == 2 and detections[0]["boxes"].shape[-1] == 4, name


def test_rt_detr_benchmark_runs_and_finds_equal_outputs(capsys):
    """bench_rt_detr at its quick size, one round: ours converted from transformers' RT-DETRv2-R18vd gives its
    outputs (the row says so) and both are timed."""
    from benchmarks import bench_rt_detr

    bench_rt_detr.main(["--quick", "--models", "r18", "--rounds", "1"])
    row = next(line for line in capsys.readouterr().out.splitlines() if "R18vd inference fp32" in line)
    assert "top-100 equal" in row and row.split()[7].endswith("x")     # the ratio column
