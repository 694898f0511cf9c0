"""stdit.common: the few things every layer shares, kept in one place each.

- :mod:`stdit.common.files`: atomic, durable file and directory writes (every writer uses them);
- :mod:`stdit.common.dtypes`: the one table of dtype names, torch dtypes and element sizes;
- :mod:`stdit.common.env`: the one collector of versions, devices and the git commit.

It imports nothing from the rest of stdit, so kernels, models, train and bench can all use it.
"""
