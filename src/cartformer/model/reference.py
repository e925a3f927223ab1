"""A straightforward padded implementation of the model, kept as the reference for tests and
benchmarks.

It computes what `Backbone` and `PretrainModel` compute, with the same weights, the way a plain
notebook would. Every feature is padded to (B, L) first. Each layer runs attention with an
explicit causal and key-padding mask and its feed-forward on all B * L positions. The
pretraining heads score every position against the catalogue, and only then are the padded
and non-predicted positions masked out of the loss. Tests check that the fast model matches it;
`benchmarks/bench_train.py` measures how much faster the fast model is.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from cartformer.model.backbone import Backbone, CausalEncoderLayer
from cartformer.model.finetune import FinetuneModel
from cartformer.model.ops import lengths_to_mask, pad_sequences, sequence_offsets
from cartformer.model.pretrain import NUM_FEEDBACK_CLASSES, PretrainModel


def padded_states(backbone: Backbone, history: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Run the backbone on right-padded inputs.

    Args:
        backbone: the model whose weights are used.
        history: unpadded `product`, `source`, `action`, `position` (N,) and `lengths` (B,).

    Returns:
        (B, L, D) states and the (B, L) bool mask of real positions.
    """
    lengths = history["lengths"]
    valid = lengths_to_mask(lengths)
    padded = {
        name: pad_sequences(history[name], lengths)
        for name in ("product", "source", "action", "position")
    }
    tokens = (
        backbone.item_encoder(padded)
        + backbone.context_encoder(padded)
        + backbone.feedback_encoder(padded)
        + backbone.position_embeddings(padded["position"])
    )
    max_len = valid.shape[1]
    causal = torch.ones(max_len, max_len, dtype=torch.bool, device=valid.device).tril()
    attend = causal[None, None] & valid[:, None, None, :]
    for layer in backbone.layers:
        tokens = _padded_layer(layer, tokens, attend)
    return tokens, valid


def _padded_layer(layer: CausalEncoderLayer, x: Tensor, attend: Tensor) -> Tensor:
    """(B, L, D) tokens and a (B, 1, L, L) bool mask, True where a query attends to a key -> (B, L, D)."""
    batch, length, dim = x.shape
    head_dim = dim // layer.num_heads
    qkv = layer.in_proj(x).view(batch, length, 3, layer.num_heads, head_dim)
    query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    attended = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attend,
        dropout_p=layer.attention_dropout if layer.training else 0.0,
    )
    attended = attended.transpose(1, 2).reshape(batch, length, dim)
    x = layer.norm1(x + layer.dropout_attention_output(layer.out_proj(attended)))
    hidden = layer.dropout_hidden(F.gelu(layer.linear1(x)))
    return layer.norm2(x + layer.dropout_feedforward_output(layer.linear2(hidden)))


def padded_pretrain_losses(
    model: PretrainModel, batch: Mapping[str, Mapping[str, Tensor]]
) -> dict[str, Tensor]:
    """Compute `PretrainModel`'s losses with every head applied to all B * L positions.

    Args:
        model: the model whose weights are used (the full-catalogue softmax).
        batch: a pretrain batch as `PretrainModel.forward` takes it.

    Returns:
        `loss`, `retrieval_loss` and `feedback_loss`, means over the predicted events.
    """
    history = batch["history"]
    lengths = history["lengths"]
    states, valid = padded_states(model.backbone, history)
    padded = {name: pad_sequences(history[name], lengths) for name in ("product", "source")}
    padded["action"] = pad_sequences(history["action"], lengths, padding_value=1)
    items = model.backbone.item_encoder(padded)
    contexts = model.backbone.context_encoder(padded)

    # Event t is predicted from state t-1 when it is a target and not first in its sequence.
    target_global = history["target_index"] + torch.repeat_interleave(
        sequence_offsets(lengths), history["target_lengths"]
    )
    is_target = torch.zeros(history["product"].shape[0], dtype=torch.bool, device=lengths.device)
    is_target[target_global] = True
    predicted = pad_sequences(is_target, lengths, padding_value=False)
    predicted[:, 0] = False
    predicted = predicted & valid

    previous = torch.cat([torch.zeros_like(states[:, :1]), states[:, :-1]], dim=1)
    users = F.normalize(model.user_context_fusion(torch.cat([previous, contexts], dim=-1)), dim=-1)
    positives = F.normalize(model.candidate_projector(items), dim=-1)
    positive_logits = (users * positives).sum(dim=-1, keepdim=True)
    catalogue_logits = users @ model.embed_catalogue().T
    logits = torch.cat([positive_logits, catalogue_logits], dim=-1) * model.temperature
    retrieval = torch.logsumexp(logits, dim=-1) - logits[..., 0]

    feedback_logits = model.classifier(torch.cat([previous, contexts, items], dim=-1))
    classes = (padded["action"] - 1).clamp(0, NUM_FEEDBACK_CLASSES - 1)
    feedback = F.cross_entropy(
        feedback_logits.reshape(-1, NUM_FEEDBACK_CLASSES), classes.reshape(-1), reduction="none"
    ).view_as(classes)

    weights = predicted.to(retrieval.dtype)
    count = weights.sum().clamp(min=1.0)
    retrieval_loss = (retrieval * weights).sum() / count
    feedback_loss = (feedback * weights).sum() / count
    return {
        "loss": retrieval_loss + model.config.feedback_loss_weight * feedback_loss,
        "retrieval_loss": retrieval_loss,
        "feedback_loss": feedback_loss,
    }


def padded_finetune_scores(
    model: FinetuneModel, batch: Mapping[str, Mapping[str, Tensor]]
) -> Tensor:
    """Compute `FinetuneModel.score` with the backbone run on right-padded inputs.

    The ranking head is the model's own (`score_states`): a plain implementation scores the
    candidates of each request the same way, so only the backbone differs.

    Returns:
        (C,) calibrated logits.
    """
    states, valid = padded_states(model.backbone, batch["history"])
    return model.score_states(states[valid], batch)
