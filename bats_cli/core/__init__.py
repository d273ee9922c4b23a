"""Layer 0, torch-free: the domain's names and types (errors, search spaces, genotypes, configs,
presets) and bounded file I/O.
"""
