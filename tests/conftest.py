"""Test session set-up: 8 logical CPU devices, configured before TensorFlow starts.

Every mesh the tests use (1 device, ``batch=8``, ``batch=2,model=4``, ...) is built over the
first N of these devices with :func:`dsgd.mesh.make_mesh`.
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from dsgd.devices import configure_devices  # noqa: E402

NUM_DEVICES = 8
configure_devices(NUM_DEVICES, "CPU")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

MESHES = ["1", "batch=8", "batch=2,model=4"]


@pytest.fixture(scope="session")
def meshes():
    """Meshes by spec, built once per session."""
    from dsgd.meshspec import make_mesh

    cache = {}

    def get(spec: str):
        if spec not in cache:
            cache[spec] = make_mesh(spec)
        return cache[spec]

    return get


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# Known defects: {nodeid prefix: (needle in the nodeid, reason)}, marked xfail (not skip) so
# that a fix shows up as XPASS.  None open.
KNOWN_DEFECTS: dict[str, tuple[str, str]] = {}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for prefix, (needle, reason) in KNOWN_DEFECTS.items():
            if prefix in item.nodeid and needle in item.nodeid:
                item.add_marker(pytest.mark.xfail(reason=reason, strict=False))
