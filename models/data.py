"""TensorFlow Datasets input pipelines for the zoo.

`load(name, ...)` turns a TFDS name into batched `tf.data` pipelines of
`(input, label)` pairs plus what a model needs to know about them: the input
shape, the class count and the preprocessing that belongs inside the exported
model.

- Image classification: any TFDS dataset with `image` (fixed size, uint8) and
  `label` (ClassLabel) features: mnist, fashion_mnist, cifar10, ... The
  pipeline keeps images as uint8; scaling to [0, 1] is a `Rescaling` layer in
  the model, so an exported model takes uint8 images. Optional augmentation
  (on by default for cifar10): random crop after zero padding, and a
  horizontal flip.
- Text classification: a dataset with one `Text` feature and a ClassLabel
  `label`, such as `glue/sst2`. A `keras.layers.TextVectorization` is adapted
  on the training split. The pipelines carry token ids (0 is padding); the
  vectorizer goes in front of the model at export time, so serving takes raw
  strings.

Shapes, class counts and split sizes come from the dataset's info, never from
a table here. Data is read with `builder.as_dataset` only: nothing is ever
downloaded or written into the data folder.

Example:

>>> data = load("fashion_mnist", batch_size=128)
>>> inputs = data.serving_input()                  # keras.Input, uint8, named "image"
>>> x = data.preprocess(inputs)                     # Rescaling(1/255)
>>> model = keras.Model(inputs, my_model(x))
>>> model.fit(data.train, validation_data=data.validation)
"""

import dataclasses
import difflib
import os
import pathlib

import keras
import tensorflow as tf
import tensorflow_datasets as tfds

from kernorm import _private

DEFAULT_VOCAB_SIZE = 20000
DEFAULT_SEQUENCE_LENGTH = 64
# Splits tried, in order, for validation: GLUE keeps labels only on
# `validation`; the image sets have only `test`.
VALIDATION_SPLITS = ("validation", "test")
AUGMENTED_BY_DEFAULT = ("cifar10",)
_CIFAR_PADDING = 4
_MAX_SHUFFLE_BUFFER = 65536
_ADAPT_BATCH = 1024


class UnknownDatasetError(ValueError):
    """The name is not a TFDS dataset, or not one these pipelines can feed."""


class DatasetMissingError(FileNotFoundError):
    """The dataset is known to TFDS but not prepared in the data folder."""


def default_data_dir():
    """`TFDS_DATA_DIR` if set, else TFDS's own default (`~/tensorflow_datasets`)."""
    return os.environ.get("TFDS_DATA_DIR") or _private.tfds_default_data_dir(tfds)


def prepared_datasets(data_dir):
    """Names of the datasets prepared in `data_dir` (`mnist`, `glue/sst2`, ...)."""
    root = pathlib.Path(data_dir)
    if not root.is_dir():
        return ()
    names = set()
    # Layout: NAME/VERSION/dataset_info.json or NAME/CONFIG/VERSION/dataset_info.json.
    for info_file in list(root.glob("*/*/dataset_info.json")) + list(root.glob("*/*/*/dataset_info.json")):
        names.add(info_file.parent.parent.relative_to(root).as_posix())
    return tuple(sorted(names))


def _choices_hint(name, data_dir):
    prepared = prepared_datasets(data_dir)
    known = sorted(set(prepared) | set(tfds.list_builders(with_community_datasets=False)))
    close = difflib.get_close_matches(name, known, n=3)
    parts = []
    if close:
        parts.append(f"Did you mean: {', '.join(close)}?")
    if prepared:
        parts.append(f"Datasets prepared in {data_dir}: {', '.join(prepared)}.")
    else:
        parts.append(f"No datasets are prepared in {data_dir}.")
    parts.append(
        "Any TFDS image-classification dataset (features 'image' and 'label') or text-classification "
        "dataset (a text feature and 'label', such as glue/sst2) works; tfds.list_builders() names them all."
    )
    return " ".join(parts)


