"""Layer 5: the search method: the searcher, its records and health, genotype derivation and selection,
random genotypes.
"""
