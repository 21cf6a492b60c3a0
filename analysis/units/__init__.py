"""The single-unit analysis of a frozen model (docs/methods.md section 2).

Flow: ``features`` (tap features, one forward pass) -> ``readout`` / ``stacked`` / ``lbfgs`` (the
bias-free readout per tap) -> ``matrices`` (every unit's performance matrix from class-conditional
means) -> ``clusters`` and ``summary`` (labels, noise, SNR, coverage, head structure). ``pipeline``
runs it in memory from an ``AnalysisConfig``; ``run`` is the entry point on files
(``python -m analysis.units``); ``results`` and ``figures`` write what it found, ``report`` prints
it, ``reference`` is the brute-force check the tests use.
"""