def builder(name, data_dir=None):
    """The TFDS builder for `name`, after checking that the pipelines can feed it.

    Raises:
        UnknownDatasetError: `name` is not a TFDS dataset (or config), or its
            features are neither image classification nor text classification.
    """
    data_dir = data_dir or default_data_dir()
    base, _, config = name.split(":")[0].partition("/")
    if base not in tfds.list_builders(with_community_datasets=False):
        raise UnknownDatasetError(f"Unknown dataset {name!r}. {_choices_hint(name, data_dir)}")
    configs = getattr(tfds.builder_cls(base), "builder_configs", None) or {}
    if config and configs and config not in configs:
        raise UnknownDatasetError(
            f"Unknown dataset {name!r}: {base} has the configs {', '.join(sorted(configs))}. "
            f"{_choices_hint(name, data_dir)}"
        )
    try:
        dataset_builder = tfds.builder(name, data_dir=data_dir)
    except _private.tfds_not_found_errors(tfds) as error:
        first_line = str(error).strip().splitlines()[0]
        raise UnknownDatasetError(f"Unknown dataset {name!r}: {first_line} {_choices_hint(name, data_dir)}") from None
    task(dataset_builder.info)  # raises for datasets of another kind
    return dataset_builder


def task(info):
    """"image" or "text": which pipeline fits a dataset, from its features."""
    features = info.features
    label = features["label"] if "label" in features.keys() else None
    if not isinstance(label, tfds.features.ClassLabel):
        raise UnknownDatasetError(
            f"Dataset {info.full_name!r} has no ClassLabel feature 'label' (features: {', '.join(features.keys())}); "
            "the pipelines handle image and text classification."
        )
    if "image" in features.keys() and isinstance(features["image"], tfds.features.Image):
        shape = features["image"].shape
        if None in shape:
            raise UnknownDatasetError(
                f"Dataset {info.full_name!r} has images of varying size {shape}; the image pipeline needs a fixed "
                "size (mnist, fashion_mnist, cifar10, ...)."
            )
        return "image"
    if _text_key(features) is not None:
        return "text"
    raise UnknownDatasetError(
        f"Dataset {info.full_name!r} has features {', '.join(features.keys())}; the pipelines need an 'image' or a "
        "text feature next to 'label'."
    )


def _text_key(features):
    for key, feature in features.items():
        if isinstance(feature, tfds.features.Text):
            return key
    return None


@dataclasses.dataclass
class Data:
    """Batched pipelines and what a model needs to know about them.

    Attributes:
        name: the TFDS name.
        task: "image" or "text".
        train: `(input, label)` batches, shuffled each epoch.
        validation: `(input, label)` batches, in order.
        validation_split: the split `validation` reads ("test" or "validation").
        train_examples, validation_examples: examples in each split.
        train_steps: training batches per epoch: whole batches only, the
            remainder dropped (one smaller batch if there is less than one).
        num_classes: from the dataset's ClassLabel.
        class_names: the label names.
        input_shape: one example as the model sees it: (H, W, C) for images,
            (sequence_length,) of token ids for text.
        input_name: the name of the raw serving input: "image", or the text
            feature's name ("sentence" for SST-2).
        vectorizer: the adapted `TextVectorization` (text only), else None.
        data_dir: the folder read from.
    """

    name: str
    task: str
    train: tf.data.Dataset
    validation: tf.data.Dataset
    validation_split: str
    train_examples: int
    validation_examples: int
    train_steps: int
    num_classes: int
    class_names: list
    input_shape: tuple
    input_name: str
    vectorizer: keras.layers.TextVectorization | None
    data_dir: str

    @property
    def vocab_size(self):
        """Token ids are in [0, vocab_size); 0 is padding, 1 out-of-vocabulary."""
        return self.vectorizer.vocabulary_size() if self.vectorizer is not None else None

    @property
    def sequence_length(self):
        return self.input_shape[0] if self.task == "text" else None

    def serving_input(self):
        """A `keras.Input` for the raw data a served model takes: uint8 images or strings."""
        if self.task == "image":
            return keras.Input(self.input_shape, dtype="uint8", name=self.input_name)
        return keras.Input((), dtype="string", name=self.input_name)

    def serving_spec(self):
        """The `tf.TensorSpec` of `serving_input`, named, with a free batch size."""
        if self.task == "image":
            return tf.TensorSpec((None, *self.input_shape), tf.uint8, name=self.input_name)
        return tf.TensorSpec((None,), tf.string, name=self.input_name)

    def preprocess(self, raw):
        """Raw serving input -> what the zoo model takes: [0, 1] floats or int32 token ids."""
        if self.task == "image":
            return keras.layers.Rescaling(1.0 / 255, name="rescaling")(raw)
        return self.vectorizer(raw)

    def training_input(self):
        """A `keras.Input` for the elements of `train`: uint8 images or int32 token ids."""
        if self.task == "image":
            return self.serving_input()
        return keras.Input(self.input_shape, dtype="int32", name="token_ids")

    def training_preprocess(self, inputs):
        """`training_input` -> model input. Text arrives already vectorized."""
        return self.preprocess(inputs) if self.task == "image" else inputs


