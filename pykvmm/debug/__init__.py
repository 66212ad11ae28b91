"""Layer 6: observability: trace exporters, capstone disassembly, state dumps, gdb stub."""
