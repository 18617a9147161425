"""AdaLoRA (Zhang et al., ICLR 2023) through peft: the method, and peft's per-step work batched."""
