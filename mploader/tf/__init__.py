"""The TensorFlow side: the only code of mploader that imports TensorFlow,
and only when the user asks for it (``loader.dataset()``,
``loader.checkpointable()``, ``loader.keras_callback()``); workers never
import it.

    adapter.py    the dataset over a loader's passes, its checkpoint and Keras callback
    signature.py  every element checked against the dataset's signature
    grouping.py   several small elements per generator call, and their hand-out records
"""
