"""`python -m fusedopt bench` and its parts, run small: the table, the result files, missing peers
reported as missing, and the Nsight Compute report parser (on a CSV in ncu's layout)."""
import dataclasses
import json

import pytest
import torch

from fusedopt.__main__ import main
from fusedopt.benchmarks import adam8bit, adamw, lion, ncu
from fusedopt.benchmarks.harness import Impl, Missing, peer, time_group


def test_missing_peer_is_a_row_not_a_gap():
    absent = peer("fusedopt_no_such_module", "Optimizer", "no-such-package")
    with pytest.raises(Missing, match="no-such-package"):
        absent([])
    group = [Impl("fusedopt Lion", torch.float32, "fp32 p,g,m", 20, lambda ps: __import__("fusedopt").Lion(ps), True),
             Impl("absent peer", torch.float32, "fp32 p,g,m", 20, absent)]
    seen = []
    rows = time_group("1 tensor", [(1000,)], group, "cpu", {}, dict(target_s=0.01, min_reps=5), seen.append)
    assert seen == ["1 tensor | fusedopt Lion", "1 tensor | absent peer"]
    assert rows[0]["timing"].median_ms > 0
    assert rows[1]["error"].startswith("missing (no-such-package")


def test_bench_command_writes_tables_and_results(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_demo.py: OpenMP barriers on a busy 2-core machine
    try:
        results = main(["bench", "--suites", "lion", "--sizes", "1", "--quick", "--mix-scale", "64",
                        "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = results["lion"]["rows"]
    assert results["lion"]["validation_failures"] == {}
    assert {r["impl"] for r in rows} == {"fusedopt Lion", "lion-pytorch", "bnb Lion", "fusedopt Lion8bit", "bnb Lion8bit"}
    assert {r["case"] for r in rows} == {"1 tensor x 1M", "GPT-2 mix, hidden 64"}
    for r in rows:  # every peer is timed or says why not; fusedopt rows are always timed
        assert ("timing" in r) or (not r["is_fusedopt"] and r["error"].startswith(("missing", "failed")))
        if "timing" in r:
            assert r["gbs"] > 0 and r["pct_copy_bw"] > 0
    assert "| 1 tensor x 1M | 1.0M | fusedopt Lion | fp32 p,g,m | 20 |" in out
    saved = json.loads((tmp_path / "lion_cpu.json").read_text())
    assert saved["env"]["command"].startswith("python -m fusedopt bench") and saved["copy_bandwidth_gbs"] > 0
    assert set(saved["env"]["peers"]) == {"bitsandbytes", "torchao", "lion-pytorch", "deepspeed"}
    assert (tmp_path / "lion_cpu.md").read_text().startswith("# lion_cpu")


# Wrong steps each suite's check must catch. AdamW's compares the moments too: a beta2 of 0.99 for
# 0.999 leaves v 10x too large, which bias correction all but hides from p in two steps.
# The 8-bit check allows 5% of the distance travelled, and beta1 0.5 for 0.9 turns the step's
# direction by more.
WRONG_STEPS = {adamw: [dict(lr=0.0), dict(betas=(0.9, 0.99))], adam8bit: [dict(lr=0.0), dict(betas=(0.5, 0.999))],
               lion: [dict(lr=0.0), dict(betas=(0.5, 0.99))]}


@pytest.mark.parametrize("suite,name", [(s, n) for s in WRONG_STEPS for n, i in s.IMPLS.items() if i.is_fusedopt],
                         ids=lambda x: x if isinstance(x, str) else x.NAME)
def test_check_accepts_fusedopt_and_rejects_a_wrong_step(suite, name, monkeypatch):
    """The bench times only what its check accepts: it must pass the real optimizer and fail one
    whose step is off."""
    impl = suite.IMPLS[name]
    assert suite.check(name, "cpu") is None
    for wrong in WRONG_STEPS[suite]:
        def make(params, wrong=wrong):
            opt = impl.make(params)
            for group in opt.param_groups:
                group.update(wrong)
            return opt
        monkeypatch.setitem(suite.IMPLS, name, dataclasses.replace(impl, make=make))
        assert suite.check(name, "cpu") is not None, wrong


NCU_CSV = '''==PROF== Connected to process 1234
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","1234","python","h","void fusedopt::cuda::(anonymous namespace)::adam_kernel<float, float, float, false, false>(fusedopt::cuda::TensorListMeta<6>, AdamArgs)","1","7","(512, 1, 1)","(264, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes.sum","Gbyte","1.88"
"0","1234","python","h","void fusedopt::cuda::(anonymous namespace)::adam_kernel<float, float, float, false, false>(fusedopt::cuda::TensorListMeta<6>, AdamArgs)","1","7","(512, 1, 1)","(264, 1, 1)","0","9.0","Command line profiler metrics","dram__throughput.avg.pct_of_peak_sustained_elapsed","%","91.5"
"0","1234","python","h","void fusedopt::cuda::(anonymous namespace)::adam_kernel<float, float, float, false, false>(fusedopt::cuda::TensorListMeta<6>, AdamArgs)","1","7","(512, 1, 1)","(264, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","msecond","1.10"
"1","1234","python","h","void fusedopt::cuda::(anonymous namespace)::adam_kernel<float, float, float, false, false>(fusedopt::cuda::TensorListMeta<6>, AdamArgs)","1","7","(512, 1, 1)","(264, 1, 1)","0","9.0","Command line profiler metrics","dram__throughput.avg.pct_of_peak_sustained_elapsed","%","93.5"
"1","1234","python","h","void fusedopt::cuda::(anonymous namespace)::adam_kernel<float, float, float, false, false>(fusedopt::cuda::TensorListMeta<6>, AdamArgs)","1","7","(512, 1, 1)","(264, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","usecond","1,200.00"
"2","1234","python","h","void fusedopt::cuda::increment_steps_kernel<0>(fusedopt::cuda::StepList, const float *)","1","7","(128, 1, 1)","(1, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","usecond","2.50"
"2","1234","python","h","void fusedopt::cuda::increment_steps_kernel<0>(fusedopt::cuda::StepList, const float *)","1","7","(128, 1, 1)","(1, 1, 1)","0","9.0","Command line profiler metrics","dram__throughput.avg.pct_of_peak_sustained_elapsed","%","n/a"
'''


def test_ncu_report_is_summarized_per_kernel(tmp_path):
    kernels = ncu.parse(NCU_CSV)
    adam_name = "adam_kernel<float, float, float, false, false>"
    assert set(kernels) == {adam_name, "increment_steps_kernel<0>"}
    adam = kernels[adam_name]
    assert adam["launches"] == 2
    assert adam["median_us"] == pytest.approx(1150.0)  # 1.10 ms and 1,200 us
    assert adam["median_dram_pct"] == pytest.approx(92.5)
    assert adam["median_dram_mb"] == pytest.approx(1880.0)
    assert kernels["increment_steps_kernel<0>"]["median_dram_pct"] is None
    results = tmp_path / "adamw_cuda.md"
    results.write_text("# adamw_cuda\n")
    (tmp_path / "r.csv").write_text(NCU_CSV)
    ncu.main([str(tmp_path / "r.csv"), str(results)])
    text = results.read_text()
    assert "## Nsight Compute" in text and f"| {adam_name} | 2 | 1150.0 | 92.5 | 1880.0 |" in text
    assert json.loads((tmp_path / "adamw_cuda.ncu.json").read_text())["kernels"][adam_name]["launches"] == 2
