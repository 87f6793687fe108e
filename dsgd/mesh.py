"""Meshes and layouts as TensorFlow objects, under their own module name.

:func:`make_mesh` builds a ``dtensor.Mesh`` from a spec on this process's logical devices, or, in
a DTensor multi-client run (:mod:`dsgd.multiclient`), across every client's
(:func:`distributed_mesh`); :func:`parse_layout_spec` turns a layout string into a checked
``dtensor.Layout``.  They are defined in :mod:`dsgd.meshspec`, beside the specs they read, so the
two modules form no import cycle; TensorFlow is imported only when they run.
"""
from __future__ import annotations

from dsgd.meshspec import distributed_mesh, make_mesh, parse_layout_spec

__all__ = ["distributed_mesh", "make_mesh", "parse_layout_spec"]
