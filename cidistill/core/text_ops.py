"""Text-tower helpers shared by training, evaluation and export: a vocabulary trimmed to the training corpus
(expanded back on export) and text encoding without the cost of padding."""
from __future__ import annotations

import torch
import torch.nn as nn

from .errors import ModelLoadError


def token_embedding_owner(model: nn.Module):
    """The module holding the token table: CLIP keeps it on the model, CustomTextCLIP on model.text."""
    if hasattr(model, "token_embedding"):
        return model
    if hasattr(model, "text") and hasattr(model.text, "token_embedding"):
        return model.text
    return None


def trim_vocab(model: nn.Module, used_token_ids: torch.Tensor) -> torch.Tensor:
    """Keep only the token rows the corpus uses (plus a shared unknown row at 0). New ids keep the old
    order, so the end-of-text token (open_clip's largest id, found with argmax) stays the largest.
    Returns old2new, the map tokens go through before the model."""
    owner = token_embedding_owner(model)
    if owner is None:
        raise ModelLoadError("trim_vocab: this text tower has no token_embedding (an HF tower?)")
    old = owner.token_embedding
    keep = torch.unique(used_token_ids.flatten())
    new2old = torch.cat([torch.tensor([-1]), keep])
    table = nn.Embedding(len(new2old), old.embedding_dim)
    with torch.no_grad():
        table.weight[1:] = old.weight[keep]
        table.weight[0] = old.weight.mean(0)
    owner.token_embedding = table
    old2new = torch.zeros(old.num_embeddings, dtype=torch.long)
    old2new[keep] = torch.arange(1, len(new2old))
    model.register_buffer("vocab_new2old", new2old, persistent=True)
    return old2new


def expand_vocab(sd: dict[str, torch.Tensor], full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A trimmed checkpoint back to the full open_clip vocabulary (unused tokens get the unknown row)."""
    sd = dict(sd)
    new2old = sd.pop("vocab_new2old")
    key = next((k for k in sd if k.endswith("token_embedding.weight")), None)
    if key is None or key not in full:  # weights of another model: load_into names what does not fit
        return sd
    w = sd[key]
    big = w[0].expand(full[key].shape[0], w.shape[1]).clone()
    big[new2old[1:]] = w[1:]
    sd[key] = big
    return sd


def state_dict_for_export(model: nn.Module, vocab_size: int = 49408) -> dict[str, torch.Tensor]:
    """Plain open_clip weights: trimmed vocabulary expanded, contiguous tensors for safetensors."""
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if "vocab_new2old" in sd:
        key = next(k for k in sd if k.endswith("token_embedding.weight"))
        sd = expand_vocab(sd, {key: torch.empty(vocab_size, sd[key].shape[1])})
    return sd


def token_lengths(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor | None:
    """How many leading columns of each row matter, or None when the tower needs all of them. HF towers
    mask (right) padding; open_clip's causal text transformer pools the end-of-text token, and no token
    attends to a later one, so nothing after that token changes the output."""
    pad = getattr(getattr(getattr(model, "text", None), "config", None), "pad_token_id", None)
    if tokens.ndim != 2 or not len(tokens):
        return None
    if pad is not None:
        return (tokens != pad).sum(1).clamp(min=1)
    if not _causal_clip_text(model):
        return None
    if model.text_pool_type == "argmax":
        return tokens.argmax(1) + 1
    return (tokens == model.text_eos_id).int().argmax(1) + 1


def by_length(model: nn.Module, tokens: torch.Tensor, fn, chunks: int) -> torch.Tensor:
    """fn(tokens) computed without the cost of padding: rows sorted by length, run in `chunks` groups,
    each cut to its longest row (EN captions here use at most 27 of 64 positions, ZH ones vary more)."""
    lengths = token_lengths(model, tokens)
    if lengths is None:
        return fn(tokens)
    order = torch.argsort(lengths, descending=True, stable=True)  # ties keep input order: reproducible groups
    out = None
    for part in torch.tensor_split(order, max(1, min(chunks, len(order)))):
        if not len(part):
            continue
        x = fn(tokens[part, :int(lengths[part].max())])
        if out is None:
            out = x.new_empty(len(tokens), *x.shape[1:])
        out[part] = x
    return out


def encode_text(model: nn.Module, tokens: torch.Tensor, chunks: int = 4) -> torch.Tensor:
    """model.encode_text(tokens), values and gradients, without the cost of padding (see by_length)."""
    if getattr(model, "text", None) is not None or not _causal_clip_text(model):
        return by_length(model, tokens, model.encode_text, chunks)
    from open_clip.transformer import text_global_pool

    cast = model.transformer.get_cast_dtype()

    def causal(t):  # open_clip's encode_text with the context cut to t's width
        n = t.shape[1]
        x = model.token_embedding(t).to(cast) + model.positional_embedding[:n].to(cast)
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
        x = text_global_pool(x, t, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
        return model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection

    return by_length(model, tokens, causal, chunks)


def _causal_clip_text(model: nn.Module) -> bool:
    pool = getattr(model, "text_pool_type", "")
    return (getattr(model, "attn_mask", None) is not None and hasattr(model, "positional_embedding")
            and hasattr(model, "token_embedding")
            and (pool == "argmax" or (pool == "eos" and getattr(model, "text_eos_id", None) is not None)))
