"""Layer 3: x86 architecture facts: long-mode bring-up, CPUID, LAPIC/x2APIC, MSRs."""
