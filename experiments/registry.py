"""The methods ``method=<name>`` can select: the modules whose :func:`experiments.methods.register_method`
decorators register them, one line each. A method living elsewhere (its own package, a
folder on ``PYTHONPATH``) is added with one line here."""

METHOD_MODULES: list[str] = [
    "taso.method",
    "baselines.adalora.method",
    "baselines.bitfit",
    "baselines.full",
    "baselines.head_only",
    "baselines.lora",
    "baselines.losia.method",
    "baselines.losia.pro",
    "baselines.sora.method",
    "baselines.tsqlora.method",
    "baselines.zero_shot",
]
