"""The recipe that trained the shipped ``tiny-shapes`` model, kept apart from the library.

- ``dataset``: procedurally drawn shapes with captions, and held-out combinations to score on;
- ``checker``: reads colour, shape, size, position and background back from pixels;
- ``train``: the staged training script (``python examples/tiny_shapes/train.py --help``);
- ``model_card``: writes ``MODEL_CARD.md`` from the logs and the final evaluation.

Import it with ``examples/`` on ``sys.path`` (``from tiny_shapes import dataset, checker``); the
training script arranges that itself.
"""
