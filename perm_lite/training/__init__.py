"""Training, export and evaluation (the `train` extra). Never imported by the scoring path."""
