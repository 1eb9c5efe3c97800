"""fer-tune: distributed hyperparameter studies for facial-emotion recognition on FER2013."""

__version__ = "0.3.0"
