"""Trains the same small nets on one device (batch 2B) and on two replicas (B each).

Not a test itself: ``tests/test_distributed.py`` runs it with ``CIFAR_CPU_DEVICES=2``
(logical CPU devices must exist before TensorFlow starts) and reads the JSON it prints:
per model, the per-epoch training losses of both runs; the two-replica BatchNorm run's
validation numbers at its best epoch beside those its ``best.weights.h5`` gives; whether
resume and evaluation worked under the mirrored strategy; and whether ``cu.fast_dropout``'s
masks differ between the replicas, within a step and across steps.
"""

import json
import sys
import tempfile

import keras
import numpy as np
import synthetic_cifar
import tensorflow as tf

import cifar_utils as cu

B, N, EPOCHS = 16, 256, 2


def build(batch_norm: bool):
    layers = [keras.Input((32, 32, 3)), keras.layers.Conv2D(8, 3, activation="relu")]
    if batch_norm:  # a quick momentum: replicas' moving statistics part within a few steps
        layers.append(keras.layers.BatchNormalization(momentum=0.5))
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(100, activation="softmax")]
    return keras.Sequential(layers)


def fit(strategy, batch_norm, x, y, run_dir, epochs=EPOCHS):
    cu.seed_everything(0)
    with strategy.scope():
        model = build(batch_norm)
        cu.fast_cpu_training(model)  # as the notebooks train it, on a CPU
        model.compile(keras.optimizers.SGD(0.1), "categorical_crossentropy", metrics=["accuracy"])
    batch = 2 * B  # one device: batch 2B; two replicas: B each (cu.global_batch_size(B, ...))
    train = cu.make_dataset(x[:N], y[:N], batch_size=batch, training=True, seed=0)
    val = cu.make_dataset(x[N:], y[N:], batch_size=batch, training=False)
    state = cu.train(model, train, val, epochs=epochs, run_dir=run_dir, verbose=0)
    return model, state


def best_reproduced(model, run, x, y) -> dict:
    """The history's validation numbers at the best epoch, and those of ``best.weights.h5``:
    ``model.evaluate`` on the same pipeline and :func:`cu.predict_proba`'s correct count."""
    best = run.best_epoch - 1
    model.load_weights(f"{run.run_dir}/best.weights.h5")
    val = cu.make_dataset(x, y, batch_size=2 * B, training=False)
    scores = model.evaluate(val, return_dict=True, verbose=0)
    return {
        "history": {"accuracy": run.history["val_accuracy"][best], "best": run.best,
                    "loss": run.history["val_loss"][best]},
        "evaluate": {"accuracy": scores["accuracy"], "loss": scores["loss"]},
        "predict_correct": int((cu.predict_proba(model, x).argmax(1) == y).sum()),
        "images": len(y),
    }  # fmt: skip


def dropout_masks(strategy, steps: int = 4) -> dict:
    """Whether the replicas' dropout masks differ within each step and across all steps."""
    with strategy.scope():
        inputs = keras.Input((256,))
        model = keras.Model(inputs, keras.layers.Dropout(0.5, seed=3)(inputs))
        cu.fast_dropout(model)

    @tf.function
    def step():
        return strategy.run(lambda: model(tf.ones((1, 256)), training=True))

    masks = [[np.asarray(out)[0] != 0 for out in strategy.experimental_local_results(step())]
             for _ in range(steps)]  # fmt: skip
    drawn = [m.tobytes() for per_step in masks for m in per_step]
    return {"masks": len(drawn), "distinct": len(set(drawn))}


def main() -> None:
    mirrored = cu.choose_strategy()  # CIFAR_CPU_DEVICES=2: MirroredStrategy over 2 CPUs
    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    y = np.arange(N + 64) % 100
    x = synthetic_cifar.make_images(y, seed=0)
    out = {"strategy": type(mirrored).__name__, "replicas": mirrored.num_replicas_in_sync}
    with tempfile.TemporaryDirectory() as tmp:
        for batch_norm in (False, True):
            key = "batch_norm" if batch_norm else "plain"
            _, single = fit(one, batch_norm, x, y, f"{tmp}/{key}-one")
            model, multi = fit(mirrored, batch_norm, x, y, f"{tmp}/{key}-mirrored")
            out[key] = {"one_device": single.history["loss"],
                        "two_replicas": multi.history["loss"]}  # fmt: skip
        out["best_reproduced"] = best_reproduced(model, multi, x[N:], y[N:])
        # Resume under the mirrored strategy: epoch 3 from the checkpoint of epoch 2.
        model, resumed = fit(mirrored, True, x, y, f"{tmp}/batch_norm-mirrored", epochs=3)
        probs = cu.predict_proba(model, x[N:])
        out["resumed"] = {"initial_epoch": resumed.initial_epoch, "step": resumed.step,
                          "epochs": len(resumed.history["loss"])}  # fmt: skip
        out["predict_rows"] = float(np.abs(probs.sum(1) - 1).max())
        out["dropout_masks"] = dropout_masks(mirrored)
        out["predict_matches_model"] = float(
            np.abs(probs - model.predict(x[N:] / 255, verbose=0)).max()
        )
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
