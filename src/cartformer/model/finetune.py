"""Finetuning head: score request candidates against the user state at request time."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from cartformer.config import ModelConfig
from cartformer.model.backbone import Backbone, head_config
from cartformer.model.layers import residual_mlp
from cartformer.model.losses import calibrated_pairwise_logistic_sum
from cartformer.model.ops import history_matches, make_groups, sequence_offsets
from cartformer.model.pretrain import PretrainModel

PretrainInit = Literal["backbone", "backbone+heads"]

NUM_COUNT_BUCKETS = 9
"""Buckets of a candidate's count in the history: 0, 1, 2-3, 4-7, ..., 128 and more."""
NUM_RECENCY_BUCKETS = 11
"""Bucket 0: never in the history; then events since its latest occurrence: 0, 1-2, 3-6, ..."""


def log2_buckets(values: Tensor, num_buckets: int) -> Tensor:
    """Map (K,) non-negative int64 to floor(log2(v + 1)) capped at num_buckets - 1."""
    buckets = torch.floor(torch.log2(values.clamp(min=0).double() + 1)).long()
    return buckets.clamp(max=num_buckets - 1)


class FinetuneModel(nn.Module):
    """Backbone plus a ranking head trained with the calibrated pairwise logistic loss.

    A request r of sample b is scored from the state h_k at k = `state_index[r]` of b's history
    and the request's surface context. With u = normalize(user_context_fusion([h_k, c_r])) and
    v = normalize(candidate_projector(i)) for a candidate product i, the logit is
    <u, v> / exp(scale) + bias.

    With `config.history_match` (the default) the logit also gets two learned offsets: one per
    log2 bucket of how many times the candidate occurs in the user's history up to h_k, and one
    per log2 bucket of how many events ago it last occurred. The plain method scores from the
    single vector u, which cannot hold every product a shopper rebuys. On the demo data the
    offsets added about +0.03 NDCG@10 over the plain head. `history_match=False` gives the
    plain method.

    The fusion and projector heads have the same shapes as in `PretrainModel`, so
    `from_pretrain` can copy them.
    """

    def __init__(self, backbone: Backbone, config: ModelConfig | None = None) -> None:
        super().__init__()
        config = head_config(backbone, config)
        dim = config.embedding_dim
        self.config = config
        self.backbone = backbone
        self.user_context_fusion = residual_mlp(2 * dim, out_dim=dim)
        self.candidate_projector = residual_mlp(dim)
        self.scale = nn.Parameter(torch.zeros(1))
        self.bias = nn.Parameter(torch.zeros(1))
        if config.history_match:
            # One learned logit offset per bucket, zero at the start so training begins from
            # the plain calibrated logit.
            self.match_count_logit = nn.Embedding(NUM_COUNT_BUCKETS, 1)
            self.match_recency_logit = nn.Embedding(NUM_RECENCY_BUCKETS, 1)
            nn.init.zeros_(self.match_count_logit.weight)
            nn.init.zeros_(self.match_recency_logit.weight)

    @classmethod
    def from_pretrain(
        cls, pretrain_model: PretrainModel, init: PretrainInit = "backbone"
    ) -> FinetuneModel:
        """Build a finetune model from copies of a pretrained model's weights.

        `init="backbone"` copies the backbone and leaves fresh heads, and `"backbone+heads"` also
        copies `user_context_fusion` and `candidate_projector`. The pretrained model is not
        modified and shares no parameters with the result.
        """
        if init not in ("backbone", "backbone+heads"):
            raise ValueError(f"init={init!r} is invalid. Use 'backbone' or 'backbone+heads'")
        model = cls(copy.deepcopy(pretrain_model.backbone), pretrain_model.config)
        if init == "backbone+heads":
            model.user_context_fusion.load_state_dict(
                pretrain_model.user_context_fusion.state_dict()
            )
            model.candidate_projector.load_state_dict(
                pretrain_model.candidate_projector.state_dict()
            )
        return model.to(next(pretrain_model.parameters()).device)

    def score(self, batch: Mapping[str, Mapping[str, Tensor]]) -> Tensor:
        """Score every candidate of a batch without reading targets.

        Args:
            batch: `history` as for the backbone, whose `target_index` is ignored.
                `requests` with `source` (R,), `state_index` (R,) local to the sample, `lengths`
                (R,) candidates per request, `num_requests` (B,) and the side features of the
                config (`city`, `store`, `timestamp` (R,)). `candidates` with `product` (C,).

        Returns:
            (C,) calibrated logits, in the order of `candidates.product`.
        """
        return self.score_states(self.backbone(batch["history"]).states, batch)

    def score_states(self, states: Tensor, batch: Mapping[str, Mapping[str, Tensor]]) -> Tensor:
        """Score every candidate from given backbone states: `score` without the backbone.

        Args:
            states: (N, D) backbone states of `batch["history"]`, in its unpadded layout.
            batch: as for `score`.

        Returns:
            (C,) calibrated logits, in the order of `candidates.product`.
        """
        history = batch["history"]
        requests = batch["requests"]
        state_positions = self._state_positions(history["lengths"], requests)
        contexts = self.backbone.encode_request_context(history, requests, state_positions)
        fused = self.user_context_fusion(torch.cat([states[state_positions], contexts], dim=-1))
        users = F.normalize(fused, dim=-1)

        request_lengths = requests["lengths"]
        products = batch["candidates"]["product"]
        total = int(request_lengths.sum())
        if total != products.shape[0]:
            raise ValueError(
                f"requests.lengths sums to {total} but candidates.product has "
                f"{products.shape[0]} entries"
            )
        users = torch.repeat_interleave(users, request_lengths, dim=0, output_size=total)
        items = F.normalize(self.candidate_projector(self.backbone.encode_items(products)), dim=-1)
        similarities = (users * items).sum(dim=-1)
        logits = similarities / torch.exp(self.scale) + self.bias
        if self.config.history_match:
            logits = logits + self._history_match_logits(history, requests, products, total)
        return logits

    def _history_match_logits(
        self,
        history: Mapping[str, Tensor],
        requests: Mapping[str, Tensor],
        products: Tensor,
        total: int,
    ) -> Tensor:
        """(C,) learned offsets for how often and how recently the user had each candidate,
        counting only history events up to the scoring state, so no later event leaks in."""
        request_sample = make_groups(requests["num_requests"])
        candidate_sample = torch.repeat_interleave(
            request_sample, requests["lengths"], output_size=total
        )
        candidate_state = torch.repeat_interleave(
            requests["state_index"], requests["lengths"], output_size=total
        )
        count, events_since = history_matches(
            history["product"],
            history["lengths"],
            products,
            candidate_sample,
            candidate_state,
            self.config.num_products,
        )
        count_bucket = log2_buckets(count, NUM_COUNT_BUCKETS)
        recency_bucket = torch.where(
            events_since < 0,
            torch.zeros_like(events_since),
            1 + log2_buckets(events_since, NUM_RECENCY_BUCKETS - 1),
        )
        return self.match_count_logit(count_bucket).squeeze(-1) + self.match_recency_logit(
            recency_bucket
        ).squeeze(-1)

    def forward(self, batch: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """Score a batch and compute the loss against `candidates.target` (C,).

        Returns:
            `logits` (C,), `loss`, the scalar mean calibrated pairwise logistic loss over the
            ordered pairs of all requests (0 when no request has both targets), and
            `loss_weight`, the number of those pairs, so batches combine into one mean.
        """
        logits = self.score(batch)
        loss_sum, num_pairs = calibrated_pairwise_logistic_sum(
            logits, batch["candidates"]["target"], batch["requests"]["lengths"]
        )
        return {
            "logits": logits,
            "loss": loss_sum / num_pairs.clamp(min=1.0),
            "loss_weight": num_pairs.detach(),
        }

    @staticmethod
    def _state_positions(lengths: Tensor, requests: Mapping[str, Tensor]) -> Tensor:
        """Return the (R,) global history positions of the states that score each request."""
        num_requests = requests["num_requests"]
        state_index = requests["state_index"]
        if num_requests.shape != lengths.shape:
            raise ValueError(
                f"requests.num_requests has shape {tuple(num_requests.shape)} but "
                f"history.lengths has {tuple(lengths.shape)}. Both need one entry per sample"
            )
        owner = make_groups(num_requests)
        if owner.shape != state_index.shape:
            raise ValueError(
                f"requests.num_requests sums to {owner.numel()} but requests.state_index has "
                f"{state_index.numel()} entries"
            )
        if bool(((state_index < 0) | (state_index >= lengths[owner])).any()):
            raise ValueError(
                "requests.state_index has a position outside its sample's history. State "
                "indices must be local positions in 0..length-1"
            )
        return sequence_offsets(lengths)[owner] + state_index
