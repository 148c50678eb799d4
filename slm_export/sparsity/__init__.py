"""Sparsity: n:m (2:4, 4:8) and unstructured pruning by magnitude, Wanda and SparseGPT."""

from slm_export.sparsity.masks import parse_pattern, satisfies_nm, sparsity_of
from slm_export.sparsity.prune import PRUNE_METHODS, SparsityConfig, prune

__all__ = ["PRUNE_METHODS", "SparsityConfig", "parse_pattern", "prune", "satisfies_nm", "sparsity_of"]
