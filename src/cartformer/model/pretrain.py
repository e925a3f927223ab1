"""Pretraining heads: next-positive prediction over the catalogue and feedback prediction."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from cartformer.config import ModelConfig
from cartformer.model.backbone import Backbone, head_config
from cartformer.model.layers import residual_mlp
from cartformer.model.losses import (
    catalogue_softmax_losses,
    log_expected_counts,
    sample_candidates,
    sampled_softmax_losses,
)
from cartformer.model.ops import sequence_offsets

logger = logging.getLogger(__name__)

NUM_FEEDBACK_CLASSES = 3
"""Feedback classes: action code minus 1, so cart = 0, click = 1, purchase = 2."""

SOFTMAX_MODES = ("full", "sampled")
"""Values of ModelConfig.softmax: the retrieval loss over the whole catalogue, or over in-batch
plus uniform negatives during training."""


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

    Retrieval loss: with `config.softmax == "full"` the softmax runs over every catalogue
    product. With `"sampled"`, training steps use `sampled_softmax_losses` over the step's
    in-batch positives plus `config.num_negatives` uniform products, corrected by
    `log_expected_counts` when `config.logq_correction` is set. In eval mode (`model.eval()`)
    both options compute the full-catalogue loss, so validation losses of the two options are
    comparable. The uniform draws use torch's global generator, so `torch.manual_seed`
    reproduces them.

    Args:
        backbone: the shared transformer.
        config: head sizes and loss options, or None for the backbone's config.
        target_counts: (num_products,) counts of each product among the predicted training
            targets, from `count_target_products`, for the logQ correction. It is stored as the
            persistent buffer `target_counts` of that shape whatever the options, so the state
            dicts of full and sampled models match. None stores zeros, with which the
            correction has no effect.
    """

    def __init__(
        self,
        backbone: Backbone,
        config: ModelConfig | None = None,
        target_counts: Tensor | None = None,
    ) -> None:
        super().__init__()
        config = head_config(backbone, config)
        if config.num_products < 2:
            raise ValueError(
                f"ModelConfig.num_products is {config.num_products}. Set it from the prepared "
                "meta.json so the catalogue has at least one product"
            )
        _check_softmax_options(config)
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
        self.register_buffer("target_counts", _checked_counts(target_counts, config.num_products))
        # Checked at the first sampled step, because weights loaded after construction may
        # bring the counts.
        self._counts_checked = False

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
            batches or processes combine into one mean. `retrieval_loss` is the sampled loss
            in training mode with `softmax="sampled"` and the full-catalogue loss otherwise.
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
        retrieval_losses = self.retrieval_losses(users, items, history["product"][predicted])
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

    def retrieval_losses(self, users: Tensor, items: Tensor, products: Tensor) -> Tensor:
        """Compute the next-positive loss of each prediction, full or sampled.

        Args:
            users: (P, D) normalized fused user and context vectors.
            items: (P, D) item encoder outputs of the positives, used by the full softmax.
            products: (P,) int64 product indices of the positives, used by the sampled softmax.

        Returns:
            (P,) losses: the sampled softmax in training mode with `softmax="sampled"`, which
            encodes and projects only the step's K candidates once, and otherwise the
            softmax over the catalogue with the positive in front.
        """
        if self.config.softmax == "sampled" and self.training:
            return self._sampled_retrieval_losses(users, products)
        positives = F.normalize(self.candidate_projector(items), dim=-1)
        return catalogue_softmax_losses(users, positives, self.embed_catalogue(), self.temperature)

    def _sampled_retrieval_losses(self, users: Tensor, products: Tensor) -> Tensor:
        num_negatives = self.config.num_negatives
        candidates, positive_columns = sample_candidates(
            products, self.config.num_products, num_negatives
        )
        vectors = F.normalize(
            self.candidate_projector(self.backbone.encode_items(candidates)), dim=-1
        )
        log_q = None
        if self.config.logq_correction:
            self._warn_without_counts()
            log_q = log_expected_counts(
                candidates, self.target_counts, products.shape[0], num_negatives
            )
        return sampled_softmax_losses(users, vectors, positive_columns, self.temperature, log_q)

    def _warn_without_counts(self) -> None:
        if self._counts_checked:
            return
        self._counts_checked = True
        if not bool(self.target_counts.any()):
            logger.warning(
                "softmax='sampled' with logq_correction but target_counts are all 0, so the "
                "logQ correction has no effect. Pass target_counts=count_target_products("
                "dataset, num_products) to PretrainModel to correct for product popularity"
            )

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


