"""Guest CPU models with QEMU's -cpu syntax: ``MODEL[,+FEAT|-FEAT|FEAT=on|off|PROP=VALUE]...``.

A model is a vendor, family/model/stepping, CPUID levels and a set of feature flags (named as
QEMU names them). The guest's CPUID is KVM_GET_SUPPORTED_CPUID restricted to the model: in
each feature register this module knows (leaf 1 ECX/EDX, leaf 7.0 EBX/ECX/EDX, leaf
0x80000001 ECX/EDX) exactly the model's flags are set, and only those the host can give.
``host`` and ``max`` are everything KVM supports. As QEMU does without ``enforce``, a flag the
host cannot give is dropped with a warning; a flag, model or property pykvmm does not know
how to honour is an error (CpuModelError, exit status 2) that names it.

Other layers add flag families (the Hyper-V personality's ``hv_*``) with register_flags():
their flags are parsed here and handed to them, not applied to CPUID by this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


class CpuModelError(ValueError):
    """The --cpu text names something pykvmm cannot honour; the message says what."""


EAX, EBX, ECX, EDX = "eax", "ebx", "ecx", "edx"
LEAF1, LEAF7, EXT1 = (1, 0), (7, 0), (0x80000001, 0)


def _bits(leaf, reg, names: str) -> dict[str, tuple[tuple[int, int], str, int]]:
    """{name: (leaf, reg, bit)} from space-separated names by bit position ('_' = unnamed)."""
    return {n: (leaf, reg, bit) for bit, n in enumerate(names.split()) if n != "_"}


FEATURES: dict[str, tuple[tuple[int, int], str, int]] = {
    **_bits(LEAF1, EDX, "fpu vme de pse tsc msr pae mce cx8 apic _ sep mtrr pge mca cmov pat pse36 pn "
                        "clflush _ ds acpi mmx fxsr sse sse2 ss ht tm ia64 pbe"),
    **_bits(LEAF1, ECX, "pni pclmulqdq dtes64 monitor ds-cpl vmx smx est tm2 ssse3 cid _ fma cx16 xtpr pdcm "
                        "_ pcid dca sse4.1 sse4.2 x2apic movbe popcnt tsc-deadline aes xsave _ avx f16c rdrand "
                        "hypervisor"),
    **_bits(LEAF7, EBX, "fsgsbase tsc-adjust sgx bmi1 hle avx2 _ smep bmi2 erms invpcid rtm _ _ mpx _ "
                        "avx512f avx512dq rdseed adx smap avx512ifma _ clflushopt clwb intel-pt avx512pf "
                        "avx512er avx512cd sha-ni avx512bw avx512vl"),
    **_bits(LEAF7, ECX, "_ avx512vbmi umip pku _ waitpkg avx512vbmi2 _ gfni vaes vpclmulqdq avx512vnni "
                        "avx512bitalg _ avx512-vpopcntdq _ la57 _ _ _ _ _ rdpid _ bus-lock-detect cldemote _ "
                        "movdiri movdir64b _ sgxlc pks"),
    **_bits(LEAF7, EDX, "_ _ avx512-4vnniw avx512-4fmaps fsrm _ _ _ avx512-vp2intersect _ md-clear _ _ _ "
                        "serialize _ tsx-ldtrk _ pconfig _ _ _ amx-bf16 avx512-fp16 amx-tile amx-int8 spec-ctrl "
                        "stibp _ arch-capabilities core-capability ssbd"),
    **_bits(EXT1, EDX, "_ _ _ _ _ _ _ _ _ _ _ syscall _ _ _ _ _ _ _ _ nx _ mmxext _ _ fxsr-opt pdpe1gb "
                       "rdtscp _ lm 3dnowext 3dnow"),
    **_bits(EXT1, ECX, "lahf-lm cmp-legacy svm extapic cr8legacy abm sse4a misalignsse 3dnowprefetch osvw "
                       "ibs xop skinit wdt _ lwp fma4 tce _ nodeid-msr _ tbm topoext perfctr-core perfctr-nb"),
}
ALIASES = {"sse3": "pni", "sse4_1": "sse4.1", "sse4_2": "sse4.2", "lahf_lm": "lahf-lm",
           "tsc_deadline": "tsc-deadline", "tsc_adjust": "tsc-adjust", "fxsr_opt": "fxsr-opt",
           "i64": "lm", "nodeid_msr": "nodeid-msr", "perfctr_core": "perfctr-core", "sha_ni": "sha-ni"}
MASKED_REGISTERS = {(leaf, reg) for leaf, reg, _ in FEATURES.values()}

PPRO = "fpu de pse tsc msr pae mce cx8 apic sep pge cmov pat fxsr mmx sse sse2"
VENDOR_AMD, VENDOR_INTEL = "AuthenticAMD", "GenuineIntel"


@dataclass(frozen=True)
class ModelDef:
    vendor: str | None            # None: keep the host's
    family: int | None
    model: int | None
    stepping: int | None
    level: int | None             # highest basic leaf; None: the host's
    xlevel: int | None
    features: frozenset | None    # None: every flag the host supports (host, max)


def _model(vendor, family, model, stepping, level, xlevel, features: str) -> ModelDef:
    return ModelDef(vendor, family, model, stepping, level, xlevel, frozenset(features.split()))


# QEMU's definitions (target/i386/cpu.c), plus what QEMU adds under KVM by default
# (kvm_default_props: x2apic on; svm, monitor off) and the hypervisor flag.
_KVM_DEFAULTS = " x2apic hypervisor"
MODELS: dict[str, ModelDef] = {
    "qemu64": _model(VENDOR_AMD, 15, 107, 1, 0xD, 0x8000000A,
                     PPRO + " mtrr clflush mca pse36 pni cx16 lm syscall nx lahf-lm" + _KVM_DEFAULTS),
    "kvm64": _model(VENDOR_INTEL, 15, 6, 1, 0xD, 0x80000008,
                    PPRO + " vme mtrr clflush mca pse36 pni cx16 lm syscall nx" + _KVM_DEFAULTS),
    "Opteron_G1": _model(VENDOR_AMD, 15, 6, 1, 5, 0x80000008,
                         PPRO + " vme mtrr clflush mca pse36 pni lm syscall nx" + _KVM_DEFAULTS),
    "host": ModelDef(None, None, None, None, None, None, None),
    "max": ModelDef(None, None, None, None, None, None, None),
}
DEFAULT_MODEL = "qemu64"          # QEMU's default for x86_64 -machine pc


# ---- extension flag families (e.g. hv_* from the Hyper-V personality) -------------------
_EXTENSIONS: list[tuple[str, Callable[[str], bool]]] = []


def register_flags(owner: str, claims: Callable[[str], bool]) -> None:
    """Let ``owner`` take the flags for which ``claims(name)`` is true (read them from
    CpuSpec.extension_flags(owner)); this module then neither rejects nor applies them."""
    _EXTENSIONS.append((owner, claims))


def _extension_owner(name: str) -> str | None:
    for owner, claims in _EXTENSIONS:
        if claims(name):
            return owner
    return None


@dataclass
class CpuSpec:
    """A parsed --cpu text."""
    model: str
    flags: dict[str, bool] = field(default_factory=dict)      # CPUID flags, in the order given
    vendor: str | None = None
    enforce: bool = False
    extensions: dict[str, dict[str, object]] = field(default_factory=dict)

    def extension_flags(self, owner: str) -> dict[str, object]:
        return self.extensions.get(owner, {})

    def wants(self, name: str, default: bool = False) -> bool:
        return self.flags.get(name, default)


def parse_cpu_spec(text: str) -> CpuSpec:
    """Parse QEMU -cpu syntax; CpuModelError names whatever cannot be honoured."""
    parts = [p.strip() for p in text.split(",")]
    name = parts[0]
    if name not in MODELS:
        raise CpuModelError(f"unknown CPU model {name!r} (pykvmm has: {', '.join(MODELS)})")
    spec = CpuSpec(name)
    for part in parts[1:]:
        if not part:
            continue
        if part[0] in "+-":
            key, value = part[1:], part[0] == "+"
        elif "=" in part:
            key, raw = part.split("=", 1)
            value = raw
        else:
            key, value = part, True
        owner = _extension_owner(key)
        if owner is not None:
            spec.extensions.setdefault(owner, {})[key] = value
            continue
        if key == "vendor" and isinstance(value, str):
            if len(value) != 12:
                raise CpuModelError(f"vendor={value!r}: a CPUID vendor is 12 characters")
            spec.vendor = value
            continue
        if key == "enforce" and value in (True, "on", "true"):
            spec.enforce = True
            continue
        if key == "migratable" and (value in ("yes", "on", "true", True) or MODELS[name].features is None):
            continue   # pykvmm never migrates; host/max already give every supported flag
        if isinstance(value, str):
            if value in ("on", "true", "yes"):
                value = True
            elif value in ("off", "false", "no"):
                value = False
            else:
                raise CpuModelError(f"CPU property {key}={value} is not something pykvmm can honour")
        flag = ALIASES.get(key, key)
        if flag not in FEATURES:
            raise CpuModelError(f"CPU feature or property {key!r} is not something pykvmm can honour")
        spec.flags.pop(flag, None)
        spec.flags[flag] = value
    return spec


# ---- applying a model to KVM_GET_SUPPORTED_CPUID ------------------------------------------
def _entry(cpuid, function: int, index: int = 0):
    for i in range(cpuid.nent):
        e = cpuid.entries[i]
        if e.function == function and e.index == index:
            return e
    return None


def _vendor_regs(vendor: str) -> tuple[int, int, int]:
    raw = vendor.encode()
    return tuple(int.from_bytes(raw[i:i + 4], "little") for i in (0, 4, 8))   # ebx, edx, ecx


def host_flags(cpuid) -> set[str]:
    out = set()
    for name, ((leaf, index), reg, bit) in FEATURES.items():
        e = _entry(cpuid, leaf, index)
        if e is not None and getattr(e, reg) >> bit & 1:
            out.add(name)
    return out


@dataclass
class AppliedModel:
    spec: CpuSpec
    flags: set[str]                    # the guest's flags (known ones)
    warnings: list[str]

    @property
    def x2apic(self) -> bool:
        return "x2apic" in self.flags


def apply_cpu_model(spec: CpuSpec, cpuid) -> AppliedModel:
    """Restrict ``cpuid`` (a KVM_GET_SUPPORTED_CPUID copy, changed in place) to the model."""
    model = MODELS[spec.model]
    supported = host_flags(cpuid) | {"hypervisor"}    # KVM lets the VMM set the hypervisor flag
    wanted = set(supported if model.features is None else model.features)
    for flag, on in spec.flags.items():
        (wanted.add if on else wanted.discard)(flag)
    missing = sorted(wanted - supported)
    if missing and spec.enforce:
        raise CpuModelError(f"this host's KVM cannot give the guest: {', '.join(missing)} (enforce)")
    warnings = [f"host doesn't support requested feature: {f}" for f in missing]
    flags = wanted & supported
    for leaf_index, reg in MASKED_REGISTERS:
        e = _entry(cpuid, *leaf_index)
        if e is not None:
            setattr(e, reg, 0)
    for name in flags:
        (leaf, index), reg, bit = FEATURES[name]
        e = _entry(cpuid, leaf, index)
        if e is not None:
            setattr(e, reg, getattr(e, reg) | (1 << bit))
    vendor = spec.vendor or model.vendor
    _set_identity(cpuid, model, vendor)
    return AppliedModel(spec, flags, warnings)


def _set_identity(cpuid, model: ModelDef, vendor: str | None) -> None:
    keep = []
    for i in range(cpuid.nent):
        e = cpuid.entries[i]
        f = e.function
        if model.level is not None and f < 0x40000000 and f > model.level:
            continue
        if model.xlevel is not None and 0x80000000 <= f and f > model.xlevel:
            continue
        keep.append(i)
    for dst, src in enumerate(keep):       # compact: drop the leaves above the model's levels
        if dst != src:
            cpuid.entries[dst] = cpuid.entries[src]
    cpuid.nent = len(keep)
    leaf0, ext0, leaf1 = _entry(cpuid, 0), _entry(cpuid, 0x80000000), _entry(cpuid, 1)
    if model.level is not None and leaf0 is not None:
        leaf0.eax = min(leaf0.eax, model.level)
    if model.xlevel is not None and ext0 is not None:
        ext0.eax = min(ext0.eax, model.xlevel)
    if vendor is not None:
        for e in (leaf0, ext0):
            if e is not None:
                e.ebx, e.edx, e.ecx = _vendor_regs(vendor)
    if model.family is not None and leaf1 is not None:
        fam, ext_fam = min(model.family, 15), max(0, model.family - 15)
        mod, ext_mod = model.model & 0xF, model.model >> 4
        leaf1.eax = (ext_fam << 20) | (ext_mod << 16) | (fam << 8) | (mod << 4) | model.stepping


def resolve(text: str, cpuid) -> AppliedModel:
    return apply_cpu_model(parse_cpu_spec(text), cpuid)
