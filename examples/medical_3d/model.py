"""A tiny 3D U-Net: enough to show training on mploader's output, small enough for a CPU."""
from __future__ import annotations


def tiny_unet(patch=(32, 32, 32), width: int = 8):
    import keras
    from keras import layers

    def block(x, filters):
        x = layers.Conv3D(filters, 3, padding="same", activation="relu")(x)
        return layers.Conv3D(filters, 3, padding="same", activation="relu")(x)

    inputs = keras.Input(patch + (1,))
    skip = block(inputs, width)
    deep = block(layers.MaxPooling3D(2)(skip), width * 2)
    up = layers.UpSampling3D(2)(deep)
    x = block(layers.Concatenate()([up, skip]), width)
    outputs = layers.Conv3D(1, 1, activation="sigmoid")(x)
    model = keras.Model(inputs, outputs, name="tiny_unet_3d")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy",
                  metrics=[keras.metrics.BinaryIoU(target_class_ids=[1], name="organ_iou")])
    return model
