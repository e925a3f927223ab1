"""Model package: batch index ops, encoders, the transformer backbone, heads and losses."""

from cartformer.model.backbone import Backbone, BackboneOutput
from cartformer.model.finetune import FinetuneModel
from cartformer.model.layers import (
    ContextEncoder,
    EmbeddingSumEncoder,
    FeedbackEncoder,
    ItemEncoder,
    ResidualBlock,
    residual_mlp,
)
from cartformer.model.losses import (
    CalibratedPairwiseLogistic,
    calibrated_pairwise_logistic,
    catalogue_softmax_losses,
)
from cartformer.model.ops import (
    lengths_to_mask,
    make_groups,
    make_pairs,
    pad_sequences,
    sequence_offsets,
    unpad,
)
from cartformer.model.pretrain import PretrainModel

__all__ = [
    "Backbone",
    "BackboneOutput",
    "CalibratedPairwiseLogistic",
    "ContextEncoder",
    "EmbeddingSumEncoder",
    "FeedbackEncoder",
    "FinetuneModel",
    "ItemEncoder",
    "PretrainModel",
    "ResidualBlock",
    "calibrated_pairwise_logistic",
    "catalogue_softmax_losses",
    "lengths_to_mask",
    "make_groups",
    "make_pairs",
    "pad_sequences",
    "residual_mlp",
    "sequence_offsets",
    "unpad",
]
