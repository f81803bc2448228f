"""models/data.py: TFDS pipelines, on TFDS's own mock data (and an empty folder for the missing-data error)."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from kernorm.models import data as datalib

MOCK_EXAMPLES = 24


@pytest.fixture
def mock_tfds():
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        yield


def _epoch(dataset):
    return [(x.numpy(), y.numpy()) for x, y in dataset]


@pytest.mark.parametrize(
    "name, shape, classes",
    [("fashion_mnist", (28, 28, 1), 10), ("mnist", (28, 28, 1), 10), ("cifar10", (32, 32, 3), 10)],
)
def test_image_pipeline_takes_shape_and_classes_from_the_dataset_info(mock_tfds, name, shape, classes):
    data = datalib.load(name, batch_size=10)
    assert data.task == "image"
    assert data.input_shape == shape
    assert data.num_classes == classes
    assert len(data.class_names) == classes
    assert data.input_name == "image"
    assert data.train_examples == MOCK_EXAMPLES
    batches = _epoch(data.train)
    # Whole batches only: the remainder of 4 is dropped, and validation keeps every example.
    assert [len(y) for _, y in batches] == [10, 10] and data.train_steps == 2
    assert [len(y) for _, y in _epoch(data.validation)] == [10, 10, 4]
    images, labels = batches[0]
    assert images.dtype == np.uint8 and images.shape == (10, *shape)
    assert labels.dtype == np.int64 and labels.min() >= 0 and labels.max() < classes
    spec = data.serving_spec()
    assert (spec.name, spec.dtype, spec.shape.as_list()) == ("image", tf.uint8, [None, *shape])


@pytest.mark.parametrize("examples, batch_size, sizes", [(21, 10, [10, 10]), (5, 64, [5]), (20, 10, [10, 10])])
def test_training_batches_are_whole(mock_tfds, examples, batch_size, sizes):
    """A last batch of one example would stop batch norm's training step: the remainder is dropped,
    unless there is less than one batch, which is kept."""
    data = datalib.load("mnist", batch_size=batch_size, max_train_examples=examples, augment=False)
    for _ in range(2):
        assert [len(y) for _, y in _epoch(data.train)] == sizes
    assert data.train_steps == len(sizes)


def test_max_train_examples_keeps_the_first_examples(mock_tfds):
    full = datalib.load("mnist", batch_size=64, augment=False)
    part = datalib.load("mnist", batch_size=64, max_train_examples=5, augment=False)
    assert part.train_examples == 5
    first_five = {x.tobytes() for x in _epoch(full.train)[0][0]} & {x.tobytes() for x in _epoch(part.train)[0][0]}
    assert len(first_five) == 5
    assert part.validation_examples == full.validation_examples


def test_validation_is_in_order_and_training_reshuffles_each_epoch(mock_tfds):
    data = datalib.load("mnist", batch_size=MOCK_EXAMPLES)
    (first, _), (second, _) = _epoch(data.train)[0], _epoch(data.train)[0]
    assert sorted(x.tobytes() for x in first) == sorted(x.tobytes() for x in second)
    assert [x.tobytes() for x in first] != [x.tobytes() for x in second]
    (val_a, _), (val_b, _) = _epoch(data.validation)[0], _epoch(data.validation)[0]
    np.testing.assert_array_equal(val_a, val_b)


def test_preprocess_scales_uint8_images_into_the_unit_interval(mock_tfds):
    data = datalib.load("mnist", batch_size=4)
    raw = data.serving_input()
    scaled = data.preprocess(raw)
    model = keras.Model(raw, scaled)
    images = np.array([[[[0]] * 28] * 28, [[[255]] * 28] * 28], dtype=np.uint8)
    out = model.predict(images, verbose=0)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], 0.0)
    np.testing.assert_allclose(out[1], 1.0)


def test_augmentation_is_on_for_cifar10_only_and_differs_each_epoch(mock_tfds):
    def epoch_images(data):
        return {x.tobytes() for batch, _ in _epoch(data.train) for x in batch}

    cifar = datalib.load("cifar10", batch_size=8)
    mnist = datalib.load("mnist", batch_size=8)
    plain = datalib.load("cifar10", batch_size=8, augment=False)
    assert epoch_images(plain) == epoch_images(plain)
    assert epoch_images(mnist) == epoch_images(mnist)
    assert epoch_images(cifar) != epoch_images(cifar)


def test_augmentation_is_a_padded_shift_and_maybe_a_flip():
    rng = np.random.default_rng(0)
    image = rng.integers(1, 256, (32, 32, 3)).astype(np.uint8)  # no zeros: padding shows as 0
    augment = datalib._augment_fn((32, 32, 3))
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    candidates = [
        np.flip(padded[top : top + 32, left : left + 32], axis=1) if flip else padded[top : top + 32, left : left + 32]
        for top in range(9)
        for left in range(9)
        for flip in (False, True)
    ]
    seen = set()
    for seed in range(20):
        out, label = augment((tf.constant(image), tf.constant(3)), tf.constant([seed, 7], tf.int64))
        out = out.numpy()
        assert out.dtype == np.uint8 and out.shape == image.shape and int(label) == 3
        matches = [i for i, candidate in enumerate(candidates) if np.array_equal(out, candidate)]
        assert matches, "the output is not a shifted (and flipped) copy of the input"
        seen.add(matches[0])
    assert len(seen) > 1


def test_text_pipeline_vectorizes_inside_and_serves_strings(mock_tfds):
    data = datalib.load("glue/sst2", batch_size=8, sequence_length=12, vocab_size=50)
    assert data.task == "text"
    assert data.input_name == "sentence"
    assert data.num_classes == 2
    assert data.input_shape == (12,)
    assert 2 < data.vocab_size <= 50
    assert data.vectorizer.get_vocabulary()[:2] == ["", "[UNK]"]
    tokens, labels = _epoch(data.train)[0]
    assert tokens.dtype == np.int32 and tokens.shape == (8, 12)
    assert tokens.min() >= 0 and tokens.max() < data.vocab_size
    assert set(np.unique(labels)) <= {0, 1}
    spec = data.serving_spec()
    assert (spec.name, spec.dtype, spec.shape.as_list()) == ("sentence", tf.string, [None])
    ids = data.vectorizer(tf.constant(["", "zzzz-not-a-word"])).numpy()
    assert ids.shape == (2, 12)
    assert (ids[0] == 0).all(), "an empty sentence is all padding"
    assert ids[1, 0] == 1 and (ids[1, 1:] == 0).all(), "an unknown word is out-of-vocabulary, then padding"


def test_unknown_dataset_names_the_choices():
    with pytest.raises(datalib.UnknownDatasetError, match=r"Unknown dataset 'fashon_mnist'.*Did you mean.*fashion_mnist"):
        datalib.load("fashon_mnist")


def test_unknown_config_lists_the_configs():
    with pytest.raises(datalib.UnknownDatasetError, match=r"glue has the configs .*sst2"):
        datalib.builder("glue/sst3")


def test_dataset_of_another_kind_is_refused():
    with pytest.raises(datalib.UnknownDatasetError, match="no ClassLabel feature 'label'"):
        datalib.builder("squad")


def test_a_missing_dataset_is_downloaded_only_into_the_default_folder(tmp_path, monkeypatch):
    """As `tfds.load` does, when no folder is named; a named folder (--data-dir, TFDS_DATA_DIR) is only read."""
    calls = []

    def fail_to_download(self, *args, **kwargs):
        calls.append(self.data_dir)
        raise ConnectionError("no network")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail_to_download)
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    monkeypatch.setattr(tfds.core.constants, "get_default_data_dir", lambda: str(tmp_path / "default"))
    with pytest.raises(datalib.DatasetMissingError, match="could not be downloaded: no network.*TFDS_DATA_DIR"):
        datalib.load("mnist")
    assert len(calls) == 1 and calls[0].startswith(str(tmp_path / "default"))
    with pytest.raises(datalib.DatasetMissingError, match="not in the data folder"):
        datalib.load("mnist", data_dir=str(tmp_path / "named"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "from_env"))
    with pytest.raises(datalib.DatasetMissingError, match="not in the data folder"):
        datalib.load("mnist")
    assert len(calls) == 1, "a named folder is never written"


def test_missing_dataset_names_the_folder_and_tfds_data_dir(tmp_path):
    with pytest.raises(datalib.DatasetMissingError) as caught:
        datalib.load("mnist", data_dir=str(tmp_path))
    message = str(caught.value)
    assert str(tmp_path) in message
    assert "TFDS_DATA_DIR" in message
    assert list(tmp_path.iterdir()) == [], "nothing may be written into the data folder"


def test_default_data_dir_follows_tfds_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    assert datalib.default_data_dir() == str(tmp_path)
    monkeypatch.delenv("TFDS_DATA_DIR")
    assert datalib.default_data_dir().endswith("tensorflow_datasets")


def test_prepared_datasets_lists_plain_and_config_datasets(tmp_path):
    for folder in ("mnist/3.0.1", "glue/sst2/2.0.0", "cifar10/3.0.2"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "dataset_info.json").write_text(json.dumps({}))
    (tmp_path / "downloads" / "x").mkdir(parents=True)
    assert datalib.prepared_datasets(tmp_path) == ("cifar10", "glue/sst2", "mnist")
    assert datalib.prepared_datasets(tmp_path / "absent") == ()
