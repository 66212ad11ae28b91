"""Row 8, VSM on the TLFS path (issue 14; guest/vsm_bench with --hyperv and --vtl-boot tlfs):
VtlCall+VtlReturn with VTL1 enabled by EnableVpVtl and its entry reasons in its VP assist page,
next to the same round trip on pykvmm's own path (guest/vtl_roundtrip) and that guest's bare
two-KVM_RUN driver (the floor, common.RawPlanes); and the cost of one intercepted write
(MemoryFault -> GPA-intercept message -> VTL1 skips the instruction with HvCallSetVpRegisters ->
VtlReturn), in us and raw exits. Per-operation times are the slope between a short and a long
run of the same guest, so start-up and set-up cancel out. No target: the row says what the TLFS
path and an intercept cost."""

from __future__ import annotations

import collections

from .common import RawPlanes, fmt, image, log, median, per, run_machine, spread

KEYS = ("8_vsm",)
MODE_CALLS, MODE_INTERCEPTS = 1, 2      # guest/vsm_bench: --arg = N | mode << 32


def run(ctx) -> dict:
    from pykvmm.vmm.hyperv import HvConfig
    P = ctx.P
    log("row 8: VSM, TLFS path")
    hv = dict(vcpus=1, planes=2, personality="vtl", hyperv=HvConfig.everything(), vtl_boot="tlfs")
    n = P["vtl_n"]
    samples = collections.defaultdict(list)

    def slope(guest, mode=None, **config):
        arg = (lambda k: k | mode << 32) if mode else (lambda k: k)
        short = run_machine(image(guest), arg=arg(1), **config)[0]
        long_ = run_machine(image(guest), arg=arg(n + 1), **config)[0]
        return (long_ - short) / n * 1e6

    driver = RawPlanes("vtl_roundtrip", "vtl")
    try:
        for _ in range(P["repeats"]):
            samples["tlfs_call_return"].append(slope("vsm_bench", MODE_CALLS, **hv))
            samples["intercept"].append(slope("vsm_bench", MODE_INTERCEPTS, **hv))
            samples["pykvmm_call_return"].append(slope("vtl_roundtrip", vcpus=1, planes=2, personality="vtl"))
            samples["raw_driver"].append(driver.batch(n))
            samples["raw_exit"].append(ctx.raw.batch(P["c_switch_n"] // 4) if ctx.raw else ctx.raw_exit_us)
    finally:
        driver.close()
    counts = collections.Counter()
    _, r, _ = run_machine(image("vsm_bench"), counts=counts, arg=n | MODE_INTERCEPTS << 32, **hv)
    out = {"repeats": P["repeats"], "operations": n, "spread_us": {k: spread(v) for k, v in samples.items()},
           "samples_us": samples, "intercepts": r.stats.get("vsm", {}).get("intercepts"),
           "intercept_ioctls": round(sum(counts.values()) / (n + 1), 3),
           "intercept_ioctls_by_name": per(counts, n + 1)}
    for k, v in samples.items():
        out[k + "_us"] = median(v)
    raw = out["raw_exit_us"]
    out["tlfs_call_return_raw_exits"] = out["tlfs_call_return_us"] / raw
    out["intercept_raw_exits"] = out["intercept_us"] / raw
    out["tlfs_over_pykvmm_path"] = out["tlfs_call_return_us"] / out["pykvmm_call_return_us"]
    return {"8_vsm": out}


def verdicts(rows: dict, add) -> None:
    """No target for this row."""


def table(rows: dict, L) -> None:
    r7 = rows.get("8_vsm")
    if r7:
        L("8", "VtlCall+VtlReturn, TLFS path (hv, VP assist page)", f"{fmt(r7['tlfs_call_return_us'])} us",
          f"{fmt(r7['tlfs_call_return_raw_exits'], 2)} raw exits; {fmt(r7['tlfs_over_pykvmm_path'], 2)}x pykvmm's path")
        L("8", "  pykvmm path (vtl_roundtrip) / its bare 2-KVM_RUN driver (floor)",
          f"{fmt(r7['pykvmm_call_return_us'])} / {fmt(r7['raw_driver_us'])} us", "")
        L("8", "intercepted write (intercept, SetVpRegisters RIP, VtlReturn)", f"{fmt(r7['intercept_us'])} us",
          f"{fmt(r7['intercept_raw_exits'], 2)} raw exits; {fmt(r7['intercept_ioctls'], 2)} ioctls: "
          + ", ".join(f"{k} {v}" for k, v in r7["intercept_ioctls_by_name"].items()))
