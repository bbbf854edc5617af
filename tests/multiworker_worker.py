"""One worker of the two-process ``MultiWorkerMirroredStrategy`` test (not a test itself).

Run by ``tests/test_performance.py`` with ``TF_CONFIG`` naming two workers on 127.0.0.1:
``python tests/multiworker_worker.py OUT.npz``. Trains the simple network for a few
synchronous steps on fixed data and saves every weight before and after (trainable
and BatchNorm statistics), which are trainable, and the replica count to ``OUT.npz``.
"""

import sys

import keras
import numpy as np
import tensorflow as tf

import cifar_utils as cu


def main(out_path: str) -> None:
    strategy = cu.choose_strategy()  # first: collectives are set up at program start
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(96, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 100, size=96)
    ds = cu.make_dataset(x, y, batch_size=cu.global_batch_size(8, strategy), training=True)
    with strategy.scope():
        model = cu.build_simple_cnn()
        model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "categorical_crossentropy")
    initial = [np.array(w) for w in model.weights]
    model.fit(ds, epochs=1, steps_per_epoch=3, verbose=0)
    trainable = {id(w) for w in model.trainable_weights}
    np.savez(
        out_path,
        replicas=strategy.num_replicas_in_sync,
        multi_worker=isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy),
        trainable=np.array([id(w) in trainable for w in model.weights]),
        **{f"w{i}": np.array(w) for i, w in enumerate(model.weights)},
        **{f"init{i}": w for i, w in enumerate(initial)},
    )


if __name__ == "__main__":
    main(sys.argv[1])
