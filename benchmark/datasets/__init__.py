"""Dataset loaders: CVUSA, CVACT, VIGOR as distributed, and the synthetic world.

Every loader is a registry entry (kind `dataset`) whose class derives from
`benchmark.datasets.base.CrossViewDataset`.
"""
