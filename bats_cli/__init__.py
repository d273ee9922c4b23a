"""bats: Binary ArchitecTure Search (Bulat, Martinez, Tzimiropoulos, ECCV 2020)."""

__version__ = "0.1.0"