class FlatListLike(Protocol):
    """A list column as flat values and offsets, like `cartformer.data.dataset.FlatList`."""

    @property
    def values(self) -> np.ndarray:
        """(total,) integer values of all rows."""
        ...

    @property
    def offsets(self) -> np.ndarray:
        """(rows + 1,) int64 start offsets, starting at 0."""
        ...


class PretrainListsLike(Protocol):
    """An object with the flat list columns of a pretrain dataset, like `PretrainDataset`."""

    @property
    def lists(self) -> Mapping[str, FlatListLike]:
        """List columns by name, at least `product` and `target_index`."""
        ...


def count_target_products(dataset: PretrainListsLike, num_products: int) -> Tensor:
    """Count how often each product is a predicted target: the popularity that logQ corrects.

    A target counts when it is not the first event of its history, because `PretrainModel`
    predicts only those.

    Args:
        dataset: a pretrain dataset whose `lists["product"]` and `lists["target_index"]` have
            `values` and (rows + 1,) `offsets`, such as `PretrainDataset` of the training file.
        num_products: catalogue size including the reserved index 0.

    Returns:
        (num_products,) int64 counts, for `PretrainModel(..., target_counts=...)`.
    """
    products = dataset.lists["product"]
    targets = dataset.lists["target_index"]
    if products.offsets.shape != targets.offsets.shape:
        raise ValueError(
            f"lists 'product' and 'target_index' have {products.offsets.shape[0] - 1} and "
            f"{targets.offsets.shape[0] - 1} rows, but a pretrain dataset has one of each per user"
        )
    target_lengths = np.diff(targets.offsets)
    owners = np.repeat(np.arange(target_lengths.shape[0]), target_lengths)
    local = np.asarray(targets.values, dtype=np.int64)
    predicted = local > 0
    positions = products.offsets[:-1][owners[predicted]] + local[predicted]
    values = np.asarray(products.values, dtype=np.int64)[positions]
    invalid = (values < 0) | (values >= num_products)
    if invalid.any():
        raise ValueError(
            f"{int(invalid.sum())} target products are outside 0..{num_products - 1} (first "
            f"{int(values[invalid][0])}). Set num_products from the prepared meta.json"
        )
    return torch.from_numpy(np.bincount(values, minlength=num_products).astype(np.int64))


def _check_softmax_options(config: ModelConfig) -> None:
    if config.softmax not in SOFTMAX_MODES:
        raise ValueError(
            f"ModelConfig.softmax is {config.softmax!r}. Use one of {list(SOFTMAX_MODES)}"
        )
    if config.num_negatives < 0:
        raise ValueError(
            f"ModelConfig.num_negatives is {config.num_negatives}. Use 0 or more uniform "
            "negatives per step"
        )


def _checked_counts(target_counts: Tensor | None, num_products: int) -> Tensor:
    """Return the (num_products,) int64 buffer of target counts, zeros when None."""
    if target_counts is None:
        return torch.zeros(num_products, dtype=torch.int64)
    if target_counts.shape != (num_products,):
        raise ValueError(
            f"target_counts has shape {tuple(target_counts.shape)}, but ModelConfig.num_products "
            f"is {num_products}. Compute it with count_target_products(dataset, {num_products})"
        )
    if target_counts.is_floating_point() or target_counts.is_complex():
        raise ValueError(
            f"target_counts has dtype {target_counts.dtype}, but integer counts are expected. "
            "Compute them with count_target_products"
        )
    if bool((target_counts < 0).any()):
        raise ValueError("target_counts has negative values, but counts must be 0 or more")
    return target_counts.detach().to(dtype=torch.int64, device="cpu").clone()
