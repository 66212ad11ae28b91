"""Row 10, the Hyper-V personality (issue 13; guest/hv_bench with --hyperv, 1 vCPU, 1 plane):
a hypercall round trip through the page HV_X64_MSR_HYPERCALL names (HvCallGetPartitionId,
memory output), a synthetic MSR read (HV_X64_MSR_VP_INDEX: an MSR-filter exit to pykvmm), and a
SynIC message from HvCallPostMessage to the guest's SINT handler taking it from its message page
(the interrupt, the slot handshake, EOI). References measured in the same repeat: a bare PIO
exit of the same guest under pykvmm (`out PORT_NULL`), a raw cffi exit and the C PIO loop (the
floor of any exit on this host). Per-operation times are the slope between a short and a long
run of the same guest, so start-up and set-up cancel out. No target: the row says what each
enlightenment costs against an exit."""

from __future__ import annotations

import collections

from .common import fmt, image, log, median, paired, per, run_machine, spread

KEYS = ("10_hyperv",)
MODES = {"hypercall": 1, "msr": 2, "message": 3, "pio": 4}     # guest/hv_bench: --arg = N | mode << 32


def run(ctx) -> dict:
    from pykvmm.vmm.hyperv import HvConfig
    P = ctx.P
    log("row 10: Hyper-V personality")
    hv = dict(vcpus=1, planes=1, hyperv=HvConfig.everything())
    n = P["vtl_n"]
    samples = collections.defaultdict(list)

    def slope(mode: int) -> float:
        short = run_machine(image("hv_bench"), arg=1 | mode << 32, **hv)[0]
        long_ = run_machine(image("hv_bench"), arg=(n + 1) | mode << 32, **hv)[0]
        return (long_ - short) / n * 1e6

    for _ in range(P["repeats"]):
        for name, mode in MODES.items():
            samples[name].append(slope(mode))
        samples["raw_exit"].append(ctx.raw.batch(P["c_switch_n"] // 4))
        if ctx.cref.path:
            samples["c_exit"] += ctx.cref.batch(P["c_switch_n"] // 2, "-m", "long", "-i", "-s", "1")
    out = {"repeats": P["repeats"], "operations": n, "spread_us": {k: spread(v) for k, v in samples.items()},
           "samples_us": samples,
           "note": "x_pio / x_c_exit: medians of per-repeat ratios to pykvmm's bare PIO exit of the same "
                   "guest / the C PIO loop, measured in the same repeat"}
    div = lambda x, y: x / y  # noqa: E731
    for name, mode in MODES.items():
        counts = collections.Counter()
        _, r, _ = run_machine(image("hv_bench"), counts=counts, arg=n | mode << 32, **hv)
        out[name] = {"us": median(samples[name]), "x_pio": paired(samples, name, "pio", div),
                     "x_raw_exit": paired(samples, name, "raw_exit", div),
                     "x_c_exit": paired(samples, name, "c_exit", div),
                     "exits_per_op": round(r.exits / n, 3), "ioctls_per_op": round(sum(counts.values()) / n, 3),
                     "ioctls_by_name": per(counts, n)}
    out["raw_exit_us"], out["c_exit_us"] = median(samples["raw_exit"]), median(samples["c_exit"])
    return {"10_hyperv": out}


def verdicts(rows: dict, add) -> None:
    """No target for this row."""


def table(rows: dict, L) -> None:
    r = rows.get("10_hyperv")
    if not r:
        return
    for key, label in (("hypercall", "hypercall via the HV_X64_MSR_HYPERCALL page (GetPartitionId)"),
                       ("msr", "synthetic MSR read (VP_INDEX, MSR-filter exit)"),
                       ("message", "SynIC message: PostMessage -> SINT handler, slot freed"),
                       ("pio", "  reference: bare PIO exit, same guest")):
        d = r[key]
        L("10", label, f"{fmt(d['us'])} us",
          f"{fmt(d['x_pio'], 2)}x PIO exit, {fmt(d['x_c_exit'], 2)}x C exit; {fmt(d['exits_per_op'], 2)} exits, "
          f"{fmt(d['ioctls_per_op'], 2)} ioctls: " + ", ".join(f"{k} {v}" for k, v in d["ioctls_by_name"].items()))
    L("10", "  floors: raw cffi exit / C exit", f"{fmt(r['raw_exit_us'])} / {fmt(r['c_exit_us'])} us", "")
