"""Supervised deep picker: a small fully convolutional network trained on a few labelled
micrographs (positive-unlabelled loss optional), predicting a particle-centre score map."""

from tamis.pick.deep.network import PickerNet
from tamis.pick.deep.predict import DeepPicker, load_model, pick_deep
from tamis.pick.deep.train import TrainOptions, train_picker

__all__ = ["PickerNet", "DeepPicker", "load_model", "pick_deep", "TrainOptions", "train_picker"]
