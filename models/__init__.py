"""Models for tinymars: registry, channel decoder, adapter, packed-data loader, trainer, generation. No Prefect."""

import models.adapter  # noqa: F401  (registers arch "adapter")
from models.checkpoint import CheckpointError, load_model, save_model
from models.config import ModelConfig
from models.data import PackedRows, eval_batches, iterate_batches, load_split
from models.generate import generate
from models.gpt import ChannelDecoder, KVCache
from models.registry import REGISTRY, build, count_params, register
from models.trainer import TrainConfig, heldout_loss, train

__all__ = ["REGISTRY", "ChannelDecoder", "CheckpointError", "KVCache", "ModelConfig", "PackedRows", "TrainConfig",
           "build", "count_params", "eval_batches", "generate", "heldout_loss", "iterate_batches", "load_model",
           "load_split", "register", "save_model", "train"]
