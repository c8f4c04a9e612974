"""The engine wing: what runs a job, whatever the method.

``job`` (what run.py does with a composed config: check, run directory, MLflow run, train / predict /
summary), ``trainer`` (the training loop in named pieces), ``checkpoint``, ``resume``, ``preemption``,
``distributed`` (every collective), ``evaluate`` and ``metrics``, ``optim``, ``preflight`` and ``errors``
(fail fast, in one message), ``tracking`` (MLflow: names, store, runs), ``predict``, ``visualize``.
"""
