"""The Python-C++ interface is written once (:mod:`dsgd.kernels.abi`) and mirrored by C++ enums in
``multi_momentum.cc``: the two must name the same fields in the same order."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from dsgd.kernels import abi

SOURCE = Path(abi.__file__).with_name("multi_momentum.cc").read_text()


def _enum(name: str, prefix: str) -> list[str]:
    """The fields of C++ ``enum NAME : int { kPrefixCamel, ..., kPrefixSize }`` as snake_case names."""
    body = re.search(r"enum %s : int \{([^}]*)\}" % name, SOURCE)
    assert body, f"enum {name} not found in multi_momentum.cc"
    fields = [f.strip() for f in body.group(1).split(",") if f.strip()]
    assert all(f.startswith("k" + prefix) for f in fields), fields
    names = [re.sub(r"(?<!^)([A-Z])", r"_\1", f[len("k" + prefix):]).lower() for f in fields]
    return [n for n in names if n != "size"]


@pytest.mark.parametrize("name,prefix,fields", [("Hyper", "Hyper", abi.HYPER), ("Meta", "Meta", abi.META),
                                                 ("GraphInput", "GraphInput", abi.GRAPH_INPUTS)])
def test_cpp_enums_mirror_the_python_definition(name, prefix, fields):
    assert _enum(name, prefix) == list(fields)


def test_vectors_are_built_by_name_in_order():
    assert abi.hyper(ema_momentum=0.99, clipvalue=0.0, weight_decay=1e-4, momentum=0.9) == [0.9, 1e-4, 0.0, 0.99]
    m = abi.meta(**{f: i for i, f in enumerate(abi.META)})
    assert m == list(range(len(abi.META)))
    assert abi.graph_input("grads") == len(abi.GRAPH_INPUTS) - 1


@pytest.mark.parametrize("fields,needle", [(dict(momentum=0.9), "missing"),
                                           (dict(momentum=0.9, weight_decay=0, clipvalue=0, ema_momentum=0,
                                                 lr=0.1), "unknown")])
def test_a_missing_or_unknown_field_is_refused(fields, needle):
    with pytest.raises(TypeError, match=needle):
        abi.hyper(**fields)


def test_no_positional_index_into_hyper_or_meta_is_left():
    """The kernels read the vectors by their enum names, never by a bare number."""
    assert not re.search(r"\bhyper\[\d\]", SOURCE)
    assert not re.search(r"\bmeta\(\d\)", SOURCE)
