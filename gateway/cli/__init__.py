"""The `declic` command line: one module per command group."""
