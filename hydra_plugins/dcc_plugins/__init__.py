"""Hydra plugins of the dcc project (Hydra loads plugins only from the ``hydra_plugins`` namespace).

The code lives in ``dcc``; these thin classes only give it a plugin name and import it lazily, so
that Hydra's plugin scan at every start stays cheap.
"""
