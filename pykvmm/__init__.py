"""pykvmm: a userspace VMM on /dev/kvm for developing, testing and debugging VM planes."""
__version__ = "0.1.0"
