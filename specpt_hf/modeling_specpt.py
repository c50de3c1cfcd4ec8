"""PyTorch SpecPT: a transformer for galaxy spectra and their redshifts.

Models: [`SpecPTModel`] (backbone: token states + a pooled embedding), [`SpecPTForSpectrumReconstruction`]
(autoencoder) and [`SpecPTForRedshift`] (redshift, uncertainty and quality per spectrum).

Input contract shared by every model: `flux` [batch, pixels], optional `ivar` [batch, pixels] and optional
`mask` [batch, pixels] (bool, True = BAD pixel). A pixel is bad when `mask` is True or `ivar` is 0 or not
finite. Each spectrum is divided by its own scale (`config.normalization`) computed from good pixels only, and
bad pixels are set to 0 before any layer sees them: the flux at bad pixels cannot change any output (it may
even be NaN). No layer mixes spectra of a batch, except BatchNorm of the `paper` layout in training mode.

[`SpecPTForRedshift`] refines its redshift with a template chi^2 scan when it has rest-frame templates
(`templates.safetensors` in the model folder, `specpt_hf.refinement`; `config.refinement`).

This file is shipped in saved model folders for `trust_remote_code`; it imports only torch, safetensors,
transformers, the configuration file and the refinement module next to it (and what they import).
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, cached_file, logging
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_specpt import SpecPTConfig, SpecPTForRedshiftConfig
from .refinement import (
    RefinementResult,
    RestFrameTemplates,
    archetype_redshifts,
    describe_templates,
    line_aliases,
    load_templates,
    pz_modes,
    refine_redshifts,
    rows_wavelength,
    save_templates,
    scan_grid,
    scan_span,
    smooth_chi2,
    star_range,
    wide_candidates,
)

logger = logging.get_logger(__name__)

# Periods (in ln wavelength) of the sinusoidal wavelength features: from the whole optical range down to about
# half a token of 16 DESI pixels. ln(wavelength) is taken relative to 5000 A to keep the phases small.
_POSITION_MAX_PERIOD = 4.0
_POSITION_MIN_PERIOD = 2e-3
_LOG_WAVELENGTH_REFERENCE = math.log(5000.0)
# Bounds of the per-bin sigma of the p(z) head, in bin widths.
_LOG_SIGMA_MIN = math.log(0.02)
_LOG_SIGMA_MAX = math.log(20.0)
# Smallest flux scale accepted by the normalisation before falling back.
_MIN_SCALE = 1e-12
TEMPLATES_NAME = "templates.safetensors"
ARCHETYPES_NAME = "archetypes.safetensors"
# from_pretrained keywords that locate files in a folder or Hub repo (passed on to `cached_file`)
_FILE_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


# ----------------------------------------------------------------------------------------------------------------
# Input preparation
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SpecPTSpectra:
    """Validated, normalised spectra as the layers see them.

    Attributes:
        flux: [batch, pixels] flux / scale, 0 at bad pixels.
        ivar: [batch, pixels] ivar * scale**2, 0 at bad pixels (1 at good pixels when no ivar was given).
        good: [batch, pixels] bool, True = good pixel.
        scale: [batch] per-spectrum normalisation (flux units).
        wavelength: [1 or batch, pixels] pixel wavelengths, Angstrom.
    """

    flux: torch.Tensor
    ivar: torch.Tensor
    good: torch.Tensor
    scale: torch.Tensor
    wavelength: torch.Tensor


def _check_tensor(name: str, value: Any, shape: torch.Size | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
    if shape is not None and value.shape != shape:
        raise ValueError(f"`{name}` has shape {tuple(value.shape)} but `flux` has shape {tuple(shape)}")
    return value


def _default_wavelength(config: SpecPTConfig, pixels: int, device: torch.device) -> torch.Tensor:
    """The config's linear grid, [1, pixels] Angstrom."""
    index = torch.arange(pixels, device=device, dtype=torch.float64)
    return (config.wavelength_start + config.wavelength_step * index).float()[None]  # [1, pixels]


def _check_wavelength(wavelength: Any, batch: int, pixels: int) -> torch.Tensor:
    wavelength = _check_tensor("wavelength", wavelength)
    if wavelength.dim() == 1:
        wavelength = wavelength[None]  # [1, pixels]
    if wavelength.dim() != 2 or wavelength.shape[-1] != pixels or wavelength.shape[0] not in (1, batch):
        raise ValueError(
            f"`wavelength` must be [pixels] or [batch, pixels] matching `flux` ({batch}, {pixels}), "
            f"got {tuple(wavelength.shape)}"
        )
    wavelength = wavelength.float()
    if not torch.isfinite(wavelength).all() or (wavelength <= 0).any():
        raise ValueError("`wavelength` must be finite and positive (Angstrom)")
    if pixels > 1 and (wavelength.diff(dim=-1) <= 0).any():
        raise ValueError("`wavelength` must increase strictly along the pixels")
    return wavelength


def _spectrum_scale(flux: torch.Tensor, good: torch.Tensor, normalization: str) -> torch.Tensor:
    """Per-spectrum scale [batch]: median |flux| over good pixels, else their mean |flux|, else 1."""
    ones = torch.ones(flux.shape[0], dtype=torch.float32, device=flux.device)
    if normalization == "none":
        return ones
    absolute = flux.float().abs()  # [batch, pixels]
    median = torch.where(good, absolute, torch.nan).nanmedian(dim=1).values  # [batch]
    mean = torch.where(good, absolute, 0.0).sum(dim=1) / good.sum(dim=1).clamp(min=1)  # [batch]
    scale = torch.where(median > _MIN_SCALE, median, mean)
    return torch.where(scale > _MIN_SCALE, scale, ones)


