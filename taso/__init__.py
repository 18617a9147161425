"""TASO: Task-Aligned Sparse Optimization (Miao et al., EMNLP 2025)."""
