"""Example models for ``dsgd layouts`` (plain functions returning a tf_keras model, no mesh).

``dsgd layouts --model examples.models:convnet`` calls the function under each candidate plan's
``LayoutMap`` scope, so the function must create its variables there: build the model inside it.

* :func:`convnet` -- a small image classifier of ``Conv2D`` + ReLU + pooling.  No ``BatchNormalization``
  (and no ``LayerNormalization`` with ``epsilon >= 1.001e-5``): tf_keras computes both with
  ``FusedBatchNormV3``, which DTensor cannot lay out, so the step fails on a mesh.
"""
from __future__ import annotations

GLOBAL_BATCH = 16


def convnet(image: int = 32, channels: int = 3, widths: tuple = (32, 64, 128, 128), dense: int = 256,
            classes: int = 10):
    """``image x image x channels`` inputs -> two stages of two 3x3 ``Conv2D`` (ReLU) and a 2x2 max-pool
    -> global average pooling -> ``Dense(dense, relu)`` -> ``Dense(classes)`` logits.

    0.28M parameters by default, batches of 16: a convnet small enough to time its whole training step on
    eight logical CPU devices in seconds.
    """
    import tf_keras

    layers = tf_keras.layers
    x = inp = tf_keras.Input((image, image, channels), batch_size=GLOBAL_BATCH)
    for stage in range(2):
        for k in range(2):
            x = layers.Conv2D(widths[2 * stage + k], 3, padding="same", activation="relu",
                              name=f"conv{stage}_{k}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{stage}")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dense(dense, activation="relu", name="fc")(x)
    return tf_keras.Model(inp, layers.Dense(classes, name="head")(x))
