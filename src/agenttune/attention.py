"""Attention for packed rows without a varlen kernel: sdpa run once per sample.

A packed row (training.pack) holds several samples whose position ids restart at 0. With
flash-attention, the varlen kernel reads the sample boundaries and attends within each sample.
sdpa has no varlen kernel: transformers gives it a block-diagonal causal mask over the whole row,
and the kernel computes the row × row score matrix, masked blocks included. For a row of n samples
of length l that is (n·l)² scores where n·l² are needed, and on a CPU it is most of a step.

``packed_sdpa`` is registered with transformers' AttentionInterface under PACKED_SDPA. When the
forward carries ``cu_seq_lens_q`` (training.model_inputs passes them for packed rows), it runs
causal sdpa on each sample's slice of the row: Σ l² scores, and the mask-free causal kernel. Any
other call (padded batches, generation) goes to transformers' own sdpa unchanged.

A row packed with shared prefixes (training.pack_shared) carries ``prefix_nodes`` instead: each
node of its prefix tree attends to its own tokens causally and to all of its ancestors' tokens.

The choice lives only on the loaded model: transformers never writes ``_attn_implementation`` to
config.json, so a saved model loads with stock ``from_pretrained``.
"""

from __future__ import annotations

import torch

PACKED_SDPA = "packed_sdpa"

_bounds: tuple[torch.Tensor | None, list[int]] = (None, [])


def sample_bounds(cu_seq_lens: torch.Tensor) -> list[int]:
    """The boundaries as Python ints, read once per forward: every layer gets the same tensor,
    and reading a GPU tensor waits for the device."""
    global _bounds
    if _bounds[0] is not cu_seq_lens:
        _bounds = (cu_seq_lens, cu_seq_lens.tolist())
    return _bounds[1]


_tree: tuple[torch.Tensor | None, list[tuple[int, int, list[tuple[int, int]]]]] = (None, [])


def tree_spans(prefix_nodes: torch.Tensor) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Per node of a shared-prefix row: (start, end, its ancestors' (start, end) spans, root
    first). Read once per forward, as sample_bounds."""
    global _tree
    if _tree[0] is not prefix_nodes:
        nodes = prefix_nodes.tolist()
        spans = []
        for start, end, parent in nodes:
            above = spans[parent][2] + [(nodes[parent][0], nodes[parent][1])] if parent >= 0 else []
            spans.append((start, end, above))
        _tree = (prefix_nodes, spans)
    return _tree[1]


def _tree_sdpa(module, query, key, value, prefix_nodes, dropout, scaling):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    pieces = []
    for start, end, above in tree_spans(prefix_nodes):
        if not above:
            pieces.append(sdpa_attention_forward(
                module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], None,
                dropout=dropout, scaling=scaling, is_causal=True)[0])
            continue
        spans = above + [(start, end)]
        keys = torch.cat([key[:, :, a:b] for a, b in spans], dim=2)
        values = torch.cat([value[:, :, a:b] for a, b in spans], dim=2)
        own, before = end - start, keys.shape[2] - (end - start)
        mask = torch.ones(own, before + own, dtype=torch.bool, device=query.device)
        mask[:, before:] = torch.ones(own, own, dtype=torch.bool, device=query.device).tril()
        pieces.append(sdpa_attention_forward(
            module, query[:, :, start:end], keys, values, mask[None, None],
            dropout=dropout, scaling=scaling, is_causal=False)[0])
    return torch.cat(pieces, dim=1), None


def packed_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """query (1, heads, N, head_dim), key and value (1, kv_heads, N, head_dim) for a packed row;
    returns (1, N, heads, head_dim) as transformers' sdpa does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.pop("cu_seq_lens_q", None)
    prefix_nodes = kwargs.pop("prefix_nodes", None)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if prefix_nodes is not None and causal and query.shape[0] == 1 and query.shape[2] == key.shape[2]:
        return _tree_sdpa(module, query, key, value, prefix_nodes, dropout, scaling)
    if bounds is None or not causal or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    bounds = sample_bounds(bounds)
    if bounds[-1] != query.shape[2]:
        raise ValueError(f"cu_seq_lens_q ends at {bounds[-1]} but the packed row has {query.shape[2]} tokens")
    pieces = [
        sdpa_attention_forward(
            module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], None,
            dropout=dropout, scaling=scaling, is_causal=True,
        )[0]
        for start, end in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(pieces, dim=1), None


def register() -> None:
    """Make PACKED_SDPA a valid ``attn_implementation``. Its masks are sdpa's: a padded batch
    still needs one, and a packed row's is built but unused."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)


def use_packed_sdpa(model) -> bool:
    """Switch a model (or the model under a PEFT wrapper) from sdpa to packed_sdpa. Other
    implementations are left alone: flash-attention has its varlen kernel, and eager was asked
    for by name. Returns whether it switched."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config._attn_implementation != "sdpa":
        return False
    register()
    base.set_attn_implementation(PACKED_SDPA)
    return base.config._attn_implementation == PACKED_SDPA
