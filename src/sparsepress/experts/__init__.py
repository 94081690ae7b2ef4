"""Mixture-of-experts support: grouped expert kernels, routing statistics, expert removal and merging,
per-expert sparsity allocation and adaptive (top-p) routing."""
