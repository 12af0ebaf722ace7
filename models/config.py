"""Model hyperparameters as one plain dataclass (so a model can be rebuilt from JSON), and the spec-key check."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

# Keys every model spec may carry; "name" labels a run (e.g. baseline-small) and is not passed on.
COMMON_KEYS = frozenset({"arch", "name"})


def check_keys(spec: dict[str, Any], allowed: frozenset[str], required: Sequence[str]) -> None:
    """Reject typos loudly: a misspelt key silently falling back to a default wastes a GPU run."""
    allowed = allowed | COMMON_KEYS
    for key in spec:
        if key not in allowed:
            raise ValueError(f"unknown model spec key {key!r} for arch {spec.get('arch')!r}; "
                             f"allowed: {sorted(allowed)}")
    for key in required:
        if key not in spec:
            raise ValueError(f"model spec for arch {spec.get('arch')!r} is missing {key!r}")


@dataclass
class ModelConfig:
    """Shape of a ChannelDecoder. No channel names means a channel-less baseline."""

    vocab_size: int
    seq_len: int
    n_layer: int
    n_head: int
    d_model: int
    mlp_ratio: float = 4.0
    channel_names: tuple[str, ...] = ()
    channel_dim: int = 0  # the width channel vectors arrive in: the widest channel's, the rest zero-padded
    channel_tokens: int = 2
    dropout: float = 0.0
    channel_dims: tuple[int, ...] = ()  # each channel's own width (<= channel_dim); empty: all channel_dim
    # the channels the data carries, when the model reads a subset of them (channel_names, in this order's
    # order): the model takes the full [.., len(input_channels), D] tensor and keeps its own. Empty: all.
    input_channels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # JSON round trips turn tuples into lists; keep the dataclass hashable and comparable.
        self.channel_names = tuple(self.channel_names)
        self.channel_dims = tuple(int(d) for d in self.channel_dims)
        self.input_channels = tuple(self.input_channels)
        missing = [c for c in self.channel_names if self.input_channels and c not in self.input_channels]
        if missing:
            raise ValueError(f"channel_names {missing} are not among the data's channels {list(self.input_channels)}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        if (self.d_model // self.n_head) % 2:
            raise ValueError("head dim must be even for RoPE")
        if self.channel_names and (self.channel_dim <= 0 or self.channel_tokens <= 0):
            raise ValueError("a channel model needs channel_dim > 0 and channel_tokens > 0")
        if self.channel_dims and (len(self.channel_dims) != self.n_channels
                                  or not all(1 <= d <= self.channel_dim for d in self.channel_dims)):
            raise ValueError(f"channel_dims {list(self.channel_dims)}: give one width in 1..channel_dim "
                             f"({self.channel_dim}) per channel {list(self.channel_names)}")

    @property
    def n_channels(self) -> int:
        return len(self.channel_names)

    @property
    def n_inputs(self) -> int:
        """Channels in the tensor the model is given (the data's), of which it reads n_channels."""
        return len(self.input_channels) or self.n_channels

    @property
    def channel_index(self) -> tuple[int, ...] | None:
        """Where each read channel sits in the data's channel axis; None when the model reads them all as given."""
        if not self.input_channels or self.input_channels == self.channel_names:
            return None
        return tuple(self.input_channels.index(c) for c in self.channel_names)

    @property
    def has_channels(self) -> bool:
        return self.n_channels > 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channel_names"] = list(self.channel_names)
        d["channel_dims"] = list(self.channel_dims)
        d["input_channels"] = list(self.input_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; allowed: {sorted(known)}")
        return cls(**d)
