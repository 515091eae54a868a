"""Declic's built-in plugins, installed as `declic_plugins` and loaded through entry points."""
