"""Automatic 2D class selection: RELION's class-ranker features, network and selection."""

from tamis.rank.features import ClassFeatures, class_features, cnn_image, feature_vector
from tamis.rank.network import ClassRankerNet

__all__ = ["ClassFeatures", "class_features", "cnn_image", "feature_vector", "ClassRankerNet"]
