"""Data-parallel training, one module per framework: `torch_ddp` (torchrun, DDP) and
`tf_strategy` (tf.distribute). This package imports nothing itself; a chapter imports
only the module of its own framework (never both in one process: torchvision imported
after TensorFlow segfaults).
"""
