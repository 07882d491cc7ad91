"""TGS Salt Identification Challenge: K-fold U-Net pipeline from Kaggle folder to submission."""

__version__ = "0.1.0"
