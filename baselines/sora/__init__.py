"""SoRA (Ding et al., EMNLP 2023): options, gated LoRA layer, method."""
