"""Row 2, plane round trip: VtlCall + VtlReturn (guest/vtl_roundtrip, personalities vtl and
vmpl) and the bare policy's switch hypercall (guest/bench_switch), in us and ioctls per round
trip (counted with kvm.counting_ioctls), against the floor: the same guest driven by a bare
two-KVM_RUN Python loop (common.RawPlanes), and against two raw exits of row 1 and C loops doing
the same KVM_RUNs alternating between two VMs (plus pykvmm's extra ioctls).
Targets (issue 11): vtl <= 1.5x and vmpl <= 1.1x the bare driver on the same guest."""

from __future__ import annotations

import collections

from .common import RawPlanes, fmt, image, log, median, paired, per, run_machine, spread

KEYS = ("2_plane_round_trip",)
TARGET_OVER_RAW_DRIVER = {"vtl_call_return": 1.5, "vmpl_call_return": 1.1}


def run(ctx) -> dict:
    P, cref, raw = ctx.P, ctx.cref, ctx.raw
    log("row 2: plane round trip")
    kinds = {"bare_switch": ("bench_switch", "none", P["switch_n"])}
    kinds["vtl_call_return"] = ("vtl_roundtrip", "vtl", P["vtl_n"])
    kinds["vmpl_call_return"] = ("vtl_roundtrip", "vmpl", P["vtl_n"])
    fixed = {}
    for k, (g, pers, _) in kinds.items():
        fixed[k] = median([run_machine(image(g), vcpus=1, planes=2, personality=pers, arg=1)[0] for _ in range(3)])
    samples = collections.defaultdict(list)
    # C: the same exits alternating between two VMs (the kernel part of a multivm switch), with
    # the guest's exits from a called stub as pykvmm's hypercall page; and with the extra ioctls
    # pykvmm makes per round trip (an IRR scan per exit, plus GET_DEBUGREGS/GET_XSAVE for vtl).
    base = ["-m", "long", "-i", "-s", "1"]
    c_variants = {"c_two_vms": ["-v", "2"], "c_two_vms_scan": ["-v", "2", "-g", "lD"],
                  "c_two_vms_vtl_ioctls": ["-v", "2", "-g", "ldxD", "-s", "3"]}
    drivers = {k: RawPlanes(g, pers) for k, (g, pers, _) in kinds.items()}
    state_floor = RawPlanes("vtl_roundtrip", "vtl", state_reads=True)   # + the reads vtl cannot skip
    try:
        for rep in range(P["repeats"]):
            samples["raw_exit"].append(raw.batch(P["c_switch_n"] // 4))
            if cref.path:
                samples["c_exit"] += cref.batch(P["c_switch_n"] // 2, *base)
            for k, (g, pers, n) in kinds.items():
                samples[k + "_raw_driver"].append(drivers[k].batch(n))
                dt = run_machine(image(g), vcpus=1, planes=2, personality=pers, arg=n)[0]
                samples[k].append((dt - fixed[k]) / (n - 1) * 1e6)
                if k == "vtl_call_return":
                    samples["vtl_state_floor"].append(state_floor.batch(n))
            if cref.path:
                for k, opts in c_variants.items():
                    samples[k].append(2 * cref.batch(P["c_switch_n"], *base, *opts)[0])   # two exits per round trip
    finally:
        for d in (*drivers.values(), state_floor):
            d.close()
    raw_exit_us, c_exit_us = median(samples["raw_exit"]), median(samples["c_exit"])
    out = {"repeats": P["repeats"], "raw_exit_us": raw_exit_us, "c_exit_us": c_exit_us,
           "floor_two_raw_exits_us": 2 * raw_exit_us,
           "floor_two_c_exits_us": 2 * c_exit_us if c_exit_us else None,
           "note": "raw_exits / c_exits: medians of per-repeat ratios to a raw cffi / C PIO exit measured in "
                   "the same repeat",
           "spread_us": {k: spread(v) for k, v in samples.items()}, "samples_us": samples}
    div = lambda x, y: x / y  # noqa: E731
    for k, (g, pers, n) in kinds.items():
        counts = collections.Counter()
        _, r, _ = run_machine(image(g), vcpus=1, planes=2, personality=pers, arg=n, counts=counts)
        calls = collections.Counter()
        run_machine(image(g), vcpus=1, planes=2, personality=pers, arg=n, calls=calls)
        out[k] = {"guest": g, "personality": pers, "round_trips": n, "us": median(samples[k]),
                  "raw_driver_us": median(samples[k + "_raw_driver"]),
                  "over_raw_driver_us": paired(samples, k, k + "_raw_driver", lambda x, y: x - y),
                  "over_raw_driver": paired(samples, k, k + "_raw_driver", div),
                  "raw_exits": paired(samples, k, "raw_exit", div),
                  "c_exits": paired(samples, k, "c_exit", div),
                  "ioctls_per_round_trip": round(sum(counts.values()) / n, 3),
                  "ioctls_by_name": per(counts, n), "exits_per_round_trip": round(r.exits / n, 3),
                  "python_calls_per_round_trip": round(max(calls.values()) / n, 1) if calls else None,
                  "stats": {key: r.stats.get(key) for key in ("state_ioctls", "shared_state_copies")
                            if key in r.stats}}
    vtl = out["vtl_call_return"]
    vtl["state_floor_us"] = median(samples["vtl_state_floor"])
    vtl["over_state_floor"] = paired(samples, "vtl_call_return", "vtl_state_floor", div)
    vtl["state_floor_over_raw_driver"] = paired(samples, "vtl_state_floor", "vtl_call_return_raw_driver", div)
    for k in c_variants:
        if samples.get(k):
            out[k + "_us"] = median(samples[k])
    out["c_variants"] = {k: " ".join(base + v) for k, v in c_variants.items()}
    if ctx.raw_exit_us is None:
        ctx.raw_exit_us = raw_exit_us
    return {"2_plane_round_trip": out}


def verdicts(rows: dict, add) -> None:
    r2 = rows.get("2_plane_round_trip")
    if r2:
        for key, target in TARGET_OVER_RAW_DRIVER.items():
            add(2, f"{key} / bare 2-KVM_RUN driver, same guest", r2[key]["over_raw_driver"], target, "x")


def table(rows: dict, L) -> None:
    r2 = rows.get("2_plane_round_trip")
    if r2:
        for key, label in (("vtl_call_return", "VtlCall+VtlReturn (vtl)"), ("vmpl_call_return", "VtlCall+VtlReturn (vmpl)"),
                           ("bare_switch", "bare switch hypercall pair")):
            if key in r2:
                d = r2[key]
                L("2", f"plane round trip, {label}", f"{fmt(d['us'])} us",
                  f"{fmt(d['raw_exits'], 2)} raw exits ({fmt(d['c_exits'], 2)} C exits); "
                  f"{fmt(d['ioctls_per_round_trip'], 2)} ioctls: " + ", ".join(f"{k} {v}" for k, v in d["ioctls_by_name"].items())
                  + f"; Python calls {fmt(d.get('python_calls_per_round_trip'))}")
                L("2", f"  same guest, bare 2-KVM_RUN Python driver ({d['guest']})", f"{fmt(d['raw_driver_us'])} us",
                  f"pykvmm adds {fmt(d['over_raw_driver_us'])} us ({fmt(d['over_raw_driver'], 2)}x the driver)")
        d = r2.get("vtl_call_return", {})
        if d.get("state_floor_us") is not None:
            L("2", "  same + the reads vtl cannot skip (DR0-3, XSAVE per switch; LAPIC on return)",
              f"{fmt(d['state_floor_us'])} us", f"{fmt(d['state_floor_over_raw_driver'], 2)}x the bare driver; "
              f"pykvmm vtl is {fmt(d['over_state_floor'], 2)}x this floor")
        L("2", "floor: two raw cffi exits / two C exits", f"{fmt(r2['floor_two_raw_exits_us'])} us",
          f"{fmt(r2['floor_two_c_exits_us'])} us")
        for key, label in (("c_two_vms_us", "C: 2 KVM_RUNs alternating 2 VMs"),
                           ("c_two_vms_scan_us", "C: same + GET_LAPIC per exit (pykvmm bare ioctls)"),
                           ("c_two_vms_vtl_ioctls_us", "C: same + GET_LAPIC/DEBUGREGS/XSAVE per exit")):
            if key in r2:
                L("2", label, f"{fmt(r2[key])} us", "per round trip")
