"""The layout advisor: which variable layouts to use for a model on a mesh (``dsgd layouts``).

``layouts`` (the command).  The whole training step (``--scope whole``): ``model_graph`` (the model's layers
and variables), ``step_plans`` (candidate meshes and layout maps by rule), ``step_measure`` / ``step_run`` (the
measuring worker and its runner), ``dtensor_program`` (what DTensor ran: collectives, FLOPs, memory),
``step_calibrate`` / ``step_model`` (microbenchmarks and the step model from parts), ``step_memory``,
``step_ranking``, ``step_advice`` (the whole advisor as a call), ``step_report`` / ``step_plot``,
``step_args`` (its argument checks), ``progress`` (the bar).  The optimizer step (``--scope optimizer``):
``plans`` (whole-model layout plans built by rules), ``costmodel`` (the fitted step-time model) and the
modules ``advice`` uses.

Importing this package imports nothing (no TensorFlow): its modules are imported by name.
"""
