"""The harness engine: configs, data, tasks, models, budgets, training and run storage."""
