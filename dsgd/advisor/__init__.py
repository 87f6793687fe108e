"""The layout advisor: which variable layouts to use for a model on a mesh (``dsgd layouts``).

``plans`` (whole-model layout plans built by rules), ``costmodel`` (the fitted step-time model),
``layouts`` (the command: measure candidate plans, fit, rank, report).

Importing this package imports nothing (no TensorFlow): its modules are imported by name.
"""
