"""The rendered orientation task: balanced, deterministic, and the real classifier gets it right."""

import numpy as np
import pytest

from bitq_tvm.models.orientation_data import orientation_samples


def test_samples_are_balanced_deterministic_and_normalised():
    x, y = orientation_samples(8, seed=3)
    assert x.shape == (8, 3, 224, 224) and x.dtype == np.float32 and y.dtype == np.int64
    assert np.bincount(y, minlength=4).tolist() == [2, 2, 2, 2]
    x2, y2 = orientation_samples(8, seed=3)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    # white background -> (1 - mean) / std per channel
    np.testing.assert_allclose(x[:, :, 0, 0].max(axis=0), (1 - np.array([0.485, 0.456, 0.406])) / [0.229, 0.224, 0.225],
                               rtol=1e-5)


def test_fp32_classifier_reads_the_rendered_orientation():
    import onnxruntime as ort

    from bitq_tvm.models.corpus import cached_path, get

    path = cached_path(get("pplcnet_orientation"))
    if not path.is_file():
        pytest.skip("pplcnet_orientation is not cached (bitq-tvm corpus fetch pplcnet_orientation)")
    x, y = orientation_samples(32, seed=0)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    predicted = np.concatenate([session.run(None, {"x": x[i:i + 8]})[0] for i in range(0, 32, 8)]).argmax(1)
    assert (predicted == y).mean() >= 0.9, (predicted, y)
