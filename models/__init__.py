"""Models for tinymars: registry, channel decoder, adapter, packed-data loader, trainer, generation. No Prefect."""

from models.architectures import ARCHITECTURES, architecture, build, count_params
from models.checkpoint import load_model, save_model
from models.config import ModelConfig
from models.data import PackedRows, eval_batches, iterate_batches, load_split
from models.generate import generate
from models.gpt import ChannelDecoder, KVCache
from models.trainer import heldout_loss, train
from models.weights import CheckpointError
from tinymars.profile import TrainRecipe

__all__ = ["ARCHITECTURES", "ChannelDecoder", "CheckpointError", "KVCache", "ModelConfig", "PackedRows", "TrainRecipe",
           "build", "count_params", "eval_batches", "generate", "heldout_loss", "iterate_batches", "load_model",
           "load_split", "architecture", "save_model", "train"]
