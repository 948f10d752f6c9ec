"""Training: ``train_recurrent`` (a recurrent-depth model: question-answer records, conversations, text;
Huginn's fine-tuning recipe by default), ``train_coconut`` (a Coconut model through its curriculum), their
``TrainOptions`` and the ``Curriculum``; ``latentrt train`` runs them (command.py)."""

from .coconut import Curriculum, train_coconut
from .common import TrainOptions
from .recurrent import train_recurrent

__all__ = ["Curriculum", "TrainOptions", "train_coconut", "train_recurrent"]
