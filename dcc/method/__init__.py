"""The method wing: CAC as the paper writes it, one concept per file.

``losses`` (L_ce, L_dc and the notation map to the paper), ``overlap`` (the two crops' shared region),
``bank`` (the negative bank), ``consistency`` (the unlabeled branch: two views -> L_dc, and C_w),
``diagnostics`` (what the branch saw, for the diag/ figures), ``models`` (backbones, heads, the segmentor and
its projector). Self-training (Table 3's ST baseline, two trainings) is run by the engine
(``dcc/engine/selftrain.py``); the authors' memory strategy for L_dc, a benchmark baseline, is
``benchmarks/losses_chunked.py``.
"""
