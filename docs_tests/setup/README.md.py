# The README's before/after snippet leaves these to the reader: small stand-ins.
import numpy as np

paths = [f"/data/case_{i:03d}.nii.gz" for i in range(16)]


def load_and_augment(path):
    if isinstance(path, bytes):                 # through tf.numpy_function
        path = path.decode()
    rng = np.random.default_rng(len(path))
    return rng.normal(size=(8, 8, 1)).astype(np.float32), np.float32(rng.random() > 0.5)


try:
    import tensorflow as tf
except ImportError:                             # the README's TensorFlow blocks are skipped then
    pass
else:
    model = tf.keras.Sequential([tf.keras.Input((8, 8, 1)), tf.keras.layers.Flatten(),
                                 tf.keras.layers.Dense(1, activation="sigmoid")])
    model.compile("adam", "binary_crossentropy")
