"""``dsgd.SGD``: a drop-in, mesh-aware, tuned replacement for tf_keras' DTensor SGD.

The API is ``tf.keras.dtensor.experimental.optimizers.SGD``'s (every argument, the older
``gradients_clip_option``/``ema_option`` form included, every method).  What differs:

* the step runs through a *plan* built once (:mod:`dsgd.plan`) and the step engine
  (:mod:`dsgd.step`), which runs an implementation chosen per variable group
  (:mod:`dsgd.impl`), eagerly on each device's local shards where possible, and through
  fused DTensor ops or dsgd's kernel inside ``tf.function``/``model.fit``;
* slots and EMA averages are DVariables with their variable's own layout;
* the reference's defects on a mesh are fixed: EMA is updated and overwritten as
  documented, ``finalize_variable_values`` keeps training, sparse gradients work on
  replicated and row-sharded tables, ``get_config`` round-trips ``mesh`` and
  ``jit_compile``; with ``momentum=0`` no momentum slot is made or moved;
* every bad input is rejected before any op is dispatched, so nothing is half-applied.

This module owns the Keras surface: the constructor and its checks, the learning rate,
the optimizer's variables and slots, ``build``, ``apply_gradients``' argument handling,
EMA's finalize, the config and the weights.  How a step runs is :mod:`dsgd.step`'s.  (It is
~450 lines because that surface is wide: every tf_keras argument, property and method, each
mesh-aware, with the tf_keras docstring of the class.)
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Iterable, Optional

import tensorflow as tf
import tf_keras
from tensorflow.experimental import dtensor
from tensorflow.python.eager import context as _context
from tf_keras.src.optimizers import optimizer as keras_optimizer
from tf_keras.src.optimizers.schedules import learning_rate_schedule

from dsgd import impl as impl_registry
from dsgd import eager_dtensor, options as opt_checks, rules
from dsgd.options import EMAOption, GradientsClipOption
from dsgd.pairs import check_variable, guarded, name_of
from dsgd.plan import Group, StepArgs, new_entry, variable_layout
from dsgd.step import StepEngine, collector_paused
from dsgd.state import named_dvariable, new_slot, to_layout, to_numpy

log = logging.getLogger("dsgd")

_Schedule = learning_rate_schedule.LearningRateSchedule


@tf_keras.saving.register_keras_serializable(package="dsgd")
class SGD(keras_optimizer.Optimizer):
    r"""Gradient descent (with momentum) for DTensor meshes.

    Update rule for parameter ``w`` with gradient ``g`` (see :mod:`dsgd.rules`)::

        momentum == 0:  w = w - learning_rate * g
        momentum > 0:   velocity = momentum * velocity - learning_rate * g
                        w = w + velocity
        nesterov:       velocity = momentum * velocity - learning_rate * g
                        w = w + momentum * velocity - learning_rate * g

    Args:
      learning_rate: float, scalar tensor, zero-argument callable (called every step), or
        a ``LearningRateSchedule``. Defaults to 0.01.
      momentum: float in [0, 1]. Defaults to 0 (plain SGD; no momentum slot is kept).
      nesterov: use Nesterov momentum.
      amsgrad: accepted for signature compatibility with the reference; has no effect on SGD.
      gradients_clip_option: a :class:`dsgd.GradientsClipOption` (older form of the
        ``clipnorm``/``clipvalue``/``global_clipnorm`` keywords).
      ema_option: a :class:`dsgd.EMAOption` (older form of the ``use_ema`` keywords).
      jit_compile: run the step through XLA (the ``xla`` implementation, whose HLO can be
        captured); unlike the reference it is honoured on CPU and kept in ``get_config``.
      name: name prefix of the slot variables.
      mesh: a ``tf.experimental.dtensor.Mesh``; variables must be DVariables on it.
      weight_decay: decoupled decay ``w -= w * weight_decay * lr`` before each update.
      clipnorm, clipvalue, global_clipnorm: gradient clipping (at most one of
        ``clipnorm``/``global_clipnorm``; ``clipvalue`` applies when neither is set).
      use_ema, ema_momentum, ema_overwrite_frequency: exponential moving average of the
        weights, as documented for tf_keras (and, unlike it, also on a mesh).
      implementation: ``"auto"`` (default) or a name from ``dsgd.impl.REGISTRY``.
        ``auto``: eagerly, ``grouped`` (one multi-tensor kernel per device and group) when
        its kernel is available, else ``per_shard``; inside ``tf.function``, ``fused``;
        with ``jit_compile=True``, ``xla``.
      momentum_dtype: dtype of the momentum slots (e.g. ``"float32"`` for bfloat16
        variables); default: the variable's dtype. Needs an implementation that mixes
        dtypes (``ops``, ``grouped``).
    """

    _engine: Optional[StepEngine] = None  # the step engine, set once by build()

    def __init__(
        self,
        learning_rate: Any = 0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        amsgrad: bool = False,
        gradients_clip_option: Optional[GradientsClipOption] = None,
        ema_option: Optional[EMAOption] = None,
        jit_compile: bool = False,
        name: str = "SGD",
        mesh: Optional[dtensor.Mesh] = None,
        weight_decay: Optional[float] = None,
        clipnorm: Optional[float] = None,
        clipvalue: Optional[float] = None,
        global_clipnorm: Optional[float] = None,
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_overwrite_frequency: Optional[int] = None,
        implementation: str = "auto",
        momentum_dtype: Optional[str] = None,
        **kwargs,
    ):
        # --- validate everything before any TensorFlow state exists ---------------------
        opt_checks.check_extra_kwargs(kwargs)
        if kwargs.get("lr") is not None:
            learning_rate = kwargs["lr"]
        if mesh is not None and not isinstance(mesh, dtensor.Mesh):
            raise TypeError(f"`mesh` must be a tf.experimental.dtensor.Mesh or None, got {type(mesh).__name__}")
        opt_checks.check_learning_rate(learning_rate)
        if isinstance(momentum, (tf.Tensor, tf.Variable)):
            momentum = opt_checks.constant_momentum(momentum)
        opt_checks.check_unit_interval("momentum", momentum)
        opt_checks.check_nonneg_finite("weight_decay", weight_decay)
        clipnorm, clipvalue, global_clipnorm = opt_checks.merge_clip_options(
            clipnorm, clipvalue, global_clipnorm, gradients_clip_option)
        use_ema, ema_momentum, ema_overwrite_frequency = opt_checks.merge_ema_options(
            use_ema, ema_momentum, ema_overwrite_frequency, ema_option)
        if implementation not in impl_registry.CHOICES:
            raise ValueError(f"`implementation` must be one of {list(impl_registry.CHOICES)}, got {implementation!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"`name` must be a non-empty string, got {name!r}")
        if momentum_dtype is not None:
            momentum_dtype = tf.as_dtype(momentum_dtype).name
        # --- state -----------------------------------------------------------------------
        super().__init__(
            name=name, weight_decay=weight_decay, clipnorm=clipnorm, clipvalue=clipvalue,
            global_clipnorm=global_clipnorm, use_ema=use_ema, ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency, jit_compile=False, mesh=mesh,
        )
        self._requested_jit_compile = bool(jit_compile)
        self.jit_compile = bool(jit_compile)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.amsgrad = bool(amsgrad)
        self.implementation = implementation
        self.momentum_dtype = momentum_dtype
        self._lr_callable: Optional[Callable[[], Any]] = None
        self._learning_rate = self._build_learning_rate(learning_rate)

    # ------------------------------------------------------------------ learning rate
    def _build_learning_rate(self, learning_rate):
        if callable(learning_rate) and not isinstance(learning_rate, (_Schedule, tf.Variable)):
            self._lr_callable = learning_rate
            learning_rate = float(learning_rate())
            opt_checks.check_learning_rate(learning_rate)
        if isinstance(learning_rate, tf.Variable) and self._mesh is not None and variable_layout(learning_rate) is None:
            learning_rate = learning_rate.numpy()
        return super()._build_learning_rate(learning_rate)

    @property
    def learning_rate(self):
        return super().learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        if callable(learning_rate) and not isinstance(learning_rate, (_Schedule, tf.Variable)):
            value = learning_rate()
            opt_checks.check_learning_rate(value)
            self._lr_callable = learning_rate
            learning_rate = value
        elif not isinstance(learning_rate, _Schedule):
            opt_checks.check_learning_rate(learning_rate)
            self._lr_callable = None
        if isinstance(learning_rate, _Schedule):
            self._learning_rate = learning_rate
            return
        if isinstance(self._learning_rate, _Schedule):
            raise TypeError(
                "This optimizer was created with a `LearningRateSchedule` as its `learning_rate`, "
                "hence its learning rate is not settable.")
        self._learning_rate.assign(to_layout(tf.cast(learning_rate, self._learning_rate.dtype),
                                             variable_layout(self._learning_rate)))

    @property
    def lr(self):
        return self.learning_rate

    @lr.setter
    def lr(self, learning_rate):
        self.learning_rate = learning_rate

    def _compute_current_learning_rate(self):
        if self._lr_callable is not None:
            value = self._lr_callable()
            if tf.executing_eagerly():
                opt_checks.check_learning_rate(value)
            self._learning_rate.assign(to_layout(tf.cast(value, self._learning_rate.dtype),
                                                 variable_layout(self._learning_rate)))
            return
        super()._compute_current_learning_rate()

    # ------------------------------------------------------------------ variables
    def add_variable(self, shape, dtype=None, initializer="zeros", name=None):
        """An optimizer variable; a replicated DVariable on the optimizer's mesh."""
        if self._mesh is None:
            return super().add_variable(shape, dtype, initializer, name)
        init = tf_keras.initializers.get(initializer) if isinstance(initializer, str) else initializer
        dtype = tf.as_dtype(dtype or tf_keras.backend.floatx())
        shape = [] if shape is None else list(shape)
        layout = dtensor.Layout.replicated(self._mesh, len(shape))
        value = dtensor.call_with_layout(tf.function(lambda: init(shape, dtype)), layout)
        v = dtensor.DVariable(value, name=name, trainable=False)
        self._variables.append(v)
        return v

    def add_variable_from_reference(self, model_variable, variable_name, shape=None, initial_value=None):
        """A slot with ``model_variable``'s shape, dtype and (on a mesh) exact layout."""
        if shape is not None and list(shape) != list(model_variable.shape):
            if self._mesh is None:
                return super().add_variable_from_reference(model_variable, variable_name, shape, initial_value)
            layout = dtensor.Layout.replicated(self._mesh, len(shape))
            init = to_layout(initial_value if initial_value is not None else tf.zeros(shape, model_variable.dtype), layout)
            v = named_dvariable(init, f"{variable_name}/{model_variable._shared_name}")
        else:
            v = new_slot(model_variable, variable_name, initial_value=initial_value)
        self._variables.append(v)
        return v

    def build(self, var_list):
        """Create the momentum (and EMA) slots and the step plan for ``var_list``."""
        if getattr(self, "_built", False):
            return
        var_list = list(var_list)
        for v in var_list:
            check_variable(v, self._mesh)
        self._build_index_dict(var_list)
        self.momentums = []
        self._model_variables_moving_average = []
        entries = []
        # an implementation may keep its slots in another layout (sharded_state: ZeRO-1)
        slot_layout = getattr(impl_registry.REGISTRY.get(self.implementation), "slot_layout", None)
        for i, var in enumerate(var_list):
            layout = variable_layout(var)
            s_layout = slot_layout(layout, list(var.shape)) if slot_layout is not None else None
            m = None
            if self.momentum != 0:
                m = new_slot(var, "m", dtype=self.momentum_dtype, layout=s_layout)
                self._variables.append(m)
                self.momentums.append(m)
            avg = None
            if self.use_ema:
                if s_layout is not None:
                    avg = new_slot(var, "average", initial_value=var, layout=s_layout)
                    self._variables.append(avg)
                else:
                    avg = self.add_variable_from_reference(var, "average", initial_value=var)
                self._model_variables_moving_average.append(avg)
            entries.append(new_entry(i, var, self._var_key(var), m, avg, self._use_weight_decay(var), layout))
        # Set through __dict__, once: AutoTrackable tracks what is assigned to its attributes
        # (wrapping containers, making Trackables checkpoint dependencies); the engine holds no
        # state of its own (its variables are tracked through ``_variables``), so it stays
        # invisible to checkpoints, and the step reads it as a plain attribute.
        self.__dict__["_engine"] = StepEngine(entries, self, self._mesh, self._var_key)
        self._built = True

    # ------------------------------------------------------------------ the step
    @tf.autograph.experimental.do_not_convert  # plain Python: nothing here for autograph to convert
    def apply_gradients(self, grads_and_vars: Iterable, name: Optional[str] = None,
                        skip_gradients_aggregation: bool = False, **kwargs):
        """Apply ``(gradient, variable)`` pairs; returns the iterations variable.

        Every pair is checked (shape, dtype, mesh and, eagerly, layout) before any op is
        dispatched; one bad pair leaves every variable untouched.  ``None`` gradients are
        skipped with a warning; an empty list is a no-op.
        """
        if not tf.executing_eagerly():
            return self._apply_gradients(grads_and_vars, name)
        with collector_paused():
            return self._apply_gradients(grads_and_vars, name)

    def _apply_gradients(self, grads_and_vars: Iterable, name: Optional[str]):
        pairs = list(grads_and_vars)
        if not pairs:
            return self._iterations
        for p in pairs:
            if not isinstance(p, (tuple, list)) or len(p) != 2:
                raise TypeError(f"`grads_and_vars` must hold (gradient, variable) pairs, got {p!r}")
        all_vars = [v for _, v in pairs]
        kept = [(g, v) for g, v in pairs if g is not None]
        if not kept:
            # tf_keras' error (and its start of message); silently training nothing is worse
            raise ValueError(
                f"No gradients provided for any variable: {[name_of(v) for v in all_vars]}. Every gradient is "
                "None: the loss does not depend on these variables (check `var_list`, or give model.compile() "
                "a `loss`)")
        if len(kept) < len(pairs):
            missing = [name_of(v) for g, v in pairs if g is None]
            log.warning("Gradients do not exist for variables %s when minimizing the loss. If you're using "
                        "`model.compile()`, did you forget to provide a `loss` argument?", missing)
        scope = name or self.name or "optimizer"
        if not getattr(self, "_built", False):
            # as tf_keras: slots are named under the step's name scope (``SGD/m/<var>``)
            with tf.name_scope(scope), tf.init_scope():
                self.build(all_vars)
        eager = tf.executing_eagerly()
        engine = self._engine
        items = engine.items(kept, eager)
        if not eager and self._mesh is not None:
            items = guarded(items, self._mesh)
        with tf.name_scope(scope):
            step = engine.resolve(items, eager)
            self._compute_current_learning_rate()  # may assign the lr variable through DTensor
            local = step.domain == "local"
            if local:
                # DTensor runs each device's ops on its own async executor; the local ops below
                # read and write the same buffers directly, so let pending DTensor work (slot
                # creation, a callable lr's assign, a user's assign or read of a weight) finish
                # first.  ~2 µs when idle.
                _context.async_wait()
            args = self._step_args(eager, local=local)
            if not eager and not local:
                # inside tf.function, the in-graph node counts the step with its update: a step
                # that fails before it (a NaN caught by check_numerics) leaves iterations unchanged
                args = dataclasses.replace(args, counter=self._iterations)
            counted = engine.run(step, args)
            for e, _ in items:
                if e.constrained:
                    e.var.assign(e.var.constraint(e.var))
            if local and self._mesh is not None:
                # in place on each device's copy: no DTensor op (~0.3 ms each) on the hot path
                engine.increment(self._iterations)
                return self._iterations
            if counted:
                return self._iterations
            return self._iterations.assign_add(1)

    def _step_args(self, eager: bool, local: bool = False) -> StepArgs:
        lr = self._learning_rate
        if local and self._mesh is not None and isinstance(lr, tf.Variable):
            # the local domain wants a plain host scalar: read one device's copy directly
            lr = tf.raw_ops.ReadVariableOp(resource=self._engine.local_handles(lr)[0], dtype=lr.dtype)
            lr = lr if lr.dtype == tf.float32 else tf.cast(lr, tf.float32)
        else:
            lr = self.learning_rate
            lr = tf.cast(lr.read_value() if isinstance(lr, tf.Variable) else lr, tf.float32)
            if local and self._mesh is not None:
                lr = eager_dtensor.components(lr)[0]
        overwrite: Any = False
        if self.use_ema and self.ema_overwrite_frequency:
            if eager:
                overwrite = rules.ema_overwrite_due(int(to_numpy(self._iterations)), self.ema_overwrite_frequency)
            else:
                overwrite = tf.equal((self._iterations + 1) % self.ema_overwrite_frequency, 0)
        clipvalue = self.clipvalue if not (self.clipnorm or self.global_clipnorm) else None
        return StepArgs(
            lr=lr, momentum=self.momentum, nesterov=self.nesterov,
            weight_decay=self.weight_decay or None, clipnorm=self.clipnorm or None, clipvalue=clipvalue or None,
            global_clipnorm=self.global_clipnorm or None,
            ema_momentum=self.ema_momentum if self.use_ema else None, ema_overwrite=overwrite,
        )

    def update_step(self, gradient, variable):
        """Update one variable from one gradient (momentum rule only; no clipping, decay or EMA)."""
        entry = self._engine.entry(variable) if self._engine is not None else None
        if entry is None:
            raise KeyError(f"The optimizer cannot recognize variable {variable.name}; call build() first")
        args = StepArgs(lr=tf.cast(self.learning_rate, tf.float32), momentum=self.momentum, nesterov=self.nesterov,
                        weight_decay=None, clipnorm=None, clipvalue=None, global_clipnorm=None, ema_momentum=None)
        impl_registry.get("ops")(Group("single", variable.dtype, None, [entry]), self).apply(
            [(entry, gradient)], args, None)

    # ------------------------------------------------------------------ EMA
    def _overwrite_model_variables_with_average_value(self, var_list):
        for var in var_list:
            entry = self._engine.entry(var) if self._engine is not None else None
            if entry is not None and entry.average is not None:
                avg = entry.average.read_value()
                if entry.layout is not None and variable_layout(entry.average) != entry.layout:
                    avg = dtensor.relayout(avg, entry.layout)  # ZeRO-1 averages are sharded further
                var.assign(avg)

    def finalize_variable_values(self, var_list):
        """With EMA, overwrite the variables with their moving averages (also on a mesh)."""
        if self.use_ema:
            self._overwrite_model_variables_with_average_value(var_list)

    # ------------------------------------------------------------------ config & weights
    def get_config(self) -> dict:
        lr = self._lr_callable if self._lr_callable is not None else self._learning_rate
        return {
            "name": self.name,
            "learning_rate": self._serialize_hyperparameter(lr),
            "momentum": self.momentum,
            "nesterov": self.nesterov,
            "amsgrad": self.amsgrad,
            "weight_decay": self.weight_decay,
            "clipnorm": self.clipnorm,
            "global_clipnorm": self.global_clipnorm,
            "clipvalue": self.clipvalue,
            "use_ema": self.use_ema,
            "ema_momentum": self.ema_momentum,
            "ema_overwrite_frequency": self.ema_overwrite_frequency,
            "jit_compile": self._requested_jit_compile,
            "is_legacy_optimizer": False,
            "mesh": self._mesh.to_string() if self._mesh is not None else None,
            "implementation": self.implementation,
            "momentum_dtype": self.momentum_dtype,
        }

    def _serialize_hyperparameter(self, hyperparameter):
        value = super()._serialize_hyperparameter(hyperparameter)
        if hasattr(value, "dtype") and getattr(value, "shape", None) == ():
            value = float(to_numpy(hyperparameter) if isinstance(hyperparameter, tf.Variable) else value)
        return value

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        if isinstance(config.get("mesh"), str):
            config["mesh"] = dtensor.Mesh.from_string(config["mesh"])
        if isinstance(config.get("learning_rate"), dict):
            config["learning_rate"] = learning_rate_schedule.deserialize(
                config["learning_rate"], custom_objects=custom_objects)
        return cls(**config)

    def set_weights(self, weights):
        """Set all optimizer variables (in ``variables`` order); shapes are all checked first."""
        if not getattr(self, "_built", False):
            raise ValueError("You are calling `set_weights()` on an optimizer that has not yet been built. "
                             "Call `optimizer.build(trainable_variables)` first.")
        weights = list(weights)
        if len(weights) != len(self._variables):
            raise ValueError(f"`weights` has {len(weights)} entries, the optimizer has {len(self._variables)} variables")
        for variable, weight in zip(self._variables, weights):
            if tuple(variable.shape) != tuple(getattr(weight, "shape", ())):
                raise ValueError(f"Optimizer variable {variable.name} has shape {variable.shape} not compatible "
                                 f"with provided weight shape {getattr(weight, 'shape', None)}.")
        for variable, weight in zip(self._variables, weights):
            variable.assign(to_layout(to_numpy(weight) if tf.is_tensor(weight) or isinstance(weight, tf.Variable)
                                      else weight, variable_layout(variable), variable.dtype))

    def save_own_variables(self, store):
        for i, variable in enumerate(self.variables):
            store[str(i)] = to_numpy(variable)

    def load_own_variables(self, store):
        if len(store.keys()) != len(self.variables):
            log.warning("Skipping variable loading for optimizer '%s': it has %d variables, the saved one %d.",
                        self.name, len(self.variables), len(store.keys()))
            return
        for i, variable in enumerate(self.variables):
            variable.assign(to_layout(store[str(i)], variable_layout(variable), variable.dtype))

    @property
    def plan(self) -> list[Group]:
        """The variable groups of the built plan (for benchmarks and the advisor)."""
        return list(self._engine.groups) if self._engine is not None else []

    def implementations_used(self) -> list[str]:
        """Names of the implementations that have run this optimizer's groups, sorted
        (what ``auto`` resolved to); empty before the first step."""
        return sorted({imp.name for imp in self.implementation_instances()})

    def implementation_instances(self) -> list:
        """The implementation instances that have run this optimizer's groups, in plan order
        (e.g. the ``xla`` ones whose HLO :func:`dsgd.impl.xla.capture_hlo` writes)."""
        return self._engine.implementations() if self._engine is not None else []


__all__ = ["SGD", "GradientsClipOption", "EMAOption"]
