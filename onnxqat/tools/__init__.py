"""Standalone helper scripts (run by path, possibly under another interpreter)."""
