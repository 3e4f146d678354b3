"""Models made by the project (nothing is downloaded).

- :mod:`bitq_tvm.models.zoo`: ONNX builders with random weights (ResNet-18, MobileNetV2, a
  BERT-style encoder), model rewrites (weights in Constant nodes, symbolic batch), synthetic
  inputs, and access to the bundled trained digits CNN and its test split.
- :mod:`bitq_tvm.models.train_digits`: trains that CNN with NumPy on scikit-learn's digits and
  regenerates ``digits_cnn.onnx`` / ``digits_test.npz``.
"""

from .zoo import (
    bundled_model_path,
    bundled_test_data,
    mobilenet_v2,
    resnet18,
    synthetic_inputs,
    transformer_encoder,
    with_dynamic_batch,
    with_weights_in_constant_nodes,
)

__all__ = [
    "bundled_model_path",
    "bundled_test_data",
    "mobilenet_v2",
    "resnet18",
    "synthetic_inputs",
    "transformer_encoder",
    "with_dynamic_batch",
    "with_weights_in_constant_nodes",
]
