"""LoSiA and LoSiA-Pro (Wang et al., EMNLP 2025): options, subnet layer, method, Pro variant."""