def load(
    name,
    data_dir=None,
    batch_size=64,
    max_train_examples=None,
    max_eval_examples=None,
    augment=None,
    seed=0,
    vocab_size=DEFAULT_VOCAB_SIZE,
    sequence_length=DEFAULT_SEQUENCE_LENGTH,
    download=None,
):
    """Builds the training and validation pipelines for a TFDS dataset.

    Args:
        name: a TFDS name: "fashion_mnist", "cifar10", "glue/sst2", ...
        data_dir: the TFDS data folder; defaults to `TFDS_DATA_DIR`, else
            TFDS's default.
        batch_size: examples per batch (the last batch may be smaller).
        max_train_examples: keep only the first this many training examples.
        max_eval_examples: keep only the first this many validation examples.
        augment: random crop with padding and flip for training images; `None`
            means on for cifar10 only. Ignored for text.
        seed: for shuffling and augmentation.
        vocab_size: most tokens the text vectorizer keeps (with padding and
            out-of-vocabulary).
        sequence_length: token ids per text example (padded or truncated).
        download: download and prepare a dataset missing from the data folder,
            as `tfds.load` does. `None` means only when no folder was named
            (neither `data_dir` nor `TFDS_DATA_DIR`): a named folder is only
            read, never written.

    Returns:
        A `Data`.

    Raises:
        UnknownDatasetError: not a TFDS dataset, or not one these pipelines
            can feed.
        DatasetMissingError: the dataset is not prepared in the data folder;
            the message names the folder and `TFDS_DATA_DIR`.
    """
    if download is None:
        download = not (data_dir or os.environ.get("TFDS_DATA_DIR"))
    data_dir = data_dir or default_data_dir()
    dataset_builder = builder(name, data_dir)
    info = dataset_builder.info
    kind = task(info)
    # Before preparation (and under tfds.testing.mock_data) the split list is
    # empty; then any name is accepted.
    known_splits = list(info.splits.keys())
    if known_splits and "train" not in known_splits:
        raise UnknownDatasetError(f"Dataset {name!r} has no 'train' split (splits: {', '.join(known_splits)}).")
    validation_split = next((s for s in VALIDATION_SPLITS if s in known_splits), None)
    if known_splits and validation_split is None:
        raise UnknownDatasetError(
            f"Dataset {name!r} has neither a 'validation' nor a 'test' split (splits: {', '.join(known_splits)})."
        )
    validation_split = validation_split or "test"

    try:
        train = _read(dataset_builder, "train", name, data_dir)
    except DatasetMissingError:
        if not download:
            raise
        _download(dataset_builder, name, data_dir)
        arguments = dict(
            batch_size=batch_size, max_train_examples=max_train_examples, max_eval_examples=max_eval_examples,
            augment=augment, seed=seed,
        )  # fmt: skip
        return load(name, data_dir, **arguments, vocab_size=vocab_size, sequence_length=sequence_length, download=False)
    validation = _read(dataset_builder, validation_split, name, data_dir)
    if max_train_examples is not None:
        train = train.take(max_train_examples)
    if max_eval_examples is not None:
        validation = validation.take(max_eval_examples)
    train_examples = _count(train)
    validation_examples = _count(validation)
    if train_examples == 0:
        raise UnknownDatasetError(f"Dataset {name!r} has no training examples to read.")

    label = info.features["label"]
    if kind == "image":
        image_key = "image"
        train = _pairs(train, image_key)
        validation = _pairs(validation, image_key)
        input_shape = tuple(info.features[image_key].shape)
        input_name = image_key
        vectorizer = None
        augment = name.split(":")[0] in AUGMENTED_BY_DEFAULT if augment is None else augment
    else:
        text_key = _text_key(info.features)
        train = _pairs(train, text_key)
        validation = _pairs(validation, text_key)
        vectorizer = keras.layers.TextVectorization(
            max_tokens=vocab_size,
            output_sequence_length=sequence_length,
            name="text_vectorization",
        )
        vectorizer.adapt(train.map(lambda text, _: text).batch(_ADAPT_BATCH))
        train = _vectorize(train, vectorizer, train_examples)
        validation = _vectorize(validation, vectorizer, validation_examples)
        input_shape = (sequence_length,)
        input_name = text_key
        augment = False

    train = train.cache().shuffle(min(train_examples, _MAX_SHUFFLE_BUFFER), seed=seed, reshuffle_each_iteration=True)
    if augment:
        # Stateless ops fed by a seed stream that differs each epoch: a seeded
        # stateful op would repeat the same crops every epoch.
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        train = tf.data.Dataset.zip(train, seeds).map(_augment_fn(input_shape), num_parallel_calls=tf.data.AUTOTUNE)
    # Whole batches only (unless there is less than one): a last batch of a single
    # example would stop batch norm's training step, and a small one skews its statistics.
    train = train.batch(batch_size, drop_remainder=train_examples >= batch_size).prefetch(tf.data.AUTOTUNE)
    validation = validation.cache().batch(batch_size).prefetch(tf.data.AUTOTUNE)
    return Data(
        name=name,
        task=kind,
        train=train,
        validation=validation,
        validation_split=validation_split,
        train_examples=train_examples,
        validation_examples=validation_examples,
        train_steps=max(1, train_examples // batch_size),
        num_classes=label.num_classes,
        class_names=list(label.names),
        input_shape=input_shape,
        input_name=input_name,
        vectorizer=vectorizer,
        data_dir=str(data_dir),
    )


def _download(dataset_builder, name, data_dir):
    print(f"Downloading and preparing {name} into {data_dir} (once; TFDS shows its progress).", flush=True)
    try:
        dataset_builder.download_and_prepare()
    except Exception as error:  # noqa: BLE001 - any failure of the download is reported the same way
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DatasetMissingError(
            f"Dataset {name!r} is not in {data_dir} and could not be downloaded: {first_line}. Offline, point "
            "--data-dir or the TFDS_DATA_DIR environment variable at a folder of prepared TFDS datasets."
        ) from None


def _read(dataset_builder, split, name, data_dir):
    try:
        return dataset_builder.as_dataset(split=split, shuffle_files=False)
    except AssertionError:
        # TFDS's way of saying the data was never prepared in this folder.
        raise DatasetMissingError(
            f"Dataset {name!r} is not in the data folder {data_dir} (looked in {dataset_builder.data_dir}). "
            "Point --data-dir or the TFDS_DATA_DIR environment variable at a folder of prepared TFDS datasets "
            "(export TFDS_DATA_DIR=/path/to/tensorflow_datasets), or prepare it there on a machine with internet "
            f"(tfds build {name} --data_dir {data_dir})."
        ) from None


def _count(dataset):
    count = int(dataset.cardinality())
    if count < 0:  # unknown: count once
        count = int(dataset.reduce(0, lambda n, _: n + 1))
    return count


def _pairs(dataset, key):
    return dataset.map(lambda example: (example[key], example["label"]), num_parallel_calls=tf.data.AUTOTUNE)


def _vectorize(dataset, vectorizer, examples):
    """Text -> int32 token ids, in batches (much faster than one string at a time)."""
    dataset = dataset.batch(_ADAPT_BATCH).map(
        lambda text, label: (tf.cast(vectorizer(text), tf.int32), label), num_parallel_calls=tf.data.AUTOTUNE
    )
    return dataset.unbatch().apply(tf.data.experimental.assert_cardinality(examples))


def _augment_fn(input_shape):
    height, width, _ = input_shape

    def augment(pair, seed):
        image, label = pair
        image = tf.image.resize_with_crop_or_pad(image, height + 2 * _CIFAR_PADDING, width + 2 * _CIFAR_PADDING)
        image = tf.image.stateless_random_crop(image, input_shape, seed=seed)
        image = tf.image.stateless_random_flip_left_right(image, seed=seed[::-1])
        return image, label

    return augment
