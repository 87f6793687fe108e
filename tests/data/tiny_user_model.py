"""A user's model for the whole-step modes' ``--model module:function`` (tests): a small MLP classifier
that knows nothing of meshes; ``tiny_user_layout.json`` lays it out Megatron-style."""
import tf_keras


def build():
    x = inp = tf_keras.Input((16,), batch_size=16)
    h = tf_keras.layers.Dense(32, activation="relu", name="up")(x)
    x = tf_keras.layers.Add()([x, tf_keras.layers.Dense(16, name="down")(h)])
    return tf_keras.Model(inp, tf_keras.layers.Dense(4, name="head")(x))
