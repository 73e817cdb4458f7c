import numpy as np
import pytest

from bitplan.core.data import conform, load_data
from bitplan.core.evaluate import check_targets
from bitplan.core.loading import load_model
from bitplan.errors import DataError


@pytest.fixture(scope="module")
def digits(digits_files):
    return load_model(str(digits_files["pt2"]))


def test_wrong_shape_names_the_expected_one(tmp_path, digits):
    np.savez(tmp_path / "flat.npz", inputs=np.zeros((10, 64), np.float32))
    with pytest.raises(DataError) as err:
        conform(load_data(tmp_path / "flat.npz"), digits.inputs)
    assert "(10, 64)" in err.value.message and "(N, 1, 8, 8) float32" in err.value.message


def test_integer_inputs_for_a_float_model_are_refused(tmp_path, digits):
    np.savez(tmp_path / "ints.npz", inputs=np.zeros((10, 1, 8, 8), np.int64))
    with pytest.raises(DataError, match="'inputs' has dtype int64, but the expected dtype is float32"):
        conform(load_data(tmp_path / "ints.npz"), digits.inputs)


def test_float64_inputs_are_cast(tmp_path, digits):
    np.savez(tmp_path / "f64.npz", inputs=np.zeros((10, 1, 8, 8), np.float64))
    data = conform(load_data(tmp_path / "f64.npz"), digits.inputs)
    assert str(data.inputs[""].dtype) == "torch.float32"


def test_unexpected_arrays_and_missing_inputs(tmp_path):
    np.savez(tmp_path / "extra.npz", inputs=np.zeros((3, 2), np.float32), labels=np.zeros(3))
    with pytest.raises(DataError, match="unexpected array 'labels'"):
        load_data(tmp_path / "extra.npz")
    np.savez(tmp_path / "none.npz", targets=np.zeros(3, np.int64))
    with pytest.raises(DataError, match="no 'inputs'"):
        load_data(tmp_path / "none.npz")


def test_mismatched_sample_counts(tmp_path):
    np.savez(tmp_path / "n.npz", inputs=np.zeros((3, 2), np.float32), targets=np.zeros(4, np.int64))
    with pytest.raises(DataError, match="disagree on the number of samples"):
        load_data(tmp_path / "n.npz")


def test_float_targets_and_out_of_range_targets(tmp_path, digits):
    np.savez(tmp_path / "ft.npz", inputs=np.zeros((3, 1, 8, 8), np.float32), targets=np.zeros(3, np.float32))
    with pytest.raises(DataError, match="integer class ids"):
        load_data(tmp_path / "ft.npz")
    np.savez(tmp_path / "big.npz", inputs=np.zeros((3, 1, 8, 8), np.float32), targets=np.array([0, 1, 12]))
    with pytest.raises(DataError, match=r"\[0, 12\] but the model has 10 classes"):
        check_targets(digits, conform(load_data(tmp_path / "big.npz"), digits.inputs))


def test_object_arrays_are_never_unpickled(tmp_path):
    np.savez(tmp_path / "obj.npz", inputs=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(DataError, match="no Python objects"):
        load_data(tmp_path / "obj.npz")


def test_safetensors_with_keyword_inputs(tmp_path):
    from safetensors.numpy import save_file

    save_file({"inputs.input_ids": np.zeros((4, 8), np.int64), "targets": np.zeros(4, np.int64)},
              str(tmp_path / "d.safetensors"))
    data = load_data(tmp_path / "d.safetensors")
    assert set(data.inputs) == {"input_ids"} and len(data) == 4
