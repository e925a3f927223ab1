"""Pretraining heads: next-positive prediction over the catalogue and feedback prediction."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from cartformer.config import ModelConfig
from cartformer.model.backbone import Backbone, head_config
from cartformer.model.layers import residual_mlp
from cartformer.model.losses import catalogue_softmax_losses
from cartformer.model.ops import sequence_offsets

NUM_FEEDBACK_CLASSES = 3
"""Feedback classes: action code minus 1, so cart = 0, click = 1, purchase = 2."""


class PretrainModel(nn.Module):
    """Backbone plus the pretraining heads, with late fusion of state and next context.

    For every target event t that is not the first of its sequence, the model predicts the
    product of t from the state h_{t-1} and the context c_t (retrieval over the catalogue), and
    the feedback class of t from h_{t-1}, c_t and the item embedding i_t.

    Heads (D = embedding_dim, no dropout):
        user_context_fusion: 3 ResidualBlocks on 2D, then Linear 2D -> D.
        candidate_projector: 3 ResidualBlocks on D.
        classifier: 3 ResidualBlocks on 3D, then Linear 3D -> 3.
        tau: learnable scalar with temperature = clip(exp(tau), min_temperature, max_temperature).
    """

    def __init__(self, backbone: Backbone, config: ModelConfig | None = None) -> None:
        super().__init__()
        config = head_config(backbone, config)
        if config.num_products < 2:
            raise ValueError(
                f"ModelConfig.num_products is {config.num_products}. Set it from the prepared "
                "meta.json so the catalogue has at least one product"
            )
        dim = config.embedding_dim
        self.config = config
        self.backbone = backbone
        self.user_context_fusion = residual_mlp(2 * dim, out_dim=dim)
        self.candidate_projector = residual_mlp(dim)
        self.classifier = residual_mlp(3 * dim, out_dim=NUM_FEEDBACK_CLASSES)
        self.tau = nn.Parameter(torch.zeros(1))
        # Index 0 is the reserved unknown product and is never a candidate.
        self.register_buffer(
            "catalogue_indices", torch.arange(1, config.num_products), persistent=False
        )

    @property
    def temperature(self) -> Tensor:
        """(1,) multiplier of the cosine logits, exp(tau) clipped to the configured range."""
        return torch.clamp(
            torch.exp(self.tau), self.config.min_temperature, self.config.max_temperature
        )

    def embed_catalogue(self) -> Tensor:
        """Return the (M, D) normalized projected embeddings of products 1..num_products-1."""
        items = self.backbone.encode_items(self.catalogue_indices)
        return F.normalize(self.candidate_projector(items), dim=-1)

    def forward(self, batch: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """Compute the pretraining losses of a batch.

        Args:
            batch: `batch["history"]` with `product`, `source`, `action`, `position` (N,),
                `lengths` (B,), `target_index` (T,) local to each sample and
                `target_lengths` (B,).

        Returns:
            `loss` = `retrieval_loss` + feedback_loss_weight * `feedback_loss`, scalar means
            over the P predicted events that are 0 when P = 0, `num_predictions`, the int64
            scalar P, and `loss_weight`, P as a float: the weight of this batch's means when
            batches or processes combine into one mean.
        """
        history = batch["history"]
        output = self.backbone(history)
        predicted = self._predicted_positions(history)
        previous = predicted - 1

        states = output.states[previous]
        contexts = output.context_embeddings[predicted]
        items = output.item_embeddings[predicted]
        num_predictions = torch.tensor(predicted.numel(), device=predicted.device)
        denominator = max(predicted.numel(), 1)

        users = F.normalize(self.user_context_fusion(torch.cat([states, contexts], dim=-1)), dim=-1)
        positives = F.normalize(self.candidate_projector(items), dim=-1)
        retrieval_losses = catalogue_softmax_losses(
            users, positives, self.embed_catalogue(), self.temperature
        )
        retrieval_loss = retrieval_losses.sum() / denominator

        feedback_logits = self.classifier(torch.cat([states, contexts, items], dim=-1))
        feedback_classes = self._feedback_classes(history["action"][predicted])
        feedback_loss = F.cross_entropy(feedback_logits, feedback_classes, reduction="sum")
        feedback_loss = feedback_loss / denominator

        return {
            "loss": retrieval_loss + self.config.feedback_loss_weight * feedback_loss,
            "retrieval_loss": retrieval_loss,
            "feedback_loss": feedback_loss,
            "num_predictions": num_predictions,
            "loss_weight": num_predictions.to(retrieval_loss.dtype),
        }

    @staticmethod
    def _predicted_positions(history: Mapping[str, Tensor]) -> Tensor:
        """Return the (P,) global positions of targets that are not first in their sequence."""
        lengths = history["lengths"]
        target_index = history["target_index"]
        target_lengths = history["target_lengths"]
        if target_lengths.shape != lengths.shape:
            raise ValueError(
                f"history.target_lengths has shape {tuple(target_lengths.shape)} but "
                f"history.lengths has {tuple(lengths.shape)}. Both need one entry per sample"
            )
        target_owner_lengths = torch.repeat_interleave(lengths, target_lengths)
        if target_owner_lengths.shape != target_index.shape:
            raise ValueError(
                f"history.target_lengths sums to {target_owner_lengths.numel()} but "
                f"history.target_index has {target_index.numel()} entries"
            )
        if bool(((target_index < 0) | (target_index >= target_owner_lengths)).any()):
            raise ValueError(
                "history.target_index has a position outside its sample's history. Target "
                "indices must be local positions in 0..length-1"
            )
        target_global = target_index + torch.repeat_interleave(
            sequence_offsets(lengths), target_lengths
        )
        return target_global[target_index > 0]

    @staticmethod
    def _feedback_classes(actions: Tensor) -> Tensor:
        classes = actions - 1
        if bool(((classes < 0) | (classes >= NUM_FEEDBACK_CLASSES)).any()):
            raise ValueError(
                "history.action of a predicted event is not 1 (cart), 2 (click) or 3 (purchase). "
                "Pretrain histories must hold positive events only"
            )
        return classes
