"""Fixtures shared by several test files."""
import pytest

from training.sample_data import write_sample_dataset


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The embedded dataset, small: 16 train and 8 validation images (tiny_run.py's runs train on it)."""
    root = tmp_path_factory.mktemp("demo")
    write_sample_dataset(root, num_train=16, num_val=8, seed=0)
    return root
