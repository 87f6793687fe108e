"""The harness: measuring dsgd against tf_keras and across commits (it only imports the optimizer).

``measure`` (the one measurement core: build a case, time it, step statistics, roofline, bytes),
``grid`` (the case grid's command-line options), ``bench`` (``dsgd bench``), ``profile`` +
``profile_summary`` + ``profile_commits`` (``dsgd profile``), ``regress`` (``dsgd regress``),
``isolate`` (worker processes), ``launch`` (``dsgd launch``), ``gitutil`` (the one ``git`` helper),
``models`` (the whole-step modes' models).

Importing this package imports nothing (no TensorFlow): its modules are imported by name.
"""
