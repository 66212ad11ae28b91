class BootError(ValueError):
    """The guest image cannot be booted; the one-line message says why (exit status 2)."""
