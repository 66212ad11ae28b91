"""Python constants as an assembler include for the guests under guest/ (``.set NAME, value``),
so guests and the VMM share one source for each number. Importable without cffi or KVM."""


def asm_include(source: str, namespace: dict, prefix: str = "") -> str:
    """Every upper-case int of ``namespace`` (a module's globals) as ``.set PREFIXNAME, value``."""
    lines = [f"/* generated from {source}: do not edit */"]
    for name, value in namespace.items():
        if name.isupper() and isinstance(value, int) and not isinstance(value, bool) and not name.startswith("_"):
            lines.append(f".set {prefix}{name}, {value:#x}")
    return "\n".join(lines) + "\n"
