"""Kaggle-format reading and writing, download, synthetic data and folds."""

from tgs_salt.data.kaggle_io import TestSet, TrainSet, load_test, load_train

__all__ = ["TestSet", "TrainSet", "load_test", "load_train"]
