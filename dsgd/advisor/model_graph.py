"""A tf_keras model as plain data: its layers, their variables (by the keys a ``LayoutMap`` looks
them up with), how the layers connect, and the model's inputs and outputs.

:func:`describe_model` is the worker side (it builds the user's ``module:function`` under a recording
``LayoutMap`` on a one-device mesh, as :mod:`dsgd.advisor.read_model` does, and walks the functional
graph); :class:`ModelGraph` is what it returns, read without TensorFlow by the plan rules
(:mod:`dsgd.advisor.step_plans`), the compute model (:mod:`dsgd.advisor.step_compute`) and the
input builder (:mod:`dsgd.harness.model_data`).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

#: Layers that pass each feature through on its own (a Dense pair may be separated by them).
ELEMENTWISE = {"Activation", "ReLU", "LeakyReLU", "PReLU", "ELU", "Softmax", "Dropout", "GaussianNoise",
               "GaussianDropout", "AlphaDropout", "SpatialDropout1D", "SpatialDropout2D", "ThresholdedReLU"}
#: Layers that keep channels apart (a Conv2D pair may be separated by them).
CHANNELWISE = ELEMENTWISE | {"MaxPooling2D", "AveragePooling2D", "MaxPooling1D", "AveragePooling1D",
                             "ZeroPadding2D", "Cropping2D", "UpSampling2D"}


@dataclass
class VarInfo:
    """One trainable variable: its ``LayoutMap`` key (``block0_a.kernel``), shape and dtype."""

    path: str
    shape: tuple
    dtype: str = "float32"

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * _DTYPE_BYTES.get(self.dtype, 4)


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int32": 4, "int64": 8}


@dataclass
class LayerInfo:
    """One layer: its class, variables, the layers it reads, its output shape (batch dim first, None
    when free) and the configuration the rules need (units, heads, filters, ...)."""

    name: str
    cls: str
    variables: list = field(default_factory=list)  # [VarInfo]
    inbound: list = field(default_factory=list)  # names of the layers whose outputs it reads
    output_shape: Optional[list] = None
    input_shapes: list = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def var(self, suffix: str) -> Optional[VarInfo]:
        """The variable whose path ends with ``suffix`` (``kernel``, ``_query_dense.kernel``)."""
        return next((v for v in self.variables if v.path.endswith("." + suffix) or v.path == suffix), None)


@dataclass
class TensorSpecInfo:
    """A model input or output: shape without the batch dimension, dtype, and the batch size the
    ``Input`` fixes (None when free)."""

    name: str
    shape: list
    dtype: str
    batch: Optional[int] = None


@dataclass
class ModelGraph:
    """The model as the advisor reads it (JSON-able: :meth:`to_dict` / :meth:`from_dict`)."""

    target: str
    layers: list  # [LayerInfo], in the model's order
    inputs: list  # [TensorSpecInfo]
    outputs: list  # [TensorSpecInfo]
    functional: bool = True  # False: a subclassed model, whose connections are unknown
    params: int = 0

    # ------------------------------------------------------------------ views
    def layer(self, name: str) -> LayerInfo:
        return next(ly for ly in self.layers if ly.name == name)

    def variables(self) -> list:
        """Every trainable variable, in layer order."""
        return [v for ly in self.layers for v in ly.variables]

    def consumers(self, name: str) -> list:
        """The layers that read ``name``'s output."""
        return [ly for ly in self.layers if name in ly.inbound]

    def next_through(self, name: str, transparent: set) -> Optional[LayerInfo]:
        """The one layer that consumes ``name``'s output, looking through ``transparent`` layers
        (each with a single consumer); None when the output goes to several layers or none."""
        cur = name
        while True:
            nxt = self.consumers(cur)
            if len(nxt) != 1 or len(nxt[0].inbound) != 1:
                return None
            if nxt[0].cls in transparent and not nxt[0].variables:
                cur = nxt[0].name
                continue
            return nxt[0]

    def embedding_vocab(self) -> Optional[int]:
        """The smallest ``input_dim`` of the model's ``Embedding`` layers (token ids must stay below it)."""
        dims = [ly.config.get("input_dim") for ly in self.layers if ly.cls == "Embedding"]
        dims = [d for d in dims if d]
        return min(dims) if dims else None

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelGraph":
        layers = [LayerInfo(**{**ly, "variables": [VarInfo(v["path"], tuple(v["shape"]), v["dtype"])
                                                  for v in ly["variables"]]}) for ly in d["layers"]]
        return cls(d["target"], layers, [TensorSpecInfo(**t) for t in d["inputs"]],
                   [TensorSpecInfo(**t) for t in d["outputs"]], d.get("functional", True), d.get("params", 0))


# ------------------------------------------------------------------ the worker
_CONFIG_KEYS = ("units", "activation", "num_heads", "key_dim", "value_dim", "filters", "kernel_size", "strides",
                "padding", "input_dim", "output_dim", "pool_size", "rate", "epsilon", "output_shape", "equation")