def prepare_spectra(
    config: SpecPTConfig,
    flux: torch.Tensor,
    ivar: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    wavelength: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> SpecPTSpectra:
    """Validate the inputs, find the good pixels, normalise each spectrum and zero its bad pixels.

    Raises:
        ValueError: naming the argument, for a wrong pixel count, mismatched shapes, non-finite flux at a good
            pixel, negative ivar, or a spectrum without any good pixel.
    """
    flux = _check_tensor("flux", flux)
    if flux.dim() != 2 or not flux.is_floating_point():
        raise ValueError(
            f"`flux` must be a float tensor [batch, pixels], got {flux.dtype} {tuple(flux.shape)}"
        )
    batch, pixels = flux.shape
    if wavelength is None:
        if pixels != config.num_pixels:
            raise ValueError(
                f"`flux` has {pixels} pixels but the model's grid has config.num_pixels={config.num_pixels} "
                f"(pass `wavelength` to use another grid with the `tokens` layout)"
            )
        wavelength = _default_wavelength(config, pixels, flux.device)
    else:
        wavelength = _check_wavelength(wavelength, batch, pixels).to(flux.device)
        if config.layout == "paper" and pixels != config.num_pixels:
            raise ValueError(
                f"`flux` has {pixels} pixels; the `paper` layout reads exactly config.num_pixels={config.num_pixels}"
            )

    good = torch.ones_like(flux, dtype=torch.bool)  # [batch, pixels]
    if mask is not None:
        mask = _check_tensor("mask", mask, flux.shape)
        if mask.is_floating_point() or mask.is_complex():
            raise ValueError(f"`mask` must be bool (True = bad pixel), got {mask.dtype}")
        good = good & ~mask.bool()
    if ivar is not None:
        ivar = _check_tensor("ivar", ivar, flux.shape)
        if not ivar.is_floating_point():
            raise ValueError(f"`ivar` must be a float tensor, got {ivar.dtype}")
        if (ivar < 0).any():
            raise ValueError(
                f"`ivar` has {int((ivar < 0).sum())} negative values; inverse variances must be >= 0"
            )
        good = good & torch.isfinite(ivar) & (ivar > 0)

    bad_flux = good & ~torch.isfinite(flux)
    if bad_flux.any():
        row, pixel = (int(i) for i in bad_flux.nonzero()[0])
        raise ValueError(
            f"`flux` has {int(bad_flux.sum())} NaN/inf values at good pixels (first: spectrum {row}, pixel {pixel}); "
            "mark them bad with `mask` or ivar = 0"
        )
    empty = ~good.any(dim=1)  # [batch]
    if empty.any():
        rows = empty.nonzero()[:, 0].tolist()
        raise ValueError(f"`flux`: spectra {rows[:10]} have no good pixel (mask set or ivar == 0 everywhere)")

    scale = _spectrum_scale(flux, good, config.normalization)  # [batch]
    flux_n = torch.where(good, flux.float() / scale[:, None], 0.0)  # [batch, pixels]
    # [batch, pixels]; unit weights at good pixels when no ivar is given
    ivar_n = good.float() if ivar is None else torch.where(good, ivar.float() * scale[:, None] ** 2, 0.0)
    return SpecPTSpectra(flux_n.to(dtype), ivar_n.to(dtype), good, scale, wavelength)


def paper_flat_length(config: SpecPTConfig) -> int:
    """Length of the `paper` conv stack output (per channel): 7781 -> 3891 -> 1946 -> 973 -> pool 487."""
    length = config.num_pixels
    for kernel in config.paper_conv_kernels:
        length = (length + 2 * (kernel // 2) - kernel) // 2 + 1
    return (length + 2 - 3) // 2 + 1


def num_tokens(config: SpecPTConfig, pixels: int | None = None) -> int:
    """Tokens the backbone makes of `pixels` (default `config.num_pixels`) pixels."""
    if config.layout == "paper":
        return 1
    return math.ceil((config.num_pixels if pixels is None else pixels) / config.patch_size)


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


class SpecPTWavelengthEncoding(nn.Module):
    """Sinusoidal features of ln(wavelength) -> Linear -> d_model, so the weights do not depend on one grid."""

    def __init__(self, config: SpecPTConfig) -> None:
        super().__init__()
        self.num_frequencies = config.num_position_frequencies
        self.register_buffer("frequencies", self.default_frequencies(self.num_frequencies), persistent=False)
        self.projection = nn.Linear(2 * self.num_frequencies, config.d_model)
        self.projection.fan_in_init = True  # an input embedding: unit-scale outputs at init

    @staticmethod
    def default_frequencies(num_frequencies: int) -> torch.Tensor:
        """Angular frequencies [num_frequencies] in radians per unit of ln(wavelength), geometric in period."""
        periods = torch.logspace(
            math.log10(_POSITION_MAX_PERIOD),
            math.log10(_POSITION_MIN_PERIOD),
            num_frequencies,
            dtype=torch.float64,
        )
        return (2 * math.pi / periods).float()

    def forward(self, wavelength: torch.Tensor) -> torch.Tensor:
        log_wavelength = torch.log(wavelength.float()) - _LOG_WAVELENGTH_REFERENCE  # [..., tokens]
        phase = log_wavelength[..., None] * self.frequencies  # [..., tokens, frequencies]
        features = torch.cat([phase.sin(), phase.cos()], dim=-1)  # [..., tokens, 2 * frequencies]
        return self.projection(features.to(self.projection.weight.dtype))  # [..., tokens, d_model]


class SpecPTTokenStem(nn.Module):
    """`tokens` layout: pixels -> conv -> one token per `patch_size` pixels, plus wavelength features."""

    def __init__(self, config: SpecPTConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.use_ivar_feature = config.use_ivar_feature
        in_channels = 3 if config.use_ivar_feature else 2  # flux, good flag (, log(1 + sqrt(ivar)))
        kernel = config.stem_kernel_size
        self.conv = nn.Conv1d(in_channels, config.stem_channels, kernel, padding=kernel // 2)
        self.activation = nn.GELU()
        self.patch = nn.Conv1d(
            config.stem_channels, config.d_model, config.patch_size, stride=config.patch_size
        )
        self.position = SpecPTWavelengthEncoding(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, spectra: SpecPTSpectra) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns tokens [batch, tokens, d_model], padding [batch, tokens] (True = no good pixel) and the
        central wavelength of each token [1 or batch, tokens]."""
        batch, pixels = spectra.flux.shape
        tokens = math.ceil(pixels / self.patch_size)
        pad = tokens * self.patch_size - pixels
        good = F.pad(spectra.good.to(spectra.flux.dtype), (0, pad))  # [batch, tokens * patch]; pad = bad
        channels = [F.pad(spectra.flux, (0, pad)), good]
        if self.use_ivar_feature:
            channels.append(torch.log1p(F.pad(spectra.ivar, (0, pad)).sqrt()))
        x = torch.stack(channels, dim=1)  # [batch, channels, tokens * patch]
        x = self.patch(self.activation(self.conv(x)))  # [batch, d_model, tokens]
        x = x.transpose(1, 2)  # [batch, tokens, d_model]

        wavelength = spectra.wavelength  # [1 or batch, pixels]
        if pad:
            step = wavelength[:, -1:] - wavelength[:, -2:-1] if pixels > 1 else torch.ones_like(wavelength)
            extra = wavelength[:, -1:] + step * torch.arange(1, pad + 1, device=wavelength.device)  # [., pad]
            wavelength = torch.cat([wavelength, extra], dim=1)  # [1 or batch, tokens * patch]
        token_wavelength = wavelength.view(wavelength.shape[0], tokens, self.patch_size).mean(
            -1
        )  # [., tokens]

        x = self.dropout(x + self.position(token_wavelength))  # [batch, tokens, d_model]
        padding = good.view(batch, tokens, self.patch_size).sum(-1) == 0  # [batch, tokens]
        return x, padding, token_wavelength


class SpecPTPaperConvBlock(nn.Module):
    """Conv1d (stride 2) -> BatchNorm -> ReLU, as in the published stem."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=2, padding=kernel_size // 2)
        self.norm = nn.BatchNorm1d(out_channels)
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.norm(self.conv(x)))  # [batch, out_channels, length / 2]


class SpecPTPaperStem(nn.Module):
    """`paper` layout: conv stack + max-pool, flatten, Linear -> ONE d_model token per spectrum."""

    def __init__(self, config: SpecPTConfig) -> None:
        super().__init__()
        in_channels = [1, *config.paper_conv_channels[:-1]]
        self.blocks = nn.ModuleList(
            SpecPTPaperConvBlock(c_in, c_out, k)
            for c_in, c_out, k in zip(
                in_channels, config.paper_conv_channels, config.paper_conv_kernels, strict=True
            )
        )
        self.pool = nn.MaxPool1d(kernel_size=3, stride=2, padding=1)
        self.projection = nn.Linear(
            config.paper_conv_channels[-1] * paper_flat_length(config), config.d_model
        )
        self.projection.fan_in_init = True  # an input embedding: unit-scale outputs at init

    def forward(self, spectra: SpecPTSpectra) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = spectra.flux.shape[0]
        x = spectra.flux[:, None]  # [batch, 1, pixels]
        for block in self.blocks:
            x = block(x)  # [batch, channels, length]
        x = self.pool(x).flatten(1)  # [batch, channels * pooled_length]
        x = self.projection(x)[:, None]  # [batch, 1, d_model]
        padding = torch.zeros(batch, 1, dtype=torch.bool, device=x.device)  # [batch, 1]
        token_wavelength = spectra.wavelength.mean(-1, keepdim=True)  # [1 or batch, 1]
        return x, padding, token_wavelength


# ----------------------------------------------------------------------------------------------------------------
# Attention and transformer layers
# ----------------------------------------------------------------------------------------------------------------


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention in plain torch operations. `query` [batch, heads, queries, head_dim], `key` and `value`
    [batch, heads, keys, head_dim], `attention_mask` additive [batch, 1, queries, keys] (0, or the dtype's minimum
    where a key is ignored). Returns the output [batch, queries, heads, head_dim] and the weights [batch, heads,
    queries, keys]."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # [batch, heads, queries, keys]
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # [batch, queries, heads, head_dim]
    return output, weights


def key_padding_mask(
    config: SpecPTConfig, query: torch.Tensor, padding: torch.Tensor, context: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The attention mask of `config._attn_implementation` for `query` [batch, queries, d_model] attending over
    tokens (`context` [batch, tokens, d_model], or `query` itself) whose `padding` [batch, tokens] is True where a
    token is ignored. None when nothing is ignored and the implementation needs no mask."""
    return create_bidirectional_mask(config, query, ~padding, encoder_hidden_states=context)


class SpecPTAttention(nn.Module):
    """Multi-head attention of `hidden` over `context` (default: `hidden` itself) with separate q/k/v/out
    projections, computed by `config._attn_implementation` ("eager" or "sdpa"). Checkpoints of torch's
    `nn.MultiheadAttention` (a packed `in_proj_weight`) load through `convert_legacy_state_dict`."""

    def __init__(self, config: SpecPTConfig, dropout: float = 0.0) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_heads
        self.head_dim = config.d_model // config.num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = dropout
        self.is_causal = False  # read by the sdpa implementation
        self.q_proj = nn.Linear(config.d_model, config.d_model)
        self.k_proj = nn.Linear(config.d_model, config.d_model)
        self.v_proj = nn.Linear(config.d_model, config.d_model)
        self.out_proj = nn.Linear(config.d_model, config.d_model)

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the attended states [batch, queries, d_model] and the attention weights [batch, heads, queries,
        keys] (None except with the eager implementation)."""
        context = hidden if context is None else context
        batch, queries = hidden.shape[:2]
        split_heads = (batch, -1, self.num_heads, self.head_dim)
        query = self.q_proj(hidden).view(split_heads).transpose(1, 2)  # [batch, heads, queries, head_dim]
        key = self.k_proj(context).view(split_heads).transpose(1, 2)  # [batch, heads, keys, head_dim]
        value = self.v_proj(context).view(split_heads).transpose(1, 2)  # [batch, heads, keys, head_dim]
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=self.dropout if self.training else 0.0,
        )  # [batch, queries, heads, head_dim]
        return self.out_proj(output.reshape(batch, queries, -1)), weights  # [batch, queries, d_model]


class SpecPTFeedForward(nn.Module):
    """Linear -> activation (GELU; ReLU in the `paper` layout) -> dropout -> Linear."""

    def __init__(self, config: SpecPTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.ffn_dim)
        self.activation = nn.ReLU() if config.layout == "paper" else nn.GELU()
        self.dropout = nn.Dropout(config.dropout)
        self.fc2 = nn.Linear(config.ffn_dim, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.activation(self.fc1(x))))  # [batch, tokens, d_model]


class SpecPTEncoderLayer(GradientCheckpointingLayer):
    """Self-attention + feed-forward, each with dropout on its output and a residual: pre-norm with GELU
    (`tokens` layout) or the published post-norm with ReLU (`paper`)."""

    def __init__(self, config: SpecPTConfig) -> None:
        super().__init__()
        self.norm_first = config.layout == "tokens"
        self.self_attn = SpecPTAttention(config, dropout=config.dropout)
        self.layer_norm1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = SpecPTFeedForward(config)
        self.layer_norm2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`hidden` [batch, tokens, d_model] -> [batch, tokens, d_model]; `attention_mask` from `key_padding_mask`."""
        if self.norm_first:
            hidden = hidden + self.dropout(self.self_attn(self.layer_norm1(hidden), attention_mask)[0])
            return hidden + self.dropout(self.mlp(self.layer_norm2(hidden)))
        hidden = self.layer_norm1(hidden + self.dropout(self.self_attn(hidden, attention_mask)[0]))
        return self.layer_norm2(hidden + self.dropout(self.mlp(hidden)))


class SpecPTDecoderLayer(GradientCheckpointingLayer):
    """The published post-norm decoder layer (`paper` layout): self-attention, attention over `context`, ReLU
    feed-forward, each followed by dropout, a residual and a LayerNorm."""

    def __init__(self, config: SpecPTConfig) -> None:
        super().__init__()
        self.self_attn = SpecPTAttention(config, dropout=config.dropout)
        self.layer_norm1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.cross_attn = SpecPTAttention(config, dropout=config.dropout)
        self.layer_norm2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = SpecPTFeedForward(config)
        self.layer_norm3 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """`hidden` [batch, queries, d_model] attending over `context` [batch, tokens, d_model] (no padding)."""
        hidden = self.layer_norm1(hidden + self.dropout(self.self_attn(hidden)[0]))
        hidden = self.layer_norm2(hidden + self.dropout(self.cross_attn(hidden, context=context)[0]))
        return self.layer_norm3(hidden + self.dropout(self.mlp(hidden)))  # [batch, queries, d_model]


class SpecPTEncoder(nn.Module):
    """A stack of encoder layers attending across the tokens of ONE spectrum (tokens without good pixels are
    ignored as keys), then a final LayerNorm in the `tokens` layout."""

    def __init__(self, config: SpecPTConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(SpecPTEncoderLayer(config) for _ in range(config.num_layers))
        self.norm = (
            nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.layout == "tokens" else None
        )

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        attention_mask = key_padding_mask(self.config, x, padding)  # [batch, 1, tokens, tokens]
        for layer in self.layers:
            x = layer(x, attention_mask)  # [batch, tokens, d_model]
        return x if self.norm is None else self.norm(x)


class SpecPTAttentionPooling(nn.Module):
    """A learned query attends over the good tokens of each spectrum -> one vector per spectrum."""

    def __init__(self, config: SpecPTConfig) -> None:
        super().__init__()
        self.config = config
        self.query = nn.Parameter(torch.empty(1, 1, config.d_model))
        self.attention = SpecPTAttention(config)
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        query = self.query.expand(hidden.shape[0], -1, -1)  # [batch, 1, d_model]
        attention_mask = key_padding_mask(self.config, query, padding, hidden)  # [batch, 1, 1, tokens]
        pooled, _ = self.attention(query, attention_mask, hidden)  # [batch, 1, d_model]
        return self.norm(pooled[:, 0])  # [batch, d_model]


def masked_mean(hidden: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens that are not padding: [batch, tokens, d] -> [batch, d]."""
    weight = (~padding).to(hidden.dtype)[..., None]  # [batch, tokens, 1]
    return (hidden * weight).sum(1) / weight.sum(1).clamp(min=1)


class SpecPTPooledDecoder(nn.Module):
    """`tokens` layout decoder: rebuilds every pixel from the pooled embedding alone (a bottleneck, so the
    embedding must hold the spectrum). Queries = wavelength features of each token + the projected embedding;
    a few pre-norm transformer layers; a Linear un-patches each token into `patch_size` pixels."""

    def __init__(self, config: SpecPTConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.position = SpecPTWavelengthEncoding(config)
        self.latent = nn.Linear(config.d_model, config.d_model)
        self.layers = nn.ModuleList(SpecPTEncoderLayer(config) for _ in range(config.num_decoder_layers))
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.unpatch = nn.Linear(config.d_model, config.patch_size)

    def forward(self, pooled: torch.Tensor, token_wavelength: torch.Tensor, pixels: int) -> torch.Tensor:
        x = self.position(token_wavelength) + self.latent(pooled)[:, None]  # [batch, tokens, d_model]
        for layer in self.layers:
            x = layer(x)  # [batch, tokens, d_model]
        x = self.unpatch(self.norm(x))  # [batch, tokens, patch]
        return x.flatten(1)[:, :pixels]  # [batch, pixels]


class SpecPTPaperDecoder(nn.Module):
    """`paper` layout decoder: transformer decoder layers (queries and context = the encoder token), then
    Linear d_model -> flat features -> ReLU -> Linear -> pixels (the published ~1 B-parameter dense decoder)."""

    def __init__(self, config: SpecPTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SpecPTDecoderLayer(config) for _ in range(config.num_decoder_layers))
        flat = config.paper_conv_channels[-1] * paper_flat_length(config)
        self.expand = nn.Linear(config.d_model, flat)
        self.activation = nn.ReLU()
        self.output = nn.Linear(flat, config.num_pixels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden  # [batch, 1, d_model]
        for layer in self.layers:
            x = layer(x, hidden)  # [batch, 1, d_model]
        return self.output(self.activation(self.expand(x[:, 0])))  # [batch, pixels]


class SpecPTResidualBlock(nn.Module):
    """x -> act(LayerNorm(x + Linear(dropout(act(Linear(x)))))): the published head's residual MLP block."""

    def __init__(
        self, d_model: int, hidden: int, dropout: float, activation: type[nn.Module], eps: float
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)
        self.activation = activation()
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(self.dropout(self.activation(self.fc1(x))))  # [batch, d_model]
        return self.activation(self.norm(x + h))  # [batch, d_model]


class SpecPTRedshiftPzHead(nn.Module):
    """p(z) head: backbone embedding + the head's own attention pooling over the tokens (a query learned for
    redshift) -> residual MLP blocks -> per bin (logit, offset,
    log-sigma). Bins are uniform in u = ln(1 + z) on [ln(1 + z_min), ln(1 + z_max)]; offsets are bounded to
    +-`redshift_offset_bound` bin widths (tanh), sigma to [0.02, 20] bin widths (sigmoid in log space)."""

    def __init__(self, config: SpecPTForRedshiftConfig) -> None:
        super().__init__()
        self.num_bins = config.num_redshift_bins
        self.offset_bound = config.redshift_offset_bound
        self.pooling = SpecPTAttentionPooling(config)
        self.blocks = nn.ModuleList(
            SpecPTResidualBlock(
                config.d_model, config.head_hidden_size, config.head_dropout, nn.GELU, config.layer_norm_eps
            )
            for _ in range(config.head_num_blocks)
        )
        self.output = nn.Linear(config.d_model, 3 * config.num_redshift_bins)

    def forward(
        self, hidden: torch.Tensor, padding: torch.Tensor, pooled: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Returns embedding [batch, d_model], logits, offsets and log_sigma [batch, bins] (bin-width units)."""
        x = pooled + self.pooling(hidden, padding)  # [batch, d_model]
        for block in self.blocks:
            x = block(x)  # [batch, d_model]
        raw = self.output(x).view(x.shape[0], 3, self.num_bins).float()  # [batch, 3, bins]
        offsets = self.offset_bound * torch.tanh(raw[:, 1])  # [batch, bins]
        log_sigma = _LOG_SIGMA_MIN + (_LOG_SIGMA_MAX - _LOG_SIGMA_MIN) * torch.sigmoid(
            raw[:, 2]
        )  # [batch, bins]
        return x, raw[:, 0], offsets, log_sigma


class SpecPTPaperRedshiftHead(nn.Module):
    """The published head, with attention acting WITHIN each spectrum: the pooled embedding queries the
    spectrum's own tokens (for the `paper` layout: its single token), residual add, `head_num_blocks` residual
    MLP blocks (Swish), Linear -> head_hidden_size // 2 -> Swish -> Linear -> 1 -> Softplus (+ z_min)."""

    def __init__(self, config: SpecPTForRedshiftConfig) -> None:
        super().__init__()
        self.config = config
        self.z_min = config.z_min
        self.attention = SpecPTAttention(config)
        self.blocks = nn.ModuleList(
            SpecPTResidualBlock(
                config.d_model, config.head_hidden_size, config.head_dropout, nn.SiLU, config.layer_norm_eps
            )
            for _ in range(config.head_num_blocks)
        )
        self.fc = nn.Linear(config.d_model, config.head_hidden_size // 2)
        self.activation = nn.SiLU()
        self.output = nn.Linear(config.head_hidden_size // 2, 1)

    def forward(
        self, hidden: torch.Tensor, padding: torch.Tensor, pooled: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns embedding [batch, d_model] and redshift [batch]."""
        query = pooled[:, None]  # [batch, 1, d_model]
        attention_mask = key_padding_mask(self.config, query, padding, hidden)  # [batch, 1, 1, tokens]
        attended, _ = self.attention(query, attention_mask, hidden)  # [batch, 1, d_model]
        x = pooled + attended[:, 0]  # [batch, d_model]
        for block in self.blocks:
            x = block(x)  # [batch, d_model]
        z = F.softplus(self.output(self.activation(self.fc(x)))).squeeze(-1)  # [batch]
        return x, z.float() + self.z_min


# ----------------------------------------------------------------------------------------------------------------
# Pretrained model base
# ----------------------------------------------------------------------------------------------------------------


def group_names(names: Iterable[str]) -> str:
    """'specpt.encoder (24), head (12)': tensor names counted by their first two name parts."""
    counts = Counter(".".join(name.split(".")[:2]) for name in names)
    return ", ".join(f"{group} ({n})" for group, n in sorted(counts.items())) or "none"


# Weight names of torch's transformer modules (`nn.TransformerEncoderLayer`, `nn.TransformerDecoderLayer`) inside
# the `layers.<i>` of an encoder or decoder, and the names of the same weights in this file's layers.
_LEGACY_LAYER_NAMES = (
    (re.compile(r"((?:^|\.)layers\.\d+)\.linear([12])\."), r"\1.mlp.fc\2."),
    (re.compile(r"((?:^|\.)layers\.\d+)\.norm([123])\."), r"\1.layer_norm\2."),
    (re.compile(r"((?:^|\.)layers\.\d+)\.multihead_attn\."), r"\1.cross_attn."),
)
_PACKED_PROJECTIONS = ("in_proj_weight", "in_proj_bias")


def _is_legacy_key(key: str) -> bool:
    """Whether a weight name belongs to the layout `convert_legacy_state_dict` converts."""
    return key.rpartition(".")[2] in _PACKED_PROJECTIONS or any(
        pattern.search(key) for pattern, _ in _LEGACY_LAYER_NAMES
    )


def convert_legacy_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the weights of a checkpoint written with torch's transformer modules to this file's layers.

    Every packed `<attention>.in_proj_weight` [3 d_model, d_model] / `in_proj_bias` [3 d_model] of an
    `nn.MultiheadAttention` splits into `<attention>.q_proj`, `.k_proj`, `.v_proj` (`out_proj` keeps its name);
    inside `layers.<i>`: `linear1/2` -> `mlp.fc1/2`, `norm1/2/3` -> `layer_norm1/2/3`, `multihead_attn` ->
    `cross_attn`. Other keys (and a state dict already in this layout) pass unchanged. `from_pretrained` and
    `load_state_dict` apply it to the weights they load."""
    converted = {}
    for key, tensor in state_dict.items():
        for pattern, replacement in _LEGACY_LAYER_NAMES:
            key = pattern.sub(replacement, key)
        module, dot, name = key.rpartition(".")
        if name not in _PACKED_PROJECTIONS:
            converted[key] = tensor
            continue
        kind = name.removeprefix("in_proj_")  # weight or bias
        for projection, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3), strict=True):
            converted[f"{module}{dot}{projection}.{kind}"] = part.clone()  # [d_model(, d_model)]
    return converted


def _convert_legacy_keys(state_dict: dict[str, torch.Tensor], *args: Any) -> None:
    """`load_state_dict` pre-hook: converts a legacy state dict in place."""
    if any(_is_legacy_key(key) for key in state_dict):
        converted = convert_legacy_state_dict(state_dict)
        state_dict.clear()
        state_dict.update(converted)


def _holds_legacy_keys(checkpoint_files: list[str]) -> bool:
    """Whether any of the safetensors `checkpoint_files` holds weights in the legacy layout."""
    for file in checkpoint_files:
        if file.endswith(".safetensors"):
            with safe_open(file, framework="pt") as weights:
                names = weights.keys()
            if any(_is_legacy_key(name) for name in names):
                return True
    return False


class SpecPTPreTrainedModel(PreTrainedModel):
    """Weight initialisation, loading (also of checkpoints in the legacy layout, see
    `convert_legacy_state_dict`) and the shared class attributes of all SpecPT models."""

    config_class = SpecPTConfig
    base_model_prefix = "specpt"
    main_input_name = "flux"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["SpecPTEncoderLayer", "SpecPTDecoderLayer"]
    # `output_hidden_states` / `output_attentions` of SpecPTModel: the backbone encoder's layers only
    _can_record_outputs = {
        "hidden_states": OutputRecorder(SpecPTEncoderLayer, layer_name="encoder"),
        "attentions": OutputRecorder(SpecPTAttention, index=1, layer_name="encoder"),
    }

    def __init__(self, config: SpecPTConfig, *inputs: Any, **kwargs: Any) -> None:
        super().__init__(config, *inputs, **kwargs)
        self._register_load_state_dict_pre_hook(_convert_legacy_keys)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Every parameter and buffer (also used when transformers builds the model on the meta device and fills in
        what a checkpoint lacks). Weight matrices: normal with std `config.initializer_range`; the input
        embeddings (convolutions, wavelength and flatten projections) instead get std 1/sqrt(fan_in), so that
        tokens start at unit scale whatever the kernel and channel counts; norms: 1 and 0; BatchNorm statistics
        reset; the learned pooling query: normal(initializer_range); wavelength frequencies recomputed."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            if isinstance(module, nn.Conv1d) or getattr(module, "fan_in_init", False):
                fan_in = module.weight[0].numel()
                init.normal_(module.weight, mean=0.0, std=1.0 / math.sqrt(fan_in))
            else:
                init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm1d)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm1d):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, SpecPTAttentionPooling):
            init.normal_(module.query, mean=0.0, std=std)
        elif isinstance(module, SpecPTWavelengthEncoding):
            init.copy_(module.frequencies, module.default_frequencies(module.num_frequencies))

    def _after_loading(self) -> None:
        """Hook run at the end of `from_pretrained` (the redshift model re-applies `freeze_encoder` here)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
        """`PreTrainedModel.from_pretrained` (safetensors only) that also logs which weight groups were loaded,
        newly initialised, or left unused, e.g. when a redshift model starts from an autoencoder checkpoint:

            SpecPTForRedshift from ae/: loaded 39 tensors [specpt.encoder (26), specpt.pooler (7), specpt.stem (6)];
            newly initialised 21 [head.blocks (12), head.output (2), head.pooling (7)]; unused in the checkpoint
            20 [decoder.latent (2), decoder.layers (12), ...]

        (one line; transformers' own per-key table comes before it). The summary is a warning when anything is
        missing or unused, info otherwise. `output_loading_info=True` returns `(model, loading_info)` as usual."""
        output_loading_info = kwargs.pop("output_loading_info", False)
        kwargs.setdefault("use_safetensors", True)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        missing = set(loading_info["missing_keys"]) | {key for key, *_ in loading_info["mismatched_keys"]}
        unexpected = set(loading_info["unexpected_keys"])
        loaded = set(model.state_dict()) - missing
        message = (
            f"{cls.__name__} from {pretrained_model_name_or_path}: loaded {len(loaded)} tensors "
            f"[{group_names(loaded)}]; newly initialised {len(missing)} [{group_names(missing)}]; "
            f"unused in the checkpoint {len(unexpected)} [{group_names(unexpected)}]"
        )
        (logger.warning if missing or unexpected else logger.info)(message)
        model._after_loading()
        return (model, loading_info) if output_loading_info else model

    @staticmethod
    def _load_pretrained_model(
        model: PreTrainedModel,
        state_dict: dict | None,
        checkpoint_files: list[str] | None,
        load_config: Any,
        expected_keys: list[str] | None = None,
    ) -> Any:
        """`from_pretrained`'s weight loading, given the checkpoint converted by `convert_legacy_state_dict` when
        it is in the legacy layout."""
        if state_dict is None and checkpoint_files and _holds_legacy_keys(checkpoint_files):
            state_dict = {}
            for file in checkpoint_files:
                state_dict.update(load_file(file))
        if state_dict is not None:
            state_dict = convert_legacy_state_dict(state_dict)
        return PreTrainedModel._load_pretrained_model(
            model, state_dict, checkpoint_files, load_config, expected_keys
        )

    def _encode(
        self,
        flux: torch.Tensor,
        ivar: torch.Tensor | None,
        mask: torch.Tensor | None,
        wavelength: torch.Tensor | None,
        output_attentions: bool | None,
        output_hidden_states: bool | None,
    ) -> SpecPTModelOutput:
        """The backbone's output for a task model (`output_*` default to the config's)."""
        config = self.config
        return self.specpt(
            flux,
            ivar=ivar,
            mask=mask,
            wavelength=wavelength,
            output_attentions=config.output_attentions if output_attentions is None else output_attentions,
            output_hidden_states=(
                config.output_hidden_states if output_hidden_states is None else output_hidden_states
            ),
            return_dict=True,
        )


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SpecPTModelOutput(ModelOutput):
    """Output of [`SpecPTModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch, tokens, d_model)`):
            Token states after the encoder (`paper` layout: one token).
        pooled (`torch.FloatTensor` of shape `(batch, d_model)`):
            One embedding per spectrum (attention or mean pooling over good tokens; `paper`: the single token).
        token_padding_mask (`torch.BoolTensor` of shape `(batch, tokens)`):
            True where a token holds no good pixel (ignored by attention and pooling).
        token_wavelength (`torch.FloatTensor` of shape `(batch, tokens)`):
            Central wavelength of each token, Angstrom.
        scale (`torch.FloatTensor` of shape `(batch,)`):
            The per-spectrum normalisation the flux was divided by.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned with `output_hidden_states=True`):
            The backbone encoder's input (the stem's tokens) and the output of each of its layers (before the final
            LayerNorm of the `tokens` layout), each of shape `(batch, tokens, d_model)`.
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned with `output_attentions=True`):
            The attention weights of each backbone encoder layer, `(batch, heads, tokens, tokens)` (eager attention
            only).
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooled: torch.FloatTensor | None = None
    token_padding_mask: torch.BoolTensor | None = None
    token_wavelength: torch.FloatTensor | None = None
    scale: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class SpecPTReconstructionOutput(ModelOutput):
    """Output of [`SpecPTForSpectrumReconstruction`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` are given):
            `chi2`: sum over good pixels of ivar * (reconstruction - labels / scale)^2 divided by the number of
            good pixels (normalised units); `l1`: mean |reconstruction - labels / scale| over good pixels.
        reconstruction (`torch.FloatTensor` of shape `(batch, pixels)`):
            Reconstructed flux in normalised units (multiply by `scale[:, None]` for flux units).
        scale (`torch.FloatTensor` of shape `(batch,)`):
            The per-spectrum normalisation.
        embedding (`torch.FloatTensor` of shape `(batch, d_model)`):
            The pooled embedding the reconstruction was decoded from.
        hidden_states, attentions: the backbone's (see [`SpecPTModelOutput`]).
    """

    loss: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    scale: torch.FloatTensor | None = None
    embedding: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class SpecPTRedshiftOutput(ModelOutput):
    """Output of [`SpecPTForRedshift`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` are given):
            `pz` head: cross-entropy of the true ln(1 + z) bin (soft with `redshift_label_sigma`) +
            `redshift_nll_weight` x Gaussian NLL (up to a constant, in bin widths) of the true in-bin residual
            under the TRUE bin's offset and sigma. Both act on du = dz / (1 + z).
            `paper` head: mean |z_pred - z| / (1 + z).
        redshift (`torch.FloatTensor` of shape `(batch,)`):
            Point estimate: centre of the most probable bin + its offset (`pz`), or the Softplus output (`paper`).
        redshift_err (`torch.FloatTensor` of shape `(batch,)`, *optional*):
            (1 + z) * sqrt(sigma_peak^2 + variance of p(u) within +-quality_window bins of the peak) (`pz` only).
        quality (`torch.FloatTensor` of shape `(batch,)`, *optional*):
            p(z) mass within +-quality_window bins of the peak, in [0, 1]; low values flag multi-modal or flat
            p(z) (`pz` only).
        logits (`torch.FloatTensor` of shape `(batch, bins)`, *optional*):
            p(z) logits over the ln(1 + z) bins (see [`SpecPTForRedshift.redshift_pdf`]).
        offsets (`torch.FloatTensor` of shape `(batch, bins)`, *optional*):
            Per-bin offset of the redshift from the bin centre, in bin widths.
        log_sigma (`torch.FloatTensor` of shape `(batch, bins)`, *optional*):
            Per-bin ln(sigma) of u = ln(1 + z), sigma in bin widths.
        embedding (`torch.FloatTensor` of shape `(batch, d_model)`):
            The head's per-spectrum representation the prediction is made from.
        spectype_logits (`torch.FloatTensor` of shape `(batch, types)`, *optional*):
            The type head's logits over `config.spectype_labels` (None without a type head).

        With template refinement (eval mode, templates present, `config.refinement` not `"none"`), `redshift` and
        `redshift_err` are the chi^2 fit's (parabola at the minimum, Delta chi^2 = 1) and these are set too:
        redshift_net, redshift_err_net (`(batch,)`): the network's own estimates.
        chi2 (`(batch,)`): best chi^2 over the spectrum's good pixels (outside the templates: model 0).
        delta_chi2 (`(batch,)`): chi^2 of the next local minimum at least 1000 km/s away (any template set) minus
            the best.
        chi2_smooth (`(batch,)`): chi^2 of a smooth continuum with no redshift on the same pixels (a Legendre
            series of degree 4 in ln(lambda)); a fit whose `chi2` does not beat it found no feature.
        coeff (`(batch, vectors)`): template coefficients of the best fit (zero-padded across template sets).
        spectype (`torch.LongTensor` of shape `(batch,)`): index of the winning set in `config.templates`.
        npixels_fit (`torch.LongTensor` of shape `(batch,)`): good pixels inside the winning templates' range.
        wide (`torch.BoolTensor` of shape `(batch,)`): whether the whole range's chi^2 minima joined the windows.
        chi2_scan_z, chi2_scan (`(batch, trials)`): the coarse chi^2(z) samples (redshift, chi^2; inf outside the
            windows searched).

        hidden_states, attentions: the backbone's (see [`SpecPTModelOutput`]).
    """

    loss: torch.FloatTensor | None = None
    redshift: torch.FloatTensor | None = None
    redshift_err: torch.FloatTensor | None = None
    quality: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    offsets: torch.FloatTensor | None = None
    log_sigma: torch.FloatTensor | None = None
    embedding: torch.FloatTensor | None = None
    spectype_logits: torch.FloatTensor | None = None
    redshift_net: torch.FloatTensor | None = None
    redshift_err_net: torch.FloatTensor | None = None
    chi2: torch.FloatTensor | None = None
    delta_chi2: torch.FloatTensor | None = None
    chi2_smooth: torch.FloatTensor | None = None
    coeff: torch.FloatTensor | None = None
    spectype: torch.LongTensor | None = None
    npixels_fit: torch.LongTensor | None = None
    wide: torch.BoolTensor | None = None
    chi2_scan_z: torch.FloatTensor | None = None
    chi2_scan: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


# ----------------------------------------------------------------------------------------------------------------
# Base model
# ----------------------------------------------------------------------------------------------------------------


class SpecPTModel(SpecPTPreTrainedModel):
    """The SpecPT backbone: input preparation, stem, transformer encoder and pooling.

    `forward(flux, ivar=None, mask=None, wavelength=None)`: `flux`, `ivar`, `mask` are [batch, pixels] (mask True
    = bad pixel); `wavelength` ([pixels] or [batch, pixels], Angstrom) replaces the config's grid (`tokens`
    layout only; the token positions are computed from it). `output_hidden_states=True` /
    `output_attentions=True` (default: the config's) add the encoder's states / attention weights to the output
    (the weights only with the eager attention).

    Every SpecPT model computes attention with `config._attn_implementation`: `"sdpa"` (the default) or
    `"eager"`, chosen with `from_pretrained(..., attn_implementation="eager")` or `model.set_attn_implementation`.
    """

    def __init__(self, config: SpecPTConfig) -> None:
        super().__init__(config)
        self.stem = SpecPTPaperStem(config) if config.layout == "paper" else SpecPTTokenStem(config)
        self.encoder = SpecPTEncoder(config)
        use_attention = config.layout == "tokens" and config.pooling == "attention"
        self.pooler = SpecPTAttentionPooling(config) if use_attention else None
        self.post_init()

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        flux: torch.Tensor,
        ivar: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        wavelength: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> SpecPTModelOutput:
        # `capture_outputs` collects the hidden states and attention weights (`_can_record_outputs`) and handles
        # `return_dict`
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        if output_attentions and self.config._attn_implementation != "eager":
            raise ValueError(
                f"`output_attentions=True` needs the eager attention, the model uses "
                f'{self.config._attn_implementation!r}: load it with `attn_implementation="eager"` or call '
                '`model.set_attn_implementation("eager")`'
            )
        spectra = prepare_spectra(self.config, flux, ivar, mask, wavelength, dtype=self.dtype)
        x, padding, token_wavelength = self.stem(
            spectra
        )  # [batch, tokens, d_model], [batch, tokens], [., tokens]
        hidden = self.encoder(x, padding)  # [batch, tokens, d_model]
        if self.pooler is not None:
            pooled = self.pooler(hidden, padding)  # [batch, d_model]
        elif self.config.layout == "paper":
            pooled = hidden[:, 0]  # [batch, d_model]
        else:
            pooled = masked_mean(hidden, padding)  # [batch, d_model]
        return SpecPTModelOutput(
            last_hidden_state=hidden,
            pooled=pooled,
            token_padding_mask=padding,
            token_wavelength=token_wavelength.expand(hidden.shape[0], -1),  # [batch, tokens]
            scale=spectra.scale,
        )


# ----------------------------------------------------------------------------------------------------------------
# Task models
# ----------------------------------------------------------------------------------------------------------------


def reconstruction_loss(
    reconstruction: torch.Tensor, target: torch.Tensor, ivar: torch.Tensor, good: torch.Tensor, kind: str
) -> torch.Tensor:
    """chi^2 per good pixel (ivar-weighted) or mean absolute error over good pixels; bad pixels weigh 0."""
    residual = torch.where(good, reconstruction.float() - target, 0.0)  # [batch, pixels]
    n_good = good.sum().clamp(min=1)
    if kind == "l1":
        return residual.abs().sum() / n_good
    return (ivar.float() * residual**2).sum() / n_good


class SpecPTForSpectrumReconstruction(SpecPTPreTrainedModel):
    """SpecPT autoencoder: backbone + decoder back to the pixels.

    `labels` is the target flux [batch, pixels] in the same units as `flux` (usually `labels=flux`); it is divided
    by the input's scale, and the loss uses the input's good pixels and ivar (`config.reconstruction_loss`).
    """

    def __init__(self, config: SpecPTConfig) -> None:
        super().__init__(config)
        self.specpt = SpecPTModel(config)
        self.decoder = SpecPTPaperDecoder(config) if config.layout == "paper" else SpecPTPooledDecoder(config)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        flux: torch.Tensor,
        ivar: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        wavelength: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> SpecPTReconstructionOutput:
        encoded = self._encode(flux, ivar, mask, wavelength, output_attentions, output_hidden_states)
        if self.config.layout == "paper":
            reconstruction = self.decoder(encoded.last_hidden_state)  # [batch, pixels]
        else:
            reconstruction = self.decoder(
                encoded.pooled, encoded.token_wavelength, flux.shape[1]
            )  # [batch, pixels]

        loss = None
        if labels is not None:
            labels = _check_tensor("labels", labels, flux.shape)
            spectra = prepare_spectra(self.config, flux, ivar, mask, wavelength)
            bad_labels = spectra.good & ~torch.isfinite(labels)
            if bad_labels.any():
                raise ValueError(f"`labels` has {int(bad_labels.sum())} NaN/inf values at good pixels")
            target = torch.where(
                spectra.good, labels.float() / spectra.scale[:, None], 0.0
            )  # [batch, pixels]
            loss = reconstruction_loss(
                reconstruction, target, spectra.ivar, spectra.good, self.config.reconstruction_loss
            )

        return SpecPTReconstructionOutput(
            loss=loss,
            reconstruction=reconstruction,
            scale=encoded.scale,
            embedding=encoded.pooled,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
        )


class SpecPTForRedshift(SpecPTPreTrainedModel):
    """SpecPT backbone + redshift head (`config.head_type`).

    `pz` head (default): p(z) over `num_redshift_bins` bins uniform in u = ln(1 + z) between `z_min` and `z_max`,
    each with an offset within the bin and a sigma. Prediction: the most probable bin's centre + its offset;
    `redshift_err` = (1 + z) * sqrt(sigma^2 + local p(u) variance); `quality` = p(z) mass within
    +-`quality_window` bins of the peak. `paper` head: the published head; redshift only.

    `labels` = true redshift [batch]; values outside [z_min, z_max] raise ValueError.
    `SpecPTForRedshift.from_pretrained(<autoencoder folder>)` loads the backbone (`specpt.*`), initialises the
    head and logs what was loaded; `freeze_encoder=True` (config) keeps the backbone fixed.
    """

    config_class = SpecPTForRedshiftConfig

    def __init__(self, config: SpecPTForRedshiftConfig) -> None:
        super().__init__(config)
        self.specpt = SpecPTModel(config)
        self.head = (
            SpecPTPaperRedshiftHead(config) if config.head_type == "paper" else SpecPTRedshiftPzHead(config)
        )
        labels = config.spectype_labels
        self.spectype_head = (
            nn.Linear(config.d_model, len(labels)) if labels and config.head_type == "pz" else None
        )
        self.templates: dict[str, RestFrameTemplates] | None = None
        self.archetypes: dict[str, RestFrameTemplates] | None = None
        self.post_init()
        self._after_loading()

    def embed(
        self,
        flux: torch.Tensor,
        ivar: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        wavelength: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The head's embedding [batch, d_model] of spectra [batch, pixels] (no refinement)."""
        encoded = self._encode(flux, ivar, mask, wavelength, False, False)
        return self.head(encoded.last_hidden_state, encoded.token_padding_mask, encoded.pooled)[0]

    def set_spectype_head(self, labels: list[str], weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Install a spectral-type head: logits = embedding @ weight.T + bias ([types, d_model], [types]) over
        `labels` (template set names), recorded in `config.spectype_labels`."""
        if weight.shape != (len(labels), self.config.d_model) or bias.shape != (len(labels),):
            raise ValueError(
                f"a type head over {labels} needs weight [{len(labels)}, {self.config.d_model}] and bias "
                f"[{len(labels)}], got {tuple(weight.shape)} and {tuple(bias.shape)}"
            )
        head = nn.Linear(self.config.d_model, len(labels)).to(self.device)
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(bias)
        self.spectype_head = head
        self.config.spectype_labels = list(labels)

    # --- templates ------------------------------------------------------------------------------------------------
    def set_templates(self, templates: dict[str, RestFrameTemplates] | None) -> None:
        """Attach rest-frame template sets by spectral type (e.g. GALAXY, QSO; None removes them) and describe
        them in `config.templates`; `save_pretrained` writes them to `templates.safetensors`."""
        self.templates = dict(templates) if templates else None
        self.config.templates = describe_templates(self.templates, TEMPLATES_NAME) if self.templates else None

    def set_archetypes(self, archetypes: dict[str, RestFrameTemplates] | None) -> None:
        """Attach archetypes by spectral type (whole rest-frame spectra, e.g. GALAXY, QSO; None removes them) that
        judge the refinement's fits over the whole range (`config.refinement_archetype_*`), described in
        `config.archetypes`; `save_pretrained` writes them to `archetypes.safetensors`."""
        self.archetypes = dict(archetypes) if archetypes else None
        self.config.archetypes = (
            describe_templates(self.archetypes, ARCHETYPES_NAME) if self.archetypes else None
        )

    @property
    def refines(self) -> bool:
        """Whether inference refines the redshift (templates present, `config.refinement` not `"none"`)."""
        return (
            self.templates is not None and self.config.refinement != "none" and self.config.head_type == "pz"
        )

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """`PreTrainedModel.save_pretrained`, plus `templates.safetensors` and `archetypes.safetensors` when the model
        has them (written first, so `push_to_hub=True` uploads them too)."""
        for name, sets in ((TEMPLATES_NAME, self.templates), (ARCHETYPES_NAME, self.archetypes)):
            if sets:
                Path(save_directory).mkdir(parents=True, exist_ok=True)
                save_templates(Path(save_directory) / name, sets)
        super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
        """`SpecPTPreTrainedModel.from_pretrained`, then the templates and archetypes `config.templates` and
        `config.archetypes` describe (a folder or repo without templates loads too, network-only, and says so)."""
        file_kwargs = {key: kwargs[key] for key in _FILE_KWARGS if key in kwargs}
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if not model.config.templates:
            logger.warning(
                f"{pretrained_model_name_or_path}: no rest-frame templates, so redshifts are the network's alone "
                "(no chi^2 refinement); add them with `specpt templates`"
            )
        model.templates = _load_described(
            pretrained_model_name_or_path, model.config.templates, "templates", file_kwargs
        )
        model.archetypes = _load_described(
            pretrained_model_name_or_path, model.config.archetypes, "archetypes", file_kwargs
        )
        return loaded

    # --- freezing -------------------------------------------------------------------------------------------------
    def _after_loading(self) -> None:
        if self.config.freeze_encoder:
            self.specpt.requires_grad_(False)
            self.specpt.eval()

    def train(self, mode: bool = True) -> SpecPTForRedshift:
        """Like `nn.Module.train`, but a frozen backbone stays in eval mode (dropout off, BatchNorm fixed)."""
        super().train(mode)
        if self.config.freeze_encoder:
            self.specpt.eval()
        return self

    # --- p(z) helpers ---------------------------------------------------------------------------------------------
    def redshift_bin_centers(self, device: torch.device | None = None) -> torch.Tensor:
        """Bin centres in u = ln(1 + z), [bins]."""
        u_min = math.log1p(self.config.z_min)
        index = torch.arange(self.config.num_redshift_bins, device=device, dtype=torch.float32)
        return u_min + (index + 0.5) * self.config.redshift_bin_width  # [bins]

    def _refinement_u_range(self) -> tuple[float, float]:
        return math.log1p(self.config.z_min), math.log1p(self.config.z_max)

    def _own_ranges(self) -> dict[str, tuple[float, float]]:
        """Template sets fitted over a range of their own for every spectrum: STAR over stellar velocities."""
        return {"STAR": star_range()} if self.templates and "STAR" in self.templates else {}

    def _scan_u(self, device: torch.device | None = None) -> torch.Tensor:
        """u = ln(1 + z) of the refinement's coarse chi^2 samples, float64 [grid]."""
        span = scan_span(self._refinement_u_range(), self._own_ranges())
        return scan_grid(self.templates, span, self.config.refinement_rebin).to(device)

    def chi2_scan_redshifts(self) -> torch.Tensor:
        """The redshifts of the refinement's coarse chi^2(z) samples (`chi2_scan_z` of every row), float64
        [trials]; needs templates."""
        if not self.templates:
            raise ValueError("the model has no rest-frame templates, so no chi^2(z) scan")
        return torch.expm1(self._scan_u())

    def redshift_pdf(self, logits: torch.Tensor, density: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn `logits` [batch, bins] into the p(z) grid.

        Returns:
            z [bins] (bin centres as redshifts) and either the probability of each bin [batch, bins] (sums to 1)
            or, with `density=True`, the density p(z) = P_bin / ((1 + z) * bin width in u) [batch, bins].
        """
        u = self.redshift_bin_centers(logits.device)  # [bins]
        probability = torch.softmax(logits.float(), dim=-1)  # [batch, bins]
        z = torch.expm1(u)  # [bins]
        if density:
            probability = probability / ((1.0 + z) * self.config.redshift_bin_width)  # [batch, bins]
        return z, probability

    def _predict_pz(
        self, logits: torch.Tensor, offsets: torch.Tensor, log_sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Redshift, redshift_err and quality [batch] from the p(z) outputs."""
        width = self.config.redshift_bin_width
        centers = self.redshift_bin_centers(logits.device)  # [bins]
        probability = torch.softmax(logits, dim=-1)  # [batch, bins]
        peak = probability.argmax(dim=-1, keepdim=True)  # [batch, 1]
        u_hat = centers[peak[:, 0]] + offsets.gather(1, peak)[:, 0] * width  # [batch]
        sigma = log_sigma.gather(1, peak)[:, 0].exp() * width  # [batch]
        index = torch.arange(self.config.num_redshift_bins, device=logits.device)  # [bins]
        window = (index[None] - peak).abs() <= self.config.quality_window  # [batch, bins]
        local = probability * window  # [batch, bins]
        quality = local.sum(-1)  # [batch]
        local_mean = (local * centers).sum(-1) / quality  # [batch]
        local_var = (local * (centers - local_mean[:, None]) ** 2).sum(-1) / quality  # [batch]
        redshift = torch.expm1(u_hat).clamp(self.config.z_min, self.config.z_max)  # [batch]
        redshift_err = (1.0 + redshift) * torch.sqrt(sigma**2 + local_var)  # [batch]
        return redshift, redshift_err, quality.clamp(0.0, 1.0)

    def _refine(
        self,
        flux: torch.Tensor,
        ivar: torch.Tensor | None,
        mask: torch.Tensor | None,
        wavelength: torch.Tensor | None,
        logits: torch.Tensor,
        offsets: torch.Tensor,
        quality: torch.Tensor,
        spectype_logits: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Template chi^2 refinement around the p(z) modes (and the whole range's minima for the `wide` spectra)."""
        config = self.config
        width = config.redshift_bin_width
        spectra = prepare_spectra(config, flux, ivar, mask, wavelength)  # float32, normalised
        centers = self.redshift_bin_centers(flux.device).double()  # [bins]
        peaks = pz_modes(
            torch.softmax(logits.float(), -1),
            config.refinement_modes,
            max(1, math.ceil(2 * config.refinement_window)),
        )  # [batch, modes]
        modes = centers[peaks] + offsets.float().gather(1, peaks).double() * width  # [batch, modes]
        settings = {
            "half_width": config.refinement_window * width,
            "u_range": self._refinement_u_range(),
            "own_ranges": self._own_ranges(),
            "coarse_vectors": config.refinement_coarse_vectors or None,
            "fine_smoothing_kms": config.refinement_smoothing_kms,
            "rebin": config.refinement_rebin,
            "fine_step": config.refinement_fine_step,
            "fine_trials": config.refinement_fine_trials,
        }
        settings["prior"] = self.pz_penalty(logits)  # [batch, grid] or None
        settings["set_prior"] = self._type_prior(spectype_logits)  # {set: [batch]} or None
        wide = torch.zeros_like(quality, dtype=torch.bool)  # [batch]
        # the whole range is searched by the sets without a range of their own (a STAR-only model has none)
        look_wide = config.refinement == "peaks+wide" and set(self.templates) > set(settings["own_ranges"])
        own = torch.tensor([name in settings["own_ranges"] for name in self.templates], device=flux.device)
        candidates = modes
        with torch.autocast(device_type=flux.device.type, enabled=False):
            if look_wide:
                aliases = line_aliases(modes[:, 0], config.refinement_alias_lines, settings["half_width"])
                candidates = torch.cat([modes, aliases], 1)  # [batch, modes + 2 x aliases]
                wide = quality < config.refinement_wide_quality
                candidates = self._add_wide_candidates(
                    candidates, wide.nonzero()[:, 0], spectra, logits, settings["set_prior"]
                )
            result = refine_redshifts(
                self.templates, spectra.wavelength, spectra.flux, spectra.ivar, candidates, **settings
            )
            if look_wide:
                doubtful = self._doubtful(result, spectra.good, modes, own, settings["half_width"])  # [batch]
                rows = (~wide & doubtful).nonzero()[:, 0]
                if len(rows):
                    result = self._rescan_wider(result, rows, spectra, candidates, settings, logits)
                    wide = wide.index_fill(0, rows, True)
            if self.archetypes:
                result = self._archetype_choice(result, spectra, settings, own)
        in_range = result.redshift.clamp(
            config.z_min, config.z_max
        )  # [batch]; STAR redshifts keep their sign
        return {
            "redshift": torch.where(own[result.spectype], result.redshift, in_range),
            "redshift_err": result.redshift_err,
            "chi2": result.chi2,
            "delta_chi2": result.delta_chi2,
            "chi2_smooth": smooth_chi2(spectra.wavelength, spectra.flux, spectra.ivar).float(),
            "coeff": result.coeff,
            "spectype": result.spectype,
            "npixels_fit": result.npixels,
            "wide": wide,
            "chi2_scan_z": torch.expm1(result.scan_u).float().expand(len(flux), -1),
            "chi2_scan": result.scan_chi2.float(),
        }

    def _doubtful(
        self,
        result: RefinementResult,
        good: torch.Tensor,
        modes: torch.Tensor,
        own: torch.Tensor,
        half_width: float,
    ) -> torch.Tensor:
        """[batch] bool: the fits to redo with the whole range's minima: a poor one (reduced chi^2 above
        `refinement_wide_chi2`; `good` [batch, pixels]), an ambiguous one (DELTACHI2 below
        `refinement_wide_delta_chi2`), or one won away from every p(z) mode (`modes` [batch, modes], u), at a line
        alias: the network misread the spectrum, so its windows cannot be trusted (not for a set with a range of
        its own, `own` [sets], e.g. STAR)."""
        config = self.config
        reduced_chi2 = result.chi2 / good.sum(1).clamp(min=1)  # [batch]
        distance = (torch.log1p(result.redshift.double())[:, None] - modes).abs().min(1).values  # [batch]
        at_alias = (distance > 2 * half_width) & ~own[result.spectype]  # [batch]
        poor = reduced_chi2 > config.refinement_wide_chi2
        return poor | (result.delta_chi2 < config.refinement_wide_delta_chi2) | at_alias

    def _wide_candidates(
        self,
        rows: torch.Tensor,
        spectra: SpecPTSpectra,
        logits: torch.Tensor,
        set_prior: dict[str, torch.Tensor] | None,
    ) -> torch.Tensor:
        """u [n, refinement_modes] of the lowest minima of a cheap chi^2 (+ the p(z) prior) over the whole
        redshift range for `rows` [n] ([`wide_candidates`]: `refinement_wide_rebin`, `refinement_wide_vectors`)."""
        config = self.config
        wave = rows_wavelength(spectra.wavelength, rows)
        sets = {name: t for name, t in self.templates.items() if name not in self._own_ranges()}
        prior = None if config.refinement_prior == 0 else lambda u: self.pz_penalty(logits[rows], u)
        return wide_candidates(
            sets,
            wave,
            spectra.flux[rows],
            spectra.ivar[rows],
            self._refinement_u_range(),
            modes=config.refinement_modes,
            separation=2 * config.refinement_window * config.redshift_bin_width,
            rebin=config.refinement_wide_rebin,
            vectors=config.refinement_wide_vectors or None,
            prior=prior,
            set_prior=None if set_prior is None else {k: v[rows] for k, v in set_prior.items()},
        )

    def _add_wide_candidates(
        self,
        candidates: torch.Tensor,
        rows: torch.Tensor,
        spectra: SpecPTSpectra,
        logits: torch.Tensor,
        set_prior: dict[str, torch.Tensor] | None,
    ) -> torch.Tensor:
        """`candidates` [batch, c] with the whole range's `modes` minima appended for `rows` [n] (the other rows
        repeat their first `modes`): [batch, c + modes]."""
        if len(rows) == 0:
            return candidates
        extra = candidates[:, : self.config.refinement_modes].clone()  # [batch, modes]
        extra[rows] = self._wide_candidates(rows, spectra, logits, set_prior).to(extra.dtype)
        return torch.cat([candidates, extra], 1)

    def _rescan_wider(
        self,
        result: RefinementResult,
        rows: torch.Tensor,
        spectra: SpecPTSpectra,
        candidates: torch.Tensor,
        settings: dict[str, Any],
        logits: torch.Tensor,
    ) -> RefinementResult:
        """`result` with `rows` [n] refitted around their p(z) modes and the whole range's minima: the windows
        searched only grow, and their DELTACHI2 then weighs the best fits anywhere, not only where the network
        looked."""
        wave = rows_wavelength(spectra.wavelength, rows)
        extended = torch.cat(
            [candidates[rows], self._wide_candidates(rows, spectra, logits, settings["set_prior"])], 1
        )  # [n, 2 modes]
        prior, set_prior = settings["prior"], settings["set_prior"]
        again = refine_redshifts(
            self.templates,
            wave,
            spectra.flux[rows],
            spectra.ivar[rows],
            extended,
            **{
                **settings,
                "prior": None if prior is None else prior[rows],
                "set_prior": None if set_prior is None else {k: v[rows] for k, v in set_prior.items()},
            },
        )
        return _replace_rows(result, rows, again, torch.ones_like(rows, dtype=torch.bool))

    def _archetype_choice(
        self, result: RefinementResult, spectra: SpecPTSpectra, settings: dict[str, Any], own: torch.Tensor
    ) -> RefinementResult:
        """`result` with its non-STAR fits (`own` [sets]: sets with a range of their own) whose DELTACHI2 is below
        `refinement_archetype_gate` judged by the archetypes ([`archetype_redshifts`]: whole range, + a share of
        the p(z) penalty): refitted with the templates within the window about the archetypes' choice where that
        lies outside the window of the fit, and each given the archetypes' DELTACHI2."""
        config = self.config
        judged = ~own[result.spectype]  # [batch]
        if config.refinement_archetype_gate is not None:
            judged &= result.delta_chi2 < config.refinement_archetype_gate
        rows = judged.nonzero()[:, 0]
        if len(rows) == 0:
            return result
        wave = rows_wavelength(spectra.wavelength, rows)
        prior = settings["prior"]
        u, delta_chi2 = archetype_redshifts(
            self.archetypes,
            wave,
            spectra.flux[rows],
            spectra.ivar[rows],
            result.scan_u,
            None if prior is None else config.refinement_archetype_prior * prior[rows],
            config.refinement_archetype_rebin,
        )  # [n] each
        moved = (u - torch.log1p(result.redshift[rows].double())).abs() > settings["half_width"]  # [n]
        result = replace(
            result, delta_chi2=result.delta_chi2.index_put((rows,), delta_chi2.to(result.delta_chi2))
        )
        rows, u = rows[moved], u[moved]
        if len(rows) == 0:
            return result
        set_prior = settings["set_prior"] or {}
        barred = {name: torch.full_like(u, math.inf) for name in settings["own_ranges"]}  # e.g. no STAR
        again = refine_redshifts(
            self.templates,
            rows_wavelength(spectra.wavelength, rows),
            spectra.flux[rows],
            spectra.ivar[rows],
            u[:, None],
            **{
                **settings,
                "prior": None if prior is None else prior[rows],
                "set_prior": {**{k: v[rows] for k, v in set_prior.items()}, **barred},
            },
        )
        again.delta_chi2 = result.delta_chi2[rows]
        again.scan_chi2 = result.scan_chi2[rows]  # the templates' whole curve, as for every other row
        return _replace_rows(result, rows, again, torch.ones_like(rows, dtype=torch.bool))

    def _type_prior(self, spectype_logits: torch.Tensor | None) -> dict[str, torch.Tensor] | None:
        """{template set: [batch]} -2 x `refinement_type_prior` x ln(p(type) / p(most probable type)), p floored
        at `refinement_prior_floor` (None without a type head or with weight 0)."""
        config = self.config
        if spectype_logits is None or config.refinement_type_prior == 0:
            return None
        log_p = torch.log_softmax(spectype_logits.double(), -1)  # [batch, types]
        log_p = log_p.clamp(min=math.log(config.refinement_prior_floor))
        penalty = -2.0 * config.refinement_type_prior * (log_p - log_p.max(1, keepdim=True).values)
        return {name: penalty[:, i] for i, name in enumerate(config.spectype_labels)}

    def pz_penalty(self, logits: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor | None:
        """The p(z) penalty the refinement adds to chi^2: -2 x `refinement_prior` x ln p(z) from `logits`
        [batch, bins] (or log-probabilities) at u = ln(1 + z) [grid] (default: the refinement's coarse grid),
        [batch, grid], 0 at the most probable bin, p(z) floored at `refinement_prior_floor` (None when the weight
        is 0)."""
        config = self.config
        if config.refinement_prior == 0:
            return None
        u = self._scan_u(logits.device) if u is None else u  # [grid]
        bins = ((u - math.log1p(config.z_min)) / config.redshift_bin_width).floor().long()  # [grid]
        bins = bins.clamp(0, config.num_redshift_bins - 1)
        log_p = torch.log_softmax(logits.double(), -1).clamp(min=math.log(config.refinement_prior_floor))
        penalty = -2.0 * config.refinement_prior * log_p[:, bins]  # [batch, grid]
        return penalty - penalty.min(1, keepdim=True).values

    def _check_labels(self, labels: Any, batch: int) -> torch.Tensor:
        labels = _check_tensor("labels", labels)
        labels = labels.reshape(-1).float() if labels.numel() == batch else labels
        if labels.shape != (batch,):
            raise ValueError(
                f"`labels` must hold one redshift per spectrum ({batch}), got {tuple(labels.shape)}"
            )
        if not torch.isfinite(labels).all():
            raise ValueError("`labels` contains NaN/inf redshifts")
        z_min, z_max = self.config.z_min, self.config.z_max
        outside = (labels < z_min) | (labels > z_max)
        if outside.any():
            raise ValueError(
                f"`labels` has {int(outside.sum())} redshifts outside the model's range [{z_min}, {z_max}] "
                f"(e.g. {float(labels[outside][0]):.4f}); select them out or widen z_min/z_max"
            )
        return labels

    def _pz_loss(
        self, labels: torch.Tensor, logits: torch.Tensor, offsets: torch.Tensor, log_sigma: torch.Tensor
    ) -> torch.Tensor:
        """Cross-entropy of the true bin (a Gaussian soft target with `redshift_label_sigma` > 0) + weighted
        Gaussian NLL of the in-bin residual (teacher forcing)."""
        width = self.config.redshift_bin_width
        u = torch.log1p(labels)  # [batch]
        position = (u - math.log1p(self.config.z_min)) / width  # [batch], in bin widths
        true_bin = position.floor().long().clamp(0, self.config.num_redshift_bins - 1)  # [batch]
        residual = position - (true_bin.float() + 0.5)  # [batch], in bin widths
        offset = offsets.gather(1, true_bin[:, None])[:, 0]  # [batch]
        log_s = log_sigma.gather(1, true_bin[:, None])[:, 0]  # [batch]
        nll = 0.5 * ((residual - offset) * torch.exp(-log_s)) ** 2 + log_s  # [batch]
        return F.cross_entropy(logits, self._bin_target(position, true_bin)) + (
            self.config.redshift_nll_weight * nll.mean()
        )

    def _bin_target(self, position: torch.Tensor, true_bin: torch.Tensor) -> torch.Tensor:
        """The true bin [batch], or with `redshift_label_sigma` > 0 a Gaussian over the bin centres centred on
        `position` (in bin widths) [batch, bins]."""
        sigma = self.config.redshift_label_sigma
        if sigma == 0:
            return true_bin
        centers = torch.arange(self.config.num_redshift_bins, device=position.device) + 0.5  # [bins]
        distance = (centers[None] - position[:, None]) / sigma  # [batch, bins]
        return torch.softmax(-0.5 * distance**2, dim=-1)  # [batch, bins]

    @can_return_tuple
    def forward(
        self,
        flux: torch.Tensor,
        ivar: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        wavelength: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> SpecPTRedshiftOutput:
        encoded = self._encode(flux, ivar, mask, wavelength, output_attentions, output_hidden_states)
        if labels is not None:
            labels = self._check_labels(labels, flux.shape[0])
        hidden, padding = encoded.last_hidden_state, encoded.token_padding_mask

        if self.config.head_type == "paper":
            embedding, redshift = self.head(hidden, padding, encoded.pooled)  # [batch, d_model], [batch]
            loss = None
            if labels is not None:
                labels = labels.to(redshift.device)
                loss = ((redshift - labels).abs() / (1.0 + labels)).mean()
            return SpecPTRedshiftOutput(
                loss=loss,
                redshift=redshift,
                embedding=embedding,
                hidden_states=encoded.hidden_states,
                attentions=encoded.attentions,
            )

        embedding, logits, offsets, log_sigma = self.head(
            hidden, padding, encoded.pooled
        )  # [b, d], 3 x [b, bins]
        redshift, redshift_err, quality = self._predict_pz(logits, offsets, log_sigma)
        loss = None
        if labels is not None:
            loss = self._pz_loss(labels.to(logits.device), logits, offsets, log_sigma)
        spectype_logits = None if self.spectype_head is None else self.spectype_head(embedding).float()
        refined = {}
        if self.refines and not self.training:
            refined = self._refine(flux, ivar, mask, wavelength, logits, offsets, quality, spectype_logits)
            refined.update(redshift_net=redshift, redshift_err_net=redshift_err)
        return SpecPTRedshiftOutput(
            loss=loss,
            redshift=refined.pop("redshift", redshift),
            redshift_err=refined.pop("redshift_err", redshift_err),
            quality=quality,
            logits=logits,
            offsets=offsets,
            log_sigma=log_sigma,
            embedding=embedding,
            spectype_logits=spectype_logits,
            **refined,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
        )


def _load_described(
    source: Any, described: dict[str, Any] | None, command: str, file_kwargs: dict[str, Any]
) -> dict[str, RestFrameTemplates] | None:
    """The rest-frame sets a config entry (`config.templates`, `config.archetypes`) describes, read from the folder
    or repo `source` (None when it describes none); a clear OSError when the file is missing or differs."""
    if not described:
        return None
    path = cached_file(
        str(source), described["file"], _raise_exceptions_for_missing_entries=False, **file_kwargs
    )
    if path is None:
        raise OSError(
            f"{source}: config.json describes {command} in {described['file']}, but that file is missing; "
            f"copy it next to config.json or rebuild it with `specpt {command}`"
        )
    sets = load_templates(path)
    if sorted(sets) != sorted(described["spectypes"]):
        raise OSError(
            f"{path}: holds sets {sorted(sets)}, config.json describes {sorted(described['spectypes'])}"
        )
    return {name: sets[name] for name in described["spectypes"]}


def _replace_rows(
    result: RefinementResult, rows: torch.Tensor, other: RefinementResult, keep: torch.Tensor
) -> RefinementResult:
    """`result` with its `rows` set from the `keep` rows of `other` (the scan grid is shared)."""
    fields = {"scan_u": result.scan_u}
    for name in (
        "redshift",
        "redshift_err",
        "chi2",
        "delta_chi2",
        "coeff",
        "npixels",
        "spectype",
        "prior",
        "scan_chi2",
    ):
        values = getattr(result, name).clone()
        values[rows] = getattr(other, name)[keep].to(values.dtype)
        fields[name] = values
    return RefinementResult(**fields)


__all__ = [
    "SpecPTForRedshift",
    "SpecPTForSpectrumReconstruction",
    "SpecPTModel",
    "SpecPTModelOutput",
    "SpecPTPreTrainedModel",
    "SpecPTReconstructionOutput",
    "SpecPTRedshiftOutput",
    "convert_legacy_state_dict",
    "prepare_spectra",
]
