"""stdit.train: staged training and hybrid parallelism (issues: training, parallel)."""
