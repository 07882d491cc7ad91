"""Kaggle-format reading and writing, download, synthetic data and folds."""

from tgs_salt.data.kaggle_io import TestSet, TrainSet, load_test, load_train

__all__ = ["TrainSet", "TestSet", "load_train", "load_test"]
