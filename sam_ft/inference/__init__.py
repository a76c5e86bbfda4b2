"""Using a trained model: the model card and ``predict.py`` (label maps for new images)."""
