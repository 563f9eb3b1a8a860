"""fastemp: the fastest correct trainer for EMP-SSL (Tong, Chen, Ma, LeCun 2023)."""

__version__ = "0.1.0"
