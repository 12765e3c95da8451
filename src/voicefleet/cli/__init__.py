"""The `vf` command."""
