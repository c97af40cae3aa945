"""Supermasks in Superposition (SupSup): pure compute, no I/O."""
