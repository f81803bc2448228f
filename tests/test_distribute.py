"""BatchNormalization under tf.distribute.MirroredStrategy over two logical CPUs.

The CPU can only be split before TensorFlow initializes its devices, which the
other test modules have long done, so the strategy runs in a fresh subprocess
that saves its results for the tests below to check.
"""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import numpy_reference as ref
import tolerances

TOLERANCE = tolerances.FLOAT32
MOMENTUM = 0.8

SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    import keras
    import kernorm

    keras.utils.set_random_seed(0)
    inputs = dict(np.load(sys.argv[1]))
    x, upstream, mask = inputs["x"], inputs["upstream"], inputs["mask"]
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    half = len(x) // 2
    results = {}

    def per_replica(array):
        return strategy.experimental_distribute_values_from_function(
            lambda context: tf.constant(array[context.replica_id_in_sync_group * half:][:half])
        )

    def local(values):
        return np.concatenate([v.numpy() for v in strategy.experimental_local_results(values)])

    for name, kwargs, use_mask in [
        ("sync", {"synchronized": True}, False),
        ("sync_masked", {"synchronized": True}, True),
        ("local", {}, False),
    ]:
        with strategy.scope():
            layer = kernorm.BatchNormalization(momentum=%(momentum)r, **kwargs)
            layer.build((None,) + x.shape[1:])
            layer.gamma.assign(inputs["gamma"])
            layer.beta.assign(inputs["beta"])

        def replica_step(x, upstream, mask):
            with tf.GradientTape() as tape:
                tape.watch(x)
                outputs = layer(x, training=True, mask=mask if use_mask else None)
                loss = tf.reduce_sum(outputs * upstream)
            d_x, d_gamma, d_beta = tape.gradient(loss, [x, layer.gamma, layer.beta])
            return outputs, d_x, d_gamma, d_beta

        step = tf.function(lambda *args: strategy.run(replica_step, args=args))
        outputs, d_x, d_gamma, d_beta = step(per_replica(x), per_replica(upstream), per_replica(mask))
        results[name + "_outputs"] = local(outputs)
        results[name + "_d_x"] = local(d_x)
        # Each replica's gradient for the weights, side by side.
        results[name + "_d_gamma"] = np.stack([v.numpy() for v in strategy.experimental_local_results(d_gamma)])
        results[name + "_d_beta"] = np.stack([v.numpy() for v in strategy.experimental_local_results(d_beta)])
        for weight in ("moving_mean", "moving_variance"):
            copies = [v.numpy() for v in strategy.experimental_local_results(getattr(layer, weight).value)]
            results[f"{name}_{weight}"] = np.stack(copies)

    # Keras's own training loop with a synchronized BN in the model, then the same without the strategy.
    def model():
        keras.utils.set_random_seed(1)
        inputs = keras.Input(x.shape[1:])
        hidden = keras.layers.Dense(6, use_bias=False)(inputs)
        hidden = kernorm.BatchNormalization(synchronized=True, momentum=%(momentum)r)(hidden)
        outputs = keras.layers.Dense(2)(keras.layers.Flatten()(hidden))
        model = keras.Model(inputs, outputs)
        model.compile(keras.optimizers.SGD(0.1), "mse")
        return model

    targets = inputs["targets"]
    with strategy.scope():
        distributed = model()
    distributed.fit(x, targets, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    single = model()
    single.fit(x, targets, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    for i, (a, b) in enumerate(zip(distributed.weights, single.weights)):
        results[f"fit_distributed_{i}"] = a.numpy()
        results[f"fit_single_{i}"] = b.numpy()
    np.savez(sys.argv[2], **results)
    """
) % {"momentum": MOMENTUM}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    rng = np.random.default_rng(5)
    folder = tmp_path_factory.mktemp("distribute")
    inputs = {
        "x": rng.normal(2.0, 3.0, (32, 4, 5)).astype("float32"),
        "upstream": rng.normal(size=(32, 4, 5)).astype("float32"),
        "mask": rng.uniform(size=(32, 4)) < 0.7,
        "gamma": rng.uniform(0.5, 1.5, 5).astype("float32"),
        "beta": rng.normal(size=5).astype("float32"),
        "targets": rng.normal(size=(32, 2)).astype("float32"),
    }
    np.savez(folder / "inputs.npz", **inputs)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(folder / "inputs.npz"), str(folder / "results.npz")],
        capture_output=True, text=True, timeout=300, cwd=folder,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return inputs, dict(np.load(folder / "results.npz"))


def test_synchronized_matches_single_device_on_the_whole_batch(run):
    inputs, results = run
    x, upstream = inputs["x"], inputs["upstream"]
    expected, (d_x, d_gamma, d_beta), mean, variance = ref.batch_norm(
        x, -1, inputs["gamma"], inputs["beta"], 1e-3, upstream
    )
    ref.assert_close(results["sync_outputs"], expected, TOLERANCE, "outputs")
    # The all-reduce passes the gradient back across replicas: each replica's input
    # gradient is that of the whole batch's loss.
    ref.assert_close(results["sync_d_x"], d_x, TOLERANCE, "d_x")
    # Each replica holds its own share of the weight gradients; the strategy sums them.
    ref.assert_close(results["sync_d_gamma"].sum(0), d_gamma, TOLERANCE, "d_gamma")
    ref.assert_close(results["sync_d_beta"].sum(0), d_beta, TOLERANCE, "d_beta")
    for weight, statistic, initial in [("moving_mean", mean, 0.0), ("moving_variance", variance, 1.0)]:
        for copy in results[f"sync_{weight}"]:
            ref.assert_close(copy, ref.moving_average(initial, statistic, MOMENTUM), TOLERANCE, weight)


def test_synchronized_with_a_mask_counts_unmasked_positions_of_every_replica(run):
    inputs, results = run
    mask = inputs["mask"][..., None]
    expected, _, mean, variance, _ = ref.masked_batch_norm(inputs["x"], -1, mask, inputs["gamma"], inputs["beta"])
    unmasked = np.broadcast_to(mask, inputs["x"].shape)
    ref.assert_close(results["sync_masked_outputs"][unmasked], expected[unmasked], TOLERANCE, "outputs")
    for copy in results["sync_masked_moving_mean"]:
        ref.assert_close(copy, ref.moving_average(0.0, mean, MOMENTUM), TOLERANCE, "moving_mean")
    for copy in results["sync_masked_moving_variance"]:
        ref.assert_close(copy, ref.moving_average(1.0, variance, MOMENTUM), TOLERANCE, "moving_variance")


def test_without_synchronized_each_replica_uses_its_own_statistics(run):
    inputs, results = run
    x = inputs["x"]
    halves = [ref.batch_norm(x[i:i + 16], -1, inputs["gamma"], inputs["beta"], 1e-3) for i in (0, 16)]
    ref.assert_close(results["local_outputs"], np.concatenate([h[0] for h in halves]), TOLERANCE, "outputs")
    whole, _, _, _ = ref.batch_norm(x, -1, inputs["gamma"], inputs["beta"], 1e-3)
    assert ref.relative_error(results["local_outputs"], whole) > 1e-2
    # As with Keras's layer, each replica's copy of the moving statistics follows its own half.
    for copy, half in zip(results["local_moving_mean"], halves):
        ref.assert_close(copy, ref.moving_average(0.0, half[2], MOMENTUM), TOLERANCE, "moving_mean")


def test_fit_under_the_strategy_matches_fit_on_one_device(run):
    _, results = run
    count = len([key for key in results if key.startswith("fit_single_")])
    assert count == 7  # kernel, gamma, beta, moving mean and variance, kernel, bias
    for i in range(count):
        ref.assert_close(results[f"fit_distributed_{i}"], results[f"fit_single_{i}"], TOLERANCE, f"weight {i}")
