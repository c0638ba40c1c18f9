"""Weight tying: share the input embedding matrix with the output (softmax) layer.

Press & Wolf 2017, Inan et al. 2017: for a language model with an ``nn.Embedding(V, E)``
input and an ``nn.Linear(E, V)`` decoder, using one ``[V, E]`` matrix for both cuts the
parameter count and usually the perplexity. The decoder's input size must then equal the
embedding size: size the last RNN layer's output to E (``hidden_size=E``, or
``proj_size=E`` for an LSTM, or a projection layer).
"""
from __future__ import annotations

from torch import nn


def tie_weights(embedding: nn.Module, decoder: nn.Module) -> nn.Module:
    """Make ``decoder.weight`` the very same Parameter as ``embedding.weight``.

    Args:
        embedding: a module with a ``weight`` Parameter ``[num_embeddings, embedding_dim]``
            (``nn.Embedding``).
        decoder: a module with a ``weight`` Parameter ``[out_features, in_features]``
            (``nn.Linear(embedding_dim, num_embeddings)``); its bias, if any, stays its own.

    Returns the decoder. After tying, ``model.parameters()`` lists the matrix once,
    gradients from both uses add up in it, and ``state_dict`` stores it under both names
    (loading restores the sharing as long as the model is built tied again).

    Raises:
        ValueError: when the shapes differ, naming both and what to change.
        TypeError: when a module has no ``weight`` Parameter.
    """
    for name, module in (("embedding", embedding), ("decoder", decoder)):
        if not isinstance(getattr(module, "weight", None), nn.Parameter):
            raise TypeError(f"tie_weights: {name} ({type(module).__name__}) has no 'weight' Parameter")
    emb, dec = embedding.weight, decoder.weight
    if emb.shape != dec.shape:
        raise ValueError(
            f"tie_weights: cannot tie embedding.weight of shape {list(emb.shape)} "
            f"[num_embeddings, embedding_dim] to decoder.weight of shape {list(dec.shape)} "
            f"[out_features, in_features]: they must be equal, i.e. the decoder must be "
            f"Linear({emb.shape[1] if emb.dim() == 2 else '?'}, "
            f"{emb.shape[0] if emb.dim() == 2 else '?'}); make the RNN output size equal the "
            f"embedding size (hidden_size, or proj_size for an LSTM)")
    if emb.device != dec.device or emb.dtype != dec.dtype:
        raise ValueError(
            f"tie_weights: embedding.weight is {emb.dtype} on {emb.device} but decoder.weight "
            f"is {dec.dtype} on {dec.device}; move them to the same dtype and device first")
    decoder.weight = emb
    return decoder
