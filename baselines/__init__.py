"""Baseline methods: a small one is one module, one with its own layer a package with the roles
of peft's tuners (``config``, ``layer``, ``method``); each is named in :mod:`experiments.registry`."""
