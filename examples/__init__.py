"""Examples run from a checkout (not part of the installed distribution)."""
