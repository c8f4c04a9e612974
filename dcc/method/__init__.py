"""The method wing: CAC as the paper writes it, one concept per file.

``losses`` (L_ce, L_dc and the notation map to the paper), ``overlap`` (the two crops' shared region),
``bank`` (the negative bank), ``consistency`` (the unlabeled branch: two views -> L_dc, and C_w),
``diagnostics`` (what the branch saw, for the diag/ figures), ``selftrain`` (Table 3's ST baseline),
``models`` (backbones, heads, the segmentor and its projector), ``losses_chunked`` (the authors'
memory strategy, kept as a benchmark baseline).
"""
