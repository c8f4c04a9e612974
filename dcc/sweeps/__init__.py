"""The sweep wing: many jobs as one experiment.

``callback`` (a sweep is one MLflow parent run), ``optuna_sweeper`` (the persistent Optuna study),
``launcher`` (SLURM requeue on SIGTERM, GPU pools for local jobs), and the report read back from MLflow:
``paper`` (the paper's tables), ``aggregate`` (runs -> cells over replicates, paired differences from a
baseline arm), ``render`` (Markdown, CSV, chart) and ``report`` (MLflow queries and the ``python -m dcc.report``
command line).
Hydra loads plugins only from ``hydra_plugins/``: the shims there import these modules.
"""
