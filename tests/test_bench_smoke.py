"""scripts/bench --quick runs end to end on the real /dev/kvm and writes every row.

A smoke test only: tiny counts, and nothing here looks at how fast anything was.
"""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ROWS = {
    "1_pio_exit": ["c_us", "raw_cffi_us", "pykvmm_us", "pykvmm_over_c", "ioctls_per_exit"],
    "2_plane_round_trip": ["bare_switch", "raw_exit_us", "floor_two_raw_exits_us"],
    "3_cross_plane_ipi": ["host_msi_inactive_plane", "in_kernel_ipi_inactive_plane", "in_kernel_ipi_busy_receiver"],
    "4_startup": ["probe_median_s", "machine_build_ms", "cli_process_exit_median_s"],
    "5_scaling": ["switch_rate", "rss_per_plane"],
    "6_tracing": ["trace_off_us", "trace_on_us", "overhead_us"],
    "9_kut_vmexit": [],
    "10_hyperv": ["hypercall", "msr", "message", "pio", "c_exit_us"],
}


def test_bench_quick_writes_every_row(kvm_available, tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "bench"), "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=3600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["meta"]["quick"] is True
    for row, keys in ROWS.items():
        assert row in data["rows"], f"missing row {row}"
        for key in keys:
            assert key in data["rows"][row], f"row {row} lacks {key}"
    r2 = data["rows"]["2_plane_round_trip"]
    assert r2["bare_switch"]["ioctls_per_round_trip"] > 0
    assert "vtl_call_return" in r2 and "vmpl_call_return" in r2
    assert "vtl_pingpong" in data["rows"]["3_cross_plane_ipi"]
    ipi = data["rows"]["3_cross_plane_ipi"]["in_kernel_ipi_inactive_plane"]
    assert len(ipi) == 2                                   # the default kick interval and a smaller one
    for d in [data["rows"]["3_cross_plane_ipi"]["host_msi_inactive_plane"], *ipi.values()]:
        assert d["to_switch"]["n"] > 0                     # every round was delivered and seen
    for d in data["rows"]["3_cross_plane_ipi"]["vtl1_lapic_timer"].values():   # VTL0 halted, spinning
        assert d["taken"] == d["expiries"] and d["guard_fired"] == 0 and d["late"]["n"] == d["expiries"]
    grid = data["rows"]["5_scaling"]["switch_rate"]
    assert {(d["vcpus"], d["planes"]) for d in grid.values()} == {(v, p) for v in (1, 2, 4, 8) for p in (2, 4, 8)}
    kut = data["rows"]["9_kut_vmexit"]      # pykvmm alone in --quick; an error only without the suite
    assert kut["rows"]["cpuid"]["pykvmm_cycles"] > 0 if "rows" in kut else "kvm-unit-tests not found" in kut["error"]
    assert data["targets"]
    assert "pykvmm bench" in res.stdout
