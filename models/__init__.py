"""Models for tinymars: registry, channel decoder, packed-data loader, trainer, generation. No Prefect."""

from models.checkpoint import load_model, save_model
from models.config import ModelConfig
from models.data import PackedRows, eval_batches, iterate_batches, load_split
from models.generate import generate
from models.gpt import ChannelDecoder, KVCache
from models.registry import REGISTRY, build, count_params, register
from models.trainer import TrainConfig, heldout_loss, train

__all__ = ["REGISTRY", "ChannelDecoder", "KVCache", "ModelConfig", "PackedRows", "TrainConfig", "build",
           "count_params", "eval_batches", "generate", "heldout_loss", "iterate_batches", "load_model",
           "load_split", "register", "save_model", "train"]
