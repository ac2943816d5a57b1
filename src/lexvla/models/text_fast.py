"""Inference-only fast path of the text encoder, for query serving (``lexvla serve``).

Exact rewrites of :meth:`TextLexicalEncoder.scores`, each measured in docs/web.md:

- **LoRA folded into the weights.** The layers that carry LoRA adapters are copied once with
  ``W + scale * B @ A`` merged into their linear layers (peft's own ``merge``), so a query runs plain
  ``nn.Linear`` layers; the frozen layers are shared with the model, not copied.
- **The prior computed once.** With ``text.prior`` set, the plain path encodes the prior's caption
  beside every batch and subtracts its state; at inference that state is a constant. (With
  ``text.prior_mean`` the stored running mean is subtracted, as in the plain path.)
- **The prompt's constant prefix computed once.** Every prompt starts with the same text (``This
  sentence: "``); the keys and values its tokens leave in every layer depend on nothing else (causal
  attention), so they are computed once and each query runs only its own tokens on top of them. A
  prompt whose tokens start with only part of the prefix's tokens (a caption starting with a quote or
  a bracket merges with the prefix's last token ``Ġ"``) reuses that part, so the result never depends
  on the shortcut.

The rewrites change the float rounding only (tested: vectors within 1e-5 of the plain encode, same
top words). The encoder is a snapshot of the weights it was built from: build it again after training.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

_SENTINEL = "\x00caption\x00"


class _PrefixCache:
    """The duck-typed KV cache a Llama attention layer calls: records (k, v) per layer, or prepends the
    recorded prefix's (k, v) to a query's, one layer at a time. One object per forward pass."""

    def __init__(self, prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None, batch: int = 1) -> None:
        self.prefix = prefix
        self.batch = batch
        self.recorded: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.prefix is None:
            self.recorded.append((key, value))
            return key, value
        pk, pv = self.prefix[layer_idx]
        shape = (self.batch, *pk.shape[1:])
        return torch.cat([pk.expand(shape), key], dim=-2), torch.cat([pv.expand(shape), value], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.prefix is None else int(self.prefix[0][0].shape[-2])


def _merged_layer(layer: nn.Module) -> nn.Module | None:
    """A copy of ``layer`` with its LoRA adapters merged into plain linear layers; None if it has none."""
    from peft.tuners.lora import LoraLayer

    if not any(isinstance(m, LoraLayer) for m in layer.modules()):
        return None
    layer = copy.deepcopy(layer)
    for name, module in list(layer.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()  # the active adapters, W += scale * B @ A (no dropout at inference)
            parent_name, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent_name) if parent_name else layer, child, module.get_base_layer())
    return layer


class FastTextEncoder:
    """``hidden(texts)`` / ``scores(texts)`` of a :class:`~lexvla.models.text.TextLexicalEncoder`, exact,
    cheaper per query: merged LoRA and the prompt prefix's keys and values computed once.

    merge_lora / prefix_cache switch each rewrite (for measuring them one at a time).
    Thread-safe for inference: nothing is written after construction.
    """

    def __init__(self, text_encoder: nn.Module, merge_lora: bool = True, prefix_cache: bool = True) -> None:
        self.text = text_encoder
        decoder = text_encoder._decoder()
        self.embed = decoder.embed_tokens
        self.rotary = decoder.rotary_emb
        self.norm = decoder.norm
        layers = list(decoder.layers)
        self.merged = 0
        if merge_lora:
            with torch.no_grad():
                for i, layer in enumerate(layers):
                    merged = _merged_layer(layer)
                    if merged is not None:
                        layers[i] = merged.eval()
                        self.merged += 1
        self.layers = layers
        self.codebook = text_encoder.codebook
        self.device = self.codebook.device
        self.prefix_ids: list[int] = []
        self._prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if prefix_cache:
            prompt = text_encoder.cfg.prompt.format(caption=_SENTINEL)
            head = prompt.split(_SENTINEL)[0]
            ids = text_encoder.tokenizer(head)["input_ids"] if head else []
            if ids:
                self.prefix_ids = list(ids)
                with torch.inference_mode():
                    self._prefix_kv = self._prefix_states(torch.tensor([ids], device=self.device))

        # The plain path runs the prior's prompt beside every batch; its state depends on the weights only.
        # (With text.prior_mean the training captions' running mean is subtracted instead: read per call.)
        self._prior: torch.Tensor | None = None
        if not getattr(text_encoder.cfg, "prior_mean", False) and getattr(text_encoder.cfg, "prior", None) is not None:
            with torch.inference_mode():
                self._prior = self.hidden([text_encoder.cfg.prior])

    def _run(self, input_ids: torch.Tensor, allowed: torch.Tensor, position_ids: torch.Tensor,
             cache: _PrefixCache) -> torch.Tensor:
        """Decoder over ``input_ids`` (B, T) with a boolean (B, 1, T, P + T) attention mask; (B, D)."""
        hidden = self.embed(input_ids)
        position_embeddings = self.rotary(hidden, position_ids=position_ids)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=allowed, position_embeddings=position_embeddings,
                           position_ids=position_ids, cache=cache, use_cache=True)
        return self.norm(hidden[:, -1]).float()

    def _prefix_states(self, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        n = ids.shape[1]
        allowed = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()[None, None]
        cache = _PrefixCache()
        self._run(ids, allowed, torch.arange(n, device=self.device)[None], cache)
        return [(k.clone(), v.clone()) for k, v in cache.recorded]

    def hidden(self, texts: list[str]) -> torch.Tensor:
        """(B, D) last-token states, as :meth:`TextLexicalEncoder.hidden` computes them (inference)."""
        texts = [texts] if isinstance(texts, str) else [t.strip() for t in texts]
        if not texts:
            raise ValueError("no texts given")
        enc = self.text
        prompts = [enc.cfg.prompt.format(caption=enc._fit(t)) for t in texts]
        ids = enc.tokenizer(prompts, truncation=True, max_length=enc.cfg.max_length)["input_ids"]
        out = torch.empty(len(texts), self.codebook.shape[1], device=self.device)
        # Each row reuses the longest run of prefix tokens it starts with (the cached keys and values of
        # the first j prefix tokens are those of a j-token prefix: causal attention), keeping one token.
        groups: dict[int, list[int]] = {}
        for i, row in enumerate(ids):
            j = 0
            while j < len(self.prefix_ids) and j < len(row) - 1 and row[j] == self.prefix_ids[j]:
                j += 1
            groups.setdefault(j, []).append(i)
        for j, rows in groups.items():
            out[rows] = self._hidden_rows([ids[i][j:] for i in rows], j)
        return out

    def _hidden_rows(self, rows: list[list[int]], p: int) -> torch.Tensor:
        """Rows of token ids (after the cached prefix of ``p`` tokens, if any), left-padded together."""
        width = max(len(r) for r in rows)
        pad = self.text.tokenizer.pad_token_id or 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        real = torch.zeros(len(rows), p + width, dtype=torch.bool)
        real[:, :p] = True
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            real[i, p + width - len(r):] = True
        ids, real = ids.to(self.device), real.to(self.device)
        # Positions count real tokens only (as TextLexicalEncoder.last_hidden does), so a padded row
        # gets the same positions and vector as alone; a query token sees real keys up to itself.
        position_ids = (real.long().cumsum(-1) - 1).clamp(min=0)[:, p:]
        causal = torch.ones(width, p + width, dtype=torch.bool, device=self.device).tril(diagonal=p)
        allowed = (causal[None] & real[:, None, :])[:, None]
        if not p:  # a left pad (query) row with no real key before it would be all False: let it see itself
            allowed = allowed | torch.eye(width, dtype=torch.bool, device=self.device)[None, None]
        prefix = [(k[:, :, :p], v[:, :, :p]) for k, v in self._prefix_kv] if p else None
        cache = _PrefixCache(prefix, batch=len(rows))
        return self._run(ids, allowed, position_ids, cache)

    def agrees(self, texts: tuple[str, ...] = ("a red circle", '"a quoted caption"', "x"),
               tolerance: float = 1e-4) -> bool:
        """Whether this path's scores equal the plain path's on ``texts`` (relative to their scale): a
        guard against text-side features this module does not know, checked once when serving starts."""
        with torch.inference_mode():
            plain, fast = self.text.scores(list(texts)), self.scores(list(texts))
        return bool((plain - fast).abs().max() <= tolerance * max(float(plain.abs().max()), 1.0))

    def scores(self, texts: list[str]) -> torch.Tensor:
        """(B, V) scores against the frozen text codebook, as :meth:`TextLexicalEncoder.scores` (minus the
        prior's scores when ``text.prior`` is set: its state, constant at inference, computed once)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        hidden = self.hidden(texts)
        if getattr(self.text.cfg, "prior_mean", False):  # as TextLexicalEncoder.scores at inference
            return (hidden - self.text.prior_state) @ self.codebook.T
        if self._prior is not None:
            # the prior's own caption scores exactly zero, as in the plain path (one shared row there)
            same = [i for i, t in enumerate(texts) if t.strip() == self.text.cfg.prior.strip()]
            hidden[same] = self._prior
            hidden = hidden - self._prior
        return hidden @ self.codebook.T
