"""Developer tools that are not part of the installed ``chatterbox`` package (parity harness)."""
