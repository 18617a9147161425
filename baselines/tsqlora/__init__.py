"""TsqLoRA (Chen et al., arXiv 2509.18585): options, pooled-rank LoRA layer, quality-aware sampling, method."""
