"""Framework-free helpers shared by the chapters: download, verify, load, plot, fixtures.

Nothing in this package imports TensorFlow, Keras or PyTorch, so any chapter (of either
framework) can use it, and tests can run it without one.
"""