def _shape(s) -> Optional[list]:
    try:
        return [None if d is None else int(d) for d in s]
    except TypeError:
        return None


def _config(layer) -> dict:
    try:
        cfg = layer.get_config()
    except Exception:  # noqa: BLE001 - a custom layer without a config: the rules treat it as opaque
        return {}
    out = {}
    for k in _CONFIG_KEYS:
        if k in cfg:
            v = cfg[k]
            out[k] = list(v) if isinstance(v, tuple) else v if isinstance(v, (int, float, str, list, type(None))) \
                else str(v)
    return out


def build_under(target: str, layout_map, cwd: Optional[str] = None):
    """Call ``module:function`` under ``layout_map``'s scope (the variables become DVariables laid out
    by it), with tf_keras' random generator enabled (dropout RNGs on a mesh) and a fixed seed."""
    import tf_keras

    from dsgd.advisor.read_model import _resolve_function

    fn = _resolve_function(target, cwd)
    tf_keras.backend.experimental.enable_tf_random_generator()
    tf_keras.utils.set_random_seed(1)
    with layout_map.scope():
        model = fn()
    if not isinstance(model, tf_keras.Model):
        raise TypeError(f"--model {target}: the function returned {type(model).__name__}, not a tf_keras Model")
    return model


def describe_model(payload: dict) -> dict:
    """Worker: build ``payload["target"]`` on a one-device mesh and return its :class:`ModelGraph` as a dict."""
    import tf_keras
    from tensorflow.experimental import dtensor

    from dsgd.advisor.read_model import recorded_paths

    mesh = dtensor.create_mesh([("batch", 1)], devices=["CPU:0"])
    with recorded_paths() as paths:
        model = build_under(payload["target"], tf_keras.dtensor.experimental.LayoutMap(mesh), payload.get("cwd"))
    if not model.trainable_variables:
        raise ValueError(f"--model {payload['target']}: the model has no trainable variables; build it (give it an "
                         "Input) inside the function")
    functional = hasattr(model, "_network_nodes") or model.__class__.__name__ in ("Functional", "Sequential")
    layers = []
    seen: set[int] = set()
    for layer in model.layers:
        if layer.__class__.__name__ == "InputLayer":
            continue
        inbound = []
        for node in getattr(layer, "_inbound_nodes", []):
            try:
                ins = node.inbound_layers
            except AttributeError:
                continue
            ins = ins if isinstance(ins, (list, tuple)) else [ins]
            inbound = list(dict.fromkeys(inbound + [x.name for x in ins if x.__class__.__name__ != "InputLayer"]))
        variables = []
        for v in layer.trainable_weights:
            if id(v) in seen:
                continue  # a shared variable belongs to the first layer that holds it
            seen.add(id(v))
            variables.append(VarInfo(paths.get(id(v)) or v.name.split(":")[0], tuple(int(d) for d in v.shape),
                                     v.dtype.name))
        try:
            out_shape = _shape(layer.output.shape)
        except (AttributeError, ValueError):
            out_shape = None
        try:
            ins_shapes = [_shape(t.shape) for t in (layer.input if isinstance(layer.input, (list, tuple))
                                                     else [layer.input])]
        except (AttributeError, ValueError):
            ins_shapes = []
        layers.append(LayerInfo(layer.name, layer.__class__.__name__, variables, inbound, out_shape, ins_shapes,
                                _config(layer)))
    inputs = [TensorSpecInfo(t.name, _shape(t.shape)[1:], t.dtype.name, _shape(t.shape)[0]) for t in model.inputs]
    outputs = [TensorSpecInfo(t.name, _shape(t.shape)[1:], t.dtype.name, _shape(t.shape)[0]) for t in model.outputs]
    graph = ModelGraph(payload["target"], layers, inputs, outputs, functional,
                       int(sum(math.prod(v.shape) for v in model.trainable_variables)))
    return {"graph": graph.to_dict()}


def read_graph(target: str, *, timeout: float = 300.0) -> ModelGraph:
    """:func:`describe_model` in a worker process (one logical device); a model that cannot be built
    raises :class:`~dsgd.workloads.WorkloadError` with the worker's error."""
    from dsgd.harness.isolate import run_isolated
    from dsgd.workloads import WorkloadError

    (res,) = run_isolated("dsgd.advisor.model_graph:describe_model", [{"target": target, "cwd": os.getcwd()}],
                          devices=1, timeout=timeout)
    if res.get("status") != "ok":
        raise WorkloadError(f"--model {target!r}: could not build the model: {res.get('error')}")
    return ModelGraph.from_dict(res["graph"])


__all__ = ["ModelGraph", "LayerInfo", "VarInfo", "TensorSpecInfo", "describe_model", "read_graph", "build_under"]
