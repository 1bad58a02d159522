"""Lowering: kernel registry and pattern -> kernel-node rewriting."""
