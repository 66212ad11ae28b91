"""Which enlightenments a partition has: the hv_* flags as QEMU spells them (hv_x and hv-x
alike), parsed from ``--hyperv`` or from ``--cpu``. Each flag says what the guest sees in
CPUID and which MSRs and hypercalls answer; the rest #GP or return INVALID_HYPERCALL_CODE
exactly as on a Hyper-V without that feature."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...x86 import cpu_model
from . import tlfs as T

# flag -> (what it gives the guest, the flags it needs)
FLAGS = {
    "relaxed": ("CPUID 0x40000004 relaxed-timing recommendation (no watchdogs on a slow host)", ()),
    "vpindex": ("HV_X64_MSR_VP_INDEX", ()),
    "runtime": ("HV_X64_MSR_VP_RUNTIME: the vCPU thread's CPU time in 100 ns", ()),
    "time": ("HV_X64_MSR_TIME_REF_COUNT and the reference TSC page (HV_X64_MSR_REFERENCE_TSC)", ()),
    "frequencies": ("HV_X64_MSR_TSC_FREQUENCY and HV_X64_MSR_APIC_FREQUENCY", ()),
    "reset": ("HV_X64_MSR_RESET (a write of 1 stops the machine: pykvmm cannot reboot)", ()),
    "crash": ("HV_X64_MSR_CRASH_P0..P4 and CRASH_CTL (a crash notification stops the machine)", ()),
    "vapic": ("HV_X64_MSR_EOI/ICR/TPR onto the x2APIC, HV_X64_MSR_VP_ASSIST_PAGE", ()),
    "synic": ("the SynIC: SCONTROL, SVERSION, SIEFP, SIMP, EOM, SINT0-15; HvCallPostMessage, "
              "HvCallSignalEvent; the hyperv-testdev connections", ("vpindex",)),
    "stimer": ("synthetic timers STIMER0-3 (one-shot, periodic, lazy) from the host clock",
               ("synic", "time")),
    "stimer_direct": ("synthetic timers in direct mode (an APIC vector, no message)", ("stimer",)),
    "ipi": ("HvCallSendSyntheticClusterIpi/Ex (= SendIpi/Ex), recommended in CPUID", ("vpindex",)),
    "tlbflush": ("HvCallFlushVirtualAddressSpace/List and the Ex forms, recommended in CPUID", ("vpindex",)),
    "tlbflush_ext": ("extended GVA ranges for the flush-list calls", ("tlbflush",)),
    "xmm_input": ("XMM fast hypercall input (RDX, R8, XMM0-5: 112 bytes)", ()),
    "xmm_output": ("XMM fast hypercall output", ()),
    "vsm": ("Virtual Secure Mode (VTLs = --planes, vtl personality): AccessVsm and AccessVpRegisters, "
            "VTL memory protections, secure intercepts, HvCallGet/SetVpRegisters (pykvmm/vmm/vsm)",
            ("vpindex", "vapic", "synic")),
    "avic": ("CPUID recommendation to avoid auto-EOI (HV_DEPRECATING_AEOI_RECOMMENDED)", ()),
}
VALUE_FLAGS = {"spinlocks": "retry count before HvCallNotifyLongSpinWait (CPUID 0x40000004 EBX)",
               "vendor_id": "the 12-byte vendor signature of CPUID 0x40000000 (default 'Microsoft Hv')"}


class HvFlagError(ValueError):
    pass


@dataclass
class HvConfig:
    flags: set = field(default_factory=set)
    spinlocks: int = T.SPINLOCK_NEVER_NOTIFY
    vendor_id: str = "Microsoft Hv"

    def has(self, flag: str) -> bool:
        return flag in self.flags

    @classmethod
    def everything(cls) -> "HvConfig":
        return cls(flags=set(FLAGS))

    def check(self) -> None:
        for f in sorted(self.flags):
            for need in FLAGS[f][1]:
                if need not in self.flags:
                    raise HvFlagError(f"hv_{f} needs hv_{need}")


def with_needs(flags) -> list[str]:
    """``flags`` (names without hv_) and every flag they need, transitively, needs first."""
    out: list[str] = []

    def add(flag: str) -> None:
        if flag not in out:
            for need in FLAGS[flag][1]:
                add(need)
            out.append(flag)
    for f in flags:
        if f not in FLAGS:
            raise HvFlagError(f"unknown Hyper-V flag hv_{f}")
        add(f)
    return out


def normalize(name: str) -> str | None:
    """'hv-stimer-direct' / 'hv_stimer_direct' -> 'stimer_direct'; None if not an hv flag."""
    n = name.strip().lower().replace("-", "_")
    return n[3:] if n.startswith("hv_") else None


def parse_flags(items, config: HvConfig | None = None) -> HvConfig:
    """Add QEMU-style hv flags (``hv_synic``, ``hv-stimer=on``, ``hv_spinlocks=0x1fff``,
    ``-hv_vapic`` / ``hv_vapic=off``) to ``config``. Raises HvFlagError for anything else."""
    cfg = config or HvConfig()
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        on = True
        if item[0] in "+-":
            on, item = item[0] == "+", item[1:]
        key, _, value = item.partition("=")
        flag = normalize(key)
        if flag is None:
            raise HvFlagError(f"{raw!r} is not a Hyper-V flag (hv_...)")
        if flag in VALUE_FLAGS:
            if not value:
                raise HvFlagError(f"hv_{flag} needs a value (hv_{flag}=...)")
            if flag == "spinlocks":
                try:
                    cfg.spinlocks = int(value, 0)
                except ValueError:
                    raise HvFlagError(f"hv_spinlocks={value!r} is not a number") from None
                if not 0 <= cfg.spinlocks <= 0xFFFFFFFF:
                    raise HvFlagError(f"hv_spinlocks={value} is out of range (0..0xffffffff)")
            else:
                if len(value.encode()) > 12:
                    raise HvFlagError(f"hv_vendor_id={value!r} is longer than 12 bytes")
                cfg.vendor_id = value
            continue
        if flag not in FLAGS:
            raise HvFlagError(f"unknown Hyper-V flag hv_{flag}; known: "
                              + ", ".join("hv_" + f for f in sorted(FLAGS) + sorted(VALUE_FLAGS)))
        if value:
            v = value.lower()
            if v not in ("on", "off", "true", "false", "yes", "no"):
                raise HvFlagError(f"hv_{flag}={value!r}: use on or off")
            on = on and v in ("on", "true", "yes")
        (cfg.flags.add if on else cfg.flags.discard)(flag)
    return cfg


def from_cpu_flags(flags: dict, config: HvConfig | None = None) -> HvConfig:
    """The hv_* part of a --cpu text (cpu_model.CpuSpec.extension_flags("hyperv")), on top of
    ``config`` (``--hyperv``) if given."""
    items = []
    for key, value in flags.items():
        if value is True:
            items.append(key)
        elif value is False:
            items.append(f"{key}=off")
        else:
            items.append(f"{key}={value}")
    cfg = HvConfig(set(config.flags), config.spinlocks, config.vendor_id) if config else HvConfig()
    return parse_flags(items, cfg)


# --cpu hands every hv_*/hv-* flag to this module (QEMU spells the Hyper-V flags there too).
cpu_model.register_flags("hyperv", lambda name: normalize(name.lstrip("+-")) is not None)
