"""Training: tokenizer training, datasets and objectives, the training loop.

    from ferry.train import load_train_config, train
    result = train(load_train_config("examples/dates.yaml"))
"""

from ferry.train.config import TrainConfig, load_train_config
from ferry.train.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "load_train_config", "train"]
