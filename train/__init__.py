"""stdit.train: staged training, hybrid parallelism and sampling."""
