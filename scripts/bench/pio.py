"""Row 1, PIO exit round trip: pykvmm's run loop on guest/pio_loop vs a C loop (scripts/pio_ref.c,
compiled here with ``cc -O2``: the same `out; dec; jnz` long-mode loop, irqchip and sync regs)
vs the bare cffi ``Vcpu.raw_run()`` loop; and what one guest instruction costs (the C loop with
64 nops more). Target: pykvmm <= 1.15x C.

Row 6, tracing: the same PIO loop with trace=None vs a list-append sink, measured in row 1's
repeats (so it comes with row 1)."""

from __future__ import annotations

import collections

from pykvmm.uapi import constants as C

from .common import fmt, image, log, median, paired, per, run_machine, spread

KEYS = ("1_pio_exit", "6_tracing")
TARGET_PIO_RATIO = 1.15             # pykvmm / C per PIO exit


def run(ctx) -> dict:
    P, cref, raw = ctx.P, ctx.cref, ctx.raw
    log("row 1/6: PIO exit round trip, tracing on/off")
    img = image("pio_loop")
    n = P["pio_n"]
    sync = C.KVM_SYNC_X86_REGS      # what pykvmm asks for with one plane (personality none)
    c_opts = ["-m", "long", "-i", "-s", str(sync)]

    def pykvmm_time(trace: bool, arg: int) -> float:
        sink = [] if trace else None
        dt, r, _ = run_machine(img, arg=arg, trace=sink.append if trace else None)
        return dt

    # Fixed cost of a run (thread start, DONE, stop) measured with 1 exit, subtracted below.
    fixed = {t: median([pykvmm_time(t, 1) for _ in range(3)]) for t in (False, True)}
    samples = collections.defaultdict(list)
    for rep in range(P["repeats"]):
        if cref.path:
            samples["c"] += cref.batch(n, *c_opts)
            samples["c_real_mode"] += cref.batch(n, "-m", "real")
            # what one guest instruction costs here (kvm_pvm emulates them): 64 nops more per exit
            nn = max(50, n // 16)
            samples["c_guest_insn"].append((cref.batch(nn, *c_opts, "-n", "64")[0] - cref.batch(nn, *c_opts)[0]) / 64)
        samples["raw_cffi"].append(raw.batch(n))
        samples["pykvmm"].append((pykvmm_time(False, n) - fixed[False]) / (n - 1) * 1e6)
        samples["pykvmm_traced"].append((pykvmm_time(True, n) - fixed[True]) / (n - 1) * 1e6)
    counts, calls = collections.Counter(), collections.Counter()
    _, r, _ = run_machine(img, arg=n, counts=counts)
    _, rc, _ = run_machine(img, arg=n, calls=calls)
    calls_per_exit = max(calls.values()) / rc.exits if calls else None     # the vCPU thread
    med = {k: median(v) for k, v in samples.items()}
    div = lambda x, y: x / y  # noqa: E731
    row1 = {
        "n_exits": n, "repeats": P["repeats"],
        "c_us": med.get("c"), "c_config": "long mode, in-kernel irqchip, sync regs " + str(sync),
        "c_real_mode_us": med.get("c_real_mode"),
        "guest_instruction_us": med.get("c_guest_insn"),
        "raw_cffi_us": med["raw_cffi"], "pykvmm_us": med["pykvmm"],
        "pykvmm_over_c": paired(samples, "pykvmm", "c", div),
        "raw_cffi_over_c": paired(samples, "raw_cffi", "c", div),
        "pykvmm_over_raw_cffi": paired(samples, "pykvmm", "raw_cffi", div),
        "python_overhead_us": paired(samples, "pykvmm", "c", lambda x, y: x - y),
        "spread_us": {k: spread(v) for k, v in samples.items()},
        "pykvmm_fixed_run_cost_ms": fixed[False] * 1e3,
        "ioctls_per_exit": per(counts, r.exits),
        "python_calls_per_exit": calls_per_exit,
        "samples_us": samples, "c_error": cref.error,
        "note": "ratios are medians of per-repeat ratios (C, raw and pykvmm measured back to back)",
    }
    row6 = {
        "n_exits": n, "trace_off_us": med["pykvmm"], "trace_on_us": med["pykvmm_traced"],
        "overhead_us": paired(samples, "pykvmm_traced", "pykvmm", lambda x, y: x - y),
        "overhead_pct": paired(samples, "pykvmm_traced", "pykvmm", lambda x, y: (x / y - 1) * 100),
        "sink": "list.append (one TraceEvent per exit plus hypercalls/ucalls)",
    }
    ctx.raw_exit_us, ctx.pio_us = row1["raw_cffi_us"], row1["pykvmm_us"]
    return {"1_pio_exit": row1, "6_tracing": row6}


def verdicts(rows: dict, add) -> None:
    r1 = rows.get("1_pio_exit")
    if r1:
        raw = r1.get("raw_cffi_over_c")
        floor = (f" (the bare cffi KVM_RUN loop alone is {fmt(raw, 2)}x C here: the target is below "
                 f"what any Python loop reaches)" if raw and raw > TARGET_PIO_RATIO else "")
        add(1, "pykvmm / C per PIO exit" + floor, r1["pykvmm_over_c"], TARGET_PIO_RATIO, "x")


def table(rows: dict, L) -> None:
    r1 = rows.get("1_pio_exit")
    if r1:
        L("1", "PIO exit, C reference (long mode, irqchip, sync regs)", f"{fmt(r1['c_us'], 2)} us",
          f"real mode, no irqchip: {fmt(r1['c_real_mode_us'], 2)} us; one guest instruction: "
          f"{fmt(r1['guest_instruction_us'], 2)} us")
        L("1", "PIO exit, raw cffi Vcpu.raw_run() loop", f"{fmt(r1['raw_cffi_us'], 2)} us",
          f"{fmt(r1['raw_cffi_over_c'], 2)}x C" + (f" (above the {TARGET_PIO_RATIO}x target by itself)"
                                                   if (r1['raw_cffi_over_c'] or 0) > TARGET_PIO_RATIO else ""))
        L("1", "PIO exit, pykvmm run loop", f"{fmt(r1['pykvmm_us'], 2)} us",
          f"{fmt(r1['pykvmm_over_c'], 2)}x C, {fmt(r1['pykvmm_over_raw_cffi'], 2)}x raw; ioctls/exit "
          f"{fmt(sum(r1['ioctls_per_exit'].values()), 2)}; Python calls/exit {fmt(r1.get('python_calls_per_exit'), 1)}")
    r6 = rows.get("6_tracing")
    if r6:
        L("6", "PIO exit, trace off / list-append sink", f"{fmt(r6['trace_off_us'], 2)} / {fmt(r6['trace_on_us'], 2)} us",
          f"+{fmt(r6['overhead_us'], 2)} us ({fmt(r6['overhead_pct'], 1)}%)")
