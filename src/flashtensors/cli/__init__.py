"""The `flash` command line: a thin client over the library (and, later, the daemon)."""
