"""SpecPT model configurations.

`SpecPTConfig` describes the backbone and the autoencoder (`model_type="specpt"`); `SpecPTForRedshiftConfig`
adds the redshift head and the redshift range (`model_type="specpt_redshift"`). A config carries everything a
checkpoint needs to be used correctly: the wavelength grid the model was trained on, the normalisation, and the
redshift range of the head. Derived sizes (number of tokens, flattened width of the paper layout) are computed
by the modules, never stored.

This file is shipped next to `modeling_specpt.py` in saved model folders (`trust_remote_code`), so it imports
only `transformers`.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import PretrainedConfig

LAYOUTS = ("tokens", "paper")
NORMALIZATIONS = ("median", "none")
POOLINGS = ("attention", "mean")
RECONSTRUCTION_LOSSES = ("chi2", "l1")
HEAD_TYPES = ("pz", "paper")
REFINEMENTS = ("none", "peaks", "peaks+wide")
# Gaussian sigma (km/s) of the fine scan's basis per template set: galaxies' and stars' narrowest features are
# resolution-limited (DESI: sigma ~ 40-70 km/s), quasars' broad lines thousands of km/s wide
# (benchmarks/template_smoothing.py).
REFINEMENT_SMOOTHING_KMS = {"GALAXY": 50.0, "QSO": 400.0, "STAR": 50.0}
# groups of vacuum rest wavelengths (Angstrom) of lines most often taken for one another: in faint galaxies the
# [O II] 3726/3729 doublet's mean, [O III] 5007 and H-alpha
REFINEMENT_ALIAS_LINES = [[3728.5, 5008.2, 6564.6]]
# quasars' Ly-alpha, C IV 1548/1551, C III] 1909 and Mg II 2796/2804 (doublet means): a group measured as an option,
# not a default (benchmarks/README.md, "Line aliases")
QUASAR_ALIAS_LINES = [1215.67, 1549.5, 1908.7, 2799.9]


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """ValueError naming the setting `name` unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}")


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"`{name}` must be > 0, got {value!r}")


def _check_nonnegative(**values: float) -> None:
    for name, value in values.items():
        if not value >= 0:
            raise ValueError(f"`{name}` must be >= 0, got {value!r}")


class SpecPTConfig(PretrainedConfig):
    r"""
    Configuration of a SpecPT backbone and autoencoder ([`SpecPTModel`], [`SpecPTForSpectrumReconstruction`]).

    Two layouts share this config. `"tokens"` (default): a conv stem cuts the spectrum into wavelength tokens of
    `patch_size` pixels, adds features of each token's central wavelength, and a pre-norm transformer encoder
    attends across tokens; the autoencoder's decoder rebuilds the pixels from the pooled embedding. `"paper"`:
    the published SpecPT structure (conv stack + max-pool, flatten, Linear to one `d_model` token, transformer
    encoder / decoder, two dense layers back to the pixels).

    Attention is computed by `attn_implementation` (a `PretrainedConfig` argument, also taken by
    `from_pretrained`): `"sdpa"` (the default, `torch.nn.functional.scaled_dot_product_attention`) or `"eager"`
    (plain torch operations: the only one that returns attention weights with `output_attentions=True`, and the
    one `specpt train` uses on a CPU, where torch's sdpa has no fused kernel for attention dropout).

    Args:
        num_pixels (`int`, *optional*, defaults to 7781):
            Number of pixels of the wavelength grid the model reads (DESI merged b+r+z grid).
        wavelength_start (`float`, *optional*, defaults to 3600.0):
            Wavelength of the first pixel, vacuum Angstrom.
        wavelength_step (`float`, *optional*, defaults to 0.8):
            Pixel step, Angstrom (linear grid).
        normalization (`str`, *optional*, defaults to `"median"`):
            Per-spectrum flux scale the model divides by before anything sees the flux: `"median"` (median of
            |flux| over good pixels, falling back to their mean |flux|, then to 1) or `"none"`.
        layout (`str`, *optional*, defaults to `"tokens"`):
            `"tokens"` or `"paper"` (see above).
        patch_size (`int`, *optional*, defaults to 16):
            Pixels per token (`tokens` layout). 7781 pixels at 32 give 244 tokens; the end is padded with bad pixels.
        stem_channels (`int`, *optional*, defaults to 64):
            Channels of the first convolution of the token stem.
        stem_kernel_size (`int`, *optional*, defaults to 7):
            Kernel of the first convolution of the token stem (odd).
        use_ivar_feature (`bool`, *optional*, defaults to `True`):
            Feed log(1 + sqrt(ivar)) (normalised units) to the token stem next to the flux and the good-pixel flag.
        num_position_frequencies (`int`, *optional*, defaults to 32):
            Number of sinusoid frequencies of log(wavelength) used as positional features of each token.
        paper_conv_channels (`list[int]`, *optional*, defaults to `[64, 128, 256]`):
            Output channels of the conv stack (`paper` layout); each conv has stride 2 and "same"-style padding.
        paper_conv_kernels (`list[int]`, *optional*, defaults to `[41, 21, 11]`):
            Kernel sizes of the conv stack (`paper` layout).
        d_model (`int`, *optional*, defaults to 512):
            Width of the transformer.
        num_layers (`int`, *optional*, defaults to 8):
            Transformer encoder layers.
        num_decoder_layers (`int`, *optional*, defaults to 1):
            Transformer layers of the autoencoder's decoder.
        num_heads (`int`, *optional*, defaults to 8):
            Attention heads; must divide `d_model`.
        ffn_dim (`int`, *optional*, defaults to 2048):
            Hidden width of the transformer feed-forward blocks.
        dropout (`float`, *optional*, defaults to 0.1):
            Dropout of the transformer layers.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of the layer norms.
        pooling (`str`, *optional*, defaults to `"attention"`):
            How the token states become one embedding per spectrum (`tokens` layout): `"attention"` (a learned
            query attends over the good tokens) or `"mean"` (mean over the good tokens).
        reconstruction_loss (`str`, *optional*, defaults to `"chi2"`):
            `"chi2"`: ivar-weighted chi^2 per good pixel; `"l1"`: the published mean absolute error over good pixels.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of all weight matrices.

    Example:

    ```python
    >>> from specpt_hf import SpecPTConfig, SpecPTForSpectrumReconstruction
    >>> config = SpecPTConfig(d_model=32, num_layers=2, num_heads=2, ffn_dim=64, patch_size=64)
    >>> model = SpecPTForSpectrumReconstruction(config)
    ```
    """

    model_type = "specpt"
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_heads",
    }

    def __init__(
        self,
        # input grid and preprocessing
        num_pixels: int = 7781,
        wavelength_start: float = 3600.0,
        wavelength_step: float = 0.8,
        normalization: str = "median",
        # layout
        layout: str = "tokens",
        # token stem (layout "tokens")
        patch_size: int = 16,
        stem_channels: int = 64,
        stem_kernel_size: int = 7,
        use_ivar_feature: bool = True,
        num_position_frequencies: int = 32,
        # conv stem (layout "paper")
        paper_conv_channels: list[int] | tuple[int, ...] = (64, 128, 256),
        paper_conv_kernels: list[int] | tuple[int, ...] = (41, 21, 11),
        # transformer
        d_model: int = 512,
        num_layers: int = 8,
        num_decoder_layers: int = 1,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        layer_norm_eps: float = 1e-5,
        pooling: str = "attention",
        # loss and init
        reconstruction_loss: str = "chi2",
        initializer_range: float = 0.02,
        **kwargs: Any,
    ) -> None:
        self.num_pixels = int(num_pixels)
        self.wavelength_start = float(wavelength_start)
        self.wavelength_step = float(wavelength_step)
        self.normalization = normalization
        self.layout = layout
        self.patch_size = int(patch_size)
        self.stem_channels = int(stem_channels)
        self.stem_kernel_size = int(stem_kernel_size)
        self.use_ivar_feature = bool(use_ivar_feature)
        self.num_position_frequencies = int(num_position_frequencies)
        self.paper_conv_channels = [int(c) for c in paper_conv_channels]
        self.paper_conv_kernels = [int(k) for k in paper_conv_kernels]
        self.d_model = int(d_model)
        self.num_layers = int(num_layers)
        self.num_decoder_layers = int(num_decoder_layers)
        self.num_heads = int(num_heads)
        self.ffn_dim = int(ffn_dim)
        self.dropout = float(dropout)
        self.layer_norm_eps = float(layer_norm_eps)
        self.pooling = pooling
        self.reconstruction_loss = reconstruction_loss
        self.initializer_range = float(initializer_range)
        self._validate_backbone()
        super().__init__(**kwargs)

    def _validate_backbone(self) -> None:
        check_choice("layout", self.layout, LAYOUTS)
        check_choice("normalization", self.normalization, NORMALIZATIONS)
        check_choice("pooling", self.pooling, POOLINGS)
        check_choice("reconstruction_loss", self.reconstruction_loss, RECONSTRUCTION_LOSSES)
        _check_positive(
            num_pixels=self.num_pixels,
            wavelength_start=self.wavelength_start,
            wavelength_step=self.wavelength_step,
            patch_size=self.patch_size,
            stem_channels=self.stem_channels,
            stem_kernel_size=self.stem_kernel_size,
            num_position_frequencies=self.num_position_frequencies,
            d_model=self.d_model,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            ffn_dim=self.ffn_dim,
            layer_norm_eps=self.layer_norm_eps,
            initializer_range=self.initializer_range,
        )
        if self.num_decoder_layers < 0:
            raise ValueError(f"`num_decoder_layers` must be >= 0, got {self.num_decoder_layers}")
        if self.stem_kernel_size % 2 == 0:
            raise ValueError(f"`stem_kernel_size` must be odd, got {self.stem_kernel_size}")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"`d_model` ({self.d_model}) must be a multiple of `num_heads` ({self.num_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout}")
        if len(self.paper_conv_channels) != len(self.paper_conv_kernels) or not self.paper_conv_channels:
            raise ValueError(
                "`paper_conv_channels` and `paper_conv_kernels` must be non-empty and of equal length, got "
                f"{self.paper_conv_channels} and {self.paper_conv_kernels}"
            )
        if any(c <= 0 for c in self.paper_conv_channels) or any(k <= 0 for k in self.paper_conv_kernels):
            raise ValueError("`paper_conv_channels` and `paper_conv_kernels` must be positive")

    @property
    def wavelength_end(self) -> float:
        """Wavelength of the last pixel, Angstrom."""
        return self.wavelength_start + (self.num_pixels - 1) * self.wavelength_step


class SpecPTForRedshiftConfig(SpecPTConfig):
    r"""
    Configuration of [`SpecPTForRedshift`]: a [`SpecPTConfig`] plus the redshift head and its redshift range.

    Loading it from an autoencoder folder (`model_type="specpt"`) keeps the backbone settings and gives the head
    its defaults (overridable by keyword), which is how `SpecPTForRedshift.from_pretrained(<autoencoder>)` works.

    Args:
        head_type (`str`, *optional*, defaults to `"pz"`):
            `"pz"`: p(z) over `num_redshift_bins` bins uniform in u = ln(1 + z) with a per-bin offset and
            log-sigma, giving a redshift, an uncertainty and a quality score. `"paper"`: the published head
            (attention within the spectrum + residual MLP blocks + Softplus), a redshift only.
        z_min (`float`, *optional*, defaults to 0.0):
            Lower end of the redshift range. Labels below it are rejected.
        z_max (`float`, *optional*, defaults to 4.0):
            Upper end of the redshift range (4 covers DESI quasars). Labels above it are rejected.
        num_redshift_bins (`int`, *optional*, defaults to 512):
            Number of p(z) bins (`pz` head). The bin width in ln(1 + z) is ln((1 + z_max) / (1 + z_min)) / bins.
        head_hidden_size (`int`, *optional*):
            Inner width of the head's residual MLP blocks; the paper head ends with `head_hidden_size // 2`.
            Defaults to `d_model`, so a head built on any backbone has a matching size.
        head_num_blocks (`int`, *optional*, defaults to 2):
            Residual MLP blocks of the head (the published head has 5).
        head_dropout (`float`, *optional*, defaults to 0.1):
            Dropout inside the head's blocks (the published head uses 0.2).
        redshift_offset_bound (`float`, *optional*, defaults to 1.0):
            Largest offset, in bin widths, that the `pz` head may add to a bin centre.
        redshift_nll_weight (`float`, *optional*, defaults to 1.0):
            Weight of the Gaussian NLL of the in-bin residual relative to the bin cross-entropy.
        redshift_label_sigma (`float`, *optional*, defaults to 0.0):
            Width, in bin widths, of the Gaussian soft target of the bin cross-entropy, centred on the true
            ln(1 + z): a near miss then costs less than a far one. 0 puts the whole target on the true bin.
        quality_window (`int`, *optional*, defaults to 2):
            The quality score is the p(z) mass within +-`quality_window` bins of the peak.
        freeze_encoder (`bool`, *optional*, defaults to `False`):
            Freeze the backbone (`model.specpt`): no gradients, and it stays in eval mode (dropout off,
            BatchNorm statistics fixed) when the model is put in training mode. Applied at construction and
            again after `from_pretrained` loads the weights.
        refinement (`str`, *optional*, defaults to `"peaks+wide"`):
            Template chi^2 refinement of the `pz` head's redshift when the model has rest-frame templates
            (`templates.safetensors`, see `specpt_hf.refinement`): `"none"` keeps the network's redshift;
            `"peaks"` scans chi^2(z) around the `refinement_modes` strongest p(z) modes; `"peaks+wide"` also
            looks over the whole redshift range for spectra with a flat or multi-modal p(z)
            (quality < `refinement_wide_quality`), a poor best fit (reduced chi^2 > `refinement_wide_chi2`) or an
            ambiguous one (DELTACHI2 within the p(z) windows < `refinement_wide_delta_chi2`), or one won at a
            line alias (`refinement_alias_lines`): a cheap chi^2(z) of the whole range (`refinement_wide_rebin`,
            `refinement_wide_vectors`) adds its `refinement_modes` lowest minima to the windows scanned.
        refinement_modes (`int`, *optional*, defaults to 3):
            Distinct p(z) modes (at least 2 x `refinement_window` bins apart) scanned per spectrum.
        refinement_window (`float`, *optional*, defaults to 2.0):
            Half-width of the scan around each mode, in p(z) bins.
        refinement_rebin (`int`, *optional*, defaults to 3):
            The coarse chi^2(z) curve bins the spectrum onto the templates' ln(lambda) grid coarsened by this
            factor (3: steps of 2.4e-4 in ln(1 + z), 73 km/s, for DESI templates) and has one trial per bin.
        refinement_fine_step (`float`, *optional*, defaults to 2e-4):
            Step in ln(1 + z) of the fine scan (`refinement_fine_trials` trials about the vertex of the coarse
            curve's parabola, on the spectrum's own pixels) whose parabola gives the redshift.
        refinement_fine_trials (`int`, *optional*, defaults to 7):
            Trials of the fine scan (odd, >= 3): the middle three are fitted, then one more beside the lowest
            while it is at an end of those fitted (within these trials); the parabola goes through the lowest and
            its neighbours.
            7 trials of 2e-4 (measured with benchmarks/fine_scan.py against 5 of 1e-4: QSO NMAD -26 %, LRG -10 %,
            BGS / ELG +2-3 %, 5 % more CPU time).
        refinement_coarse_vectors (`int`, *optional*, defaults to 7):
            Fit only each template set's first this many vectors in the coarse chi^2(z) curve (faster: its
            cost grows as vectors^2); 0 fits them all. The fine scan always fits them all. 7 is chosen on a
            validation split (`benchmarks/refinement_sweep.py`, CPU-recipe model, 4,701 spectra, `peaks+wide`):
            η 1.64 % with all 10 GALAXY vectors, 1.57 % with 7, 1.91 % with 5 (ELG 4.6 / 4.5 / 6.1 %); η of the
            ZWARN = 0 sample 0.18 / 0.09 / 0.18 %; 57 / 60 / 64 spectra per CPU-second.
        refinement_smoothing_kms (`dict`, *optional*, defaults to `REFINEMENT_SMOOTHING_KMS`):
            Gaussian sigma in km/s, per template set, by which the fine scan smooths the basis (a set not named:
            0). Learned from noisy spectra, the basis carries their pixel noise, which makes chi^2(z) jagged on a
            pixel's scale: its minimum moves and ZERR shrinks. The coarse curve, which chooses the minimum and the
            type, keeps the basis as learned. {"GALAXY": 50, "QSO": 400, "STAR": 50} on 1,000 held-out mocks,
            `make main` model: refined NMAD -17 % (BGS), -29 % (LRG), -15 % (ELG), -23 % (QSO), η unchanged,
            median |Δz| / ZERR from 1.6 / 3.4 / 1.4 / 16 to 1.0 / 1.3 / 0.8 / 1.5 (0.67 if ZERR were exact).
        refinement_wide_rebin (`int`, *optional*, defaults to 6):
            `peaks+wide`: the whole range's chi^2(z) bins the spectrum onto the templates' grid coarsened by this
            factor (6: steps of 4.9e-4 in ln(1 + z), 146 km/s, for DESI templates). Binning keeps every line's
            flux, so the coarse curve's minima still mark the right basins, which the windows then resolve.
            Chosen on a validation split (`benchmarks/refinement_sweep.py`, CPU-recipe model, 4,701 spectra):
            η 1.64 % at 6 (all vectors) against 1.68 % when the whole range was scanned at the windows'
            resolution, at 2.1 times the speed; 1.79 % at 9, 1.77 % at 12.
        refinement_wide_vectors (`int`, *optional*, defaults to 0):
            `peaks+wide`: template vectors fitted in the whole range's chi^2(z) (0: all). Fewer rank the basins
            worse: η 1.68 % with 5, 2.17 % with 3 on the same split.
        refinement_wide_quality (`float`, *optional*, defaults to 0.3):
            `peaks+wide`: p(z) quality below which the whole range's minima are added to the windows.
        refinement_wide_chi2 (`float`, *optional*, defaults to 2.0):
            `peaks+wide`: best reduced chi^2 above which the whole range's minima are added and the fit redone.
        refinement_wide_delta_chi2 (`float`, *optional*, defaults to 25.0):
            `peaks+wide`: DELTACHI2 of the p(z) windows' scan below which the whole range is looked at too (0:
            never for this reason). Such a spectrum is refitted with the whole range's minima added to its windows
            and reports that fit's DELTACHI2, so its ZWARN weighs the best fits anywhere, not only where the network
            looked. 25 is chosen on a validation split
            (`benchmarks/refinement_sweep.py`, CPU-recipe model, 4,701 spectra): η of the ZWARN = 0 sample 0.41 % at
            0, 0.32 % at 16, 0.23 % at 25, 0.27 % at 49; BGS η 0.24 % -> 0.08 % and QSO 3.6 % -> 2.6 % at 9-49.
        refinement_prior (`float`, *optional*, defaults to 4.0):
            Weight of the network's p(z) as a prior on the chi^2 scan: the minimum chosen is that of
            chi^2 - 2 x `refinement_prior` x ln p(z) (DELTACHI2 too), so a template fit elsewhere must beat the
            network's belief by that much. 0 chooses by chi^2 alone; 1 is the plain posterior. 4 is chosen on a
            validation split (`benchmarks/refinement_sweep.py`): η 6.1 % at 0, 4.1 % at 4, 3.8-3.7 % at 6-10,
            5.2 % at 30, where the prior starts to override good fits; the lower end of the plateau leaves room
            for the sharper p(z) of longer-trained networks.
        refinement_prior_floor (`float`, *optional*, defaults to 1e-4):
            Lowest p(z) bin probability the prior uses: caps its penalty at -2 ln(floor) x `refinement_prior`
            (74 chi^2 units at weight 4 and floor 1e-4), so a much better fit anywhere still wins.
        refinement_type_prior (`float`, *optional*, defaults to 4.0):
            Weight of the spectral-type head's p(type) as a prior on the template sets: each set's chi^2 gets
            -2 x `refinement_type_prior` x ln(p(type) / p(most probable type)), p floored at
            `refinement_prior_floor`, so a set the network rules out must fit that much better to win (0: off;
            no effect without a type head). A set the head does not know (e.g. STAR) gets no penalty. 4 is chosen
            on a tuning set of 2,000 mocks per class drawn like the test set with another seed (CPU-recipe model,
            `benchmarks/accuracy.py --seed 202`): ELG η 8.45 / 8.05 / 7.75 / 7.95 % at 0 / 2 / 4 / 8, its
            ZWARN = 0 sample 73.0 / 74.2 / 75.1 / 75.6 % kept at η 0.75 / 0.88 / 0.73 / 0.86 %; QSO η 3.00 /
            2.90 / 2.75 / 2.60 %; BGS and LRG unchanged.
        refinement_alias_lines (`list[list[float]]`, *optional*, defaults to `REFINEMENT_ALIAS_LINES`):
            `peaks+wide`: groups of rest wavelengths (Angstrom, vacuum) of lines a single detected line may be any
            of (one group per kind of spectrum). The scan also searches where the strongest p(z) mode's line would
            be each of the others of its group (u + ln(λ_i / λ_j), every ordered pair; windows twice a mode's width,
            as the mode's own error carries over), so a line the network misread (e.g. [O III] 5007 taken for
            [O II]) is fitted at its other reading too and DELTACHI2 weighs the two; a fit won at an alias is
            refitted with the whole range's minima. [] turns it off. On two tuning sets
            (`benchmarks/zwarn_thresholds.py --config`, seeds 202 and 303, 6,000 mocks per class), without -> with:
            η of the ZWARN = 0 sample ELG 0.55 -> 0.46 %, BGS 0.09 -> 0.03 %, QSO 0.39 -> 0.35 % at the same
            fractions kept; η of all spectra BGS 0.20 -> 0.17 %, QSO 2.55 -> 2.38 %, ELG 7.35 -> 7.43 %. Adding
            `QUASAR_ALIAS_LINES` as a second group gained little more there (QSO 0.29 % and 2.33 %, ELG 7.45 %).
        refinement_archetype_rebin (`int`, *optional*, defaults to 6):
            With archetypes (`archetypes.safetensors`, `specpt archetypes`): their whole-range chi^2(z) bins the
            spectrum onto their grid coarsened by this factor (trials are the coarse curve's, rounded to its steps).
        refinement_archetype_prior (`float`, *optional*, defaults to 0.25):
            With archetypes: the share of the p(z) penalty (`refinement_prior`) added to their chi^2(z). 0.25 is
            chosen on the same validation split as the gate: η 1.12 / 0.45 / 0.52 / 0.63 % at 0 / 0.25 / 0.5 / 1,
            with the S/N divided by up to 2 3.93 / 1.55 / 1.79 / 2.33 %.
        refinement_archetype_gate (`float`, *optional*, defaults to 25.0):
            With archetypes: they judge only non-STAR fits whose DELTACHI2 is below this (None: every non-STAR
            fit). A judged fit takes the basin of the archetypes' lowest chi^2(z) + prior over the whole range
            (galaxies to z = 1.7), is refitted there with the templates, and reports the archetypes' DELTACHI2.
            25 is chosen on a validation split (`benchmarks/refinement_sweep.py`, the reference CPU-recipe model
            with 16 archetypes per type, 4,631 spectra): η 0.58 / 0.48 / 0.52 % at every fit / 100 / 25 (1.19 %
            without archetypes), with the S/N divided by up to 2 1.88 / 1.84 / 1.79 % (2.87 %); a lower gate also
            judges fewer fits, so it costs less time.
        spectype_labels (`list[str]`, *optional*):
            The spectral types (template set names, e.g. `["GALAXY", "QSO"]`) the type head tells apart: a linear
            layer on the head's embedding, fitted on the labelled training split by `specpt templates`
            (`specpt_hf.templates.fit_spectype_head`). None: no type head.
        templates (`dict`, *optional*):
            Description of the model folder's templates (file, spectral types, vectors, rest-frame range); set
            by `SpecPTForRedshift.set_templates`, None for a model without templates.
        archetypes (`dict`, *optional*):
            Description of the model folder's archetypes, as `templates`; set by `SpecPTForRedshift.set_archetypes`,
            None for a model without archetypes.
    """

    model_type = "specpt_redshift"

    def __init__(
        self,
        # head
        head_type: str = "pz",
        z_min: float = 0.0,
        z_max: float = 4.0,
        num_redshift_bins: int = 512,
        head_hidden_size: int | None = None,
        head_num_blocks: int = 2,
        head_dropout: float = 0.1,
        redshift_offset_bound: float = 1.0,
        redshift_nll_weight: float = 1.0,
        redshift_label_sigma: float = 0.0,
        quality_window: int = 2,
        # fine-tuning
        freeze_encoder: bool = False,
        # template refinement
        refinement: str = "peaks+wide",
        refinement_modes: int = 3,
        refinement_window: float = 2.0,
        refinement_fine_step: float = 2e-4,
        refinement_fine_trials: int = 7,
        refinement_rebin: int = 3,
        refinement_coarse_vectors: int = 7,
        refinement_smoothing_kms: dict[str, float] | None = None,
        refinement_wide_rebin: int = 6,
        refinement_wide_vectors: int = 0,
        refinement_wide_quality: float = 0.3,
        refinement_wide_chi2: float = 2.0,
        refinement_wide_delta_chi2: float = 25.0,
        refinement_prior: float = 4.0,
        refinement_prior_floor: float = 1e-4,
        refinement_type_prior: float = 4.0,
        refinement_alias_lines: list[list[float]] | None = None,
        refinement_archetype_rebin: int = 6,
        refinement_archetype_prior: float = 0.25,
        refinement_archetype_gate: float | None = 25.0,
        spectype_labels: list[str] | None = None,
        templates: dict[str, Any] | None = None,
        archetypes: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.head_type = head_type
        self.z_min = float(z_min)
        self.z_max = float(z_max)
        self.num_redshift_bins = int(num_redshift_bins)
        self.head_num_blocks = int(head_num_blocks)
        self.head_dropout = float(head_dropout)
        self.redshift_offset_bound = float(redshift_offset_bound)
        self.redshift_nll_weight = float(redshift_nll_weight)
        self.redshift_label_sigma = float(redshift_label_sigma)
        self.quality_window = int(quality_window)
        self.freeze_encoder = bool(freeze_encoder)
        self.refinement = refinement
        self.refinement_modes = int(refinement_modes)
        self.refinement_window = float(refinement_window)
        self.refinement_fine_step = float(refinement_fine_step)
        self.refinement_fine_trials = int(refinement_fine_trials)
        self.refinement_rebin = int(refinement_rebin)
        self.refinement_coarse_vectors = int(refinement_coarse_vectors)
        smoothing = REFINEMENT_SMOOTHING_KMS if refinement_smoothing_kms is None else refinement_smoothing_kms
        self.refinement_smoothing_kms = {str(name): float(sigma) for name, sigma in smoothing.items()}
        self.refinement_wide_rebin = int(refinement_wide_rebin)
        self.refinement_wide_vectors = int(refinement_wide_vectors)
        self.refinement_wide_quality = float(refinement_wide_quality)
        self.refinement_wide_chi2 = float(refinement_wide_chi2)
        self.refinement_wide_delta_chi2 = float(refinement_wide_delta_chi2)
        self.refinement_prior = float(refinement_prior)
        self.refinement_prior_floor = float(refinement_prior_floor)
        aliases = REFINEMENT_ALIAS_LINES if refinement_alias_lines is None else refinement_alias_lines
        if not all(isinstance(group, (list, tuple)) for group in aliases):
            raise ValueError(f"`refinement_alias_lines` must be groups (lists) of wavelengths, got {aliases}")
        self.refinement_alias_lines = [[float(line) for line in group] for group in aliases]
        self.refinement_type_prior = float(refinement_type_prior)
        self.refinement_archetype_rebin = int(refinement_archetype_rebin)
        self.refinement_archetype_prior = float(refinement_archetype_prior)
        self.refinement_archetype_gate = (
            None if refinement_archetype_gate is None else float(refinement_archetype_gate)
        )
        self.spectype_labels = None if spectype_labels is None else [str(name) for name in spectype_labels]
        self.templates = templates
        self.archetypes = archetypes
        super().__init__(**kwargs)
        self.head_hidden_size = int(self.d_model if head_hidden_size is None else head_hidden_size)
        self._validate_head()

    def _validate_head(self) -> None:
        check_choice("head_type", self.head_type, HEAD_TYPES)
        if not (self.z_min > -1.0 and self.z_max > self.z_min and math.isfinite(self.z_max)):
            raise ValueError(f"need -1 < `z_min` < `z_max` < inf, got z_min={self.z_min}, z_max={self.z_max}")
        if self.num_redshift_bins < 2:
            raise ValueError(f"`num_redshift_bins` must be >= 2, got {self.num_redshift_bins}")
        _check_positive(
            head_hidden_size=self.head_hidden_size,
            redshift_offset_bound=self.redshift_offset_bound,
        )
        if self.head_hidden_size < 2:
            raise ValueError(f"`head_hidden_size` must be >= 2, got {self.head_hidden_size}")
        _check_nonnegative(
            head_num_blocks=self.head_num_blocks,
            quality_window=self.quality_window,
            redshift_nll_weight=self.redshift_nll_weight,
            redshift_label_sigma=self.redshift_label_sigma,
        )
        if not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"`head_dropout` must be in [0, 1), got {self.head_dropout}")
        self._validate_refinement()

    def _validate_refinement(self) -> None:
        check_choice("refinement", self.refinement, REFINEMENTS)
        _check_positive(
            refinement_modes=self.refinement_modes,
            refinement_window=self.refinement_window,
            refinement_fine_step=self.refinement_fine_step,
            refinement_rebin=self.refinement_rebin,
            refinement_wide_rebin=self.refinement_wide_rebin,
            refinement_wide_chi2=self.refinement_wide_chi2,
            refinement_archetype_rebin=self.refinement_archetype_rebin,
        )
        if self.refinement_fine_trials < 3 or self.refinement_fine_trials % 2 == 0:
            raise ValueError(
                f"`refinement_fine_trials` must be odd and >= 3, got {self.refinement_fine_trials}"
            )
        if not 0.0 <= self.refinement_wide_quality <= 1.0:
            raise ValueError(
                f"`refinement_wide_quality` must be in [0, 1], got {self.refinement_wide_quality}"
            )
        _check_nonnegative(
            refinement_prior=self.refinement_prior,
            refinement_type_prior=self.refinement_type_prior,
            refinement_coarse_vectors=self.refinement_coarse_vectors,
            refinement_wide_vectors=self.refinement_wide_vectors,
            refinement_wide_delta_chi2=self.refinement_wide_delta_chi2,
            refinement_archetype_prior=self.refinement_archetype_prior,
        )
        if self.refinement_archetype_gate is not None and not self.refinement_archetype_gate > 0:
            raise ValueError(
                f"`refinement_archetype_gate` must be > 0 or None, got {self.refinement_archetype_gate}"
            )
        _check_nonnegative(
            **{f"refinement_smoothing_kms[{k!r}]": v for k, v in self.refinement_smoothing_kms.items()}
        )
        if not 0.0 < self.refinement_prior_floor < 1.0:
            raise ValueError(f"`refinement_prior_floor` must be in (0, 1), got {self.refinement_prior_floor}")
        for group in self.refinement_alias_lines:
            if len(set(group)) != len(group) or not all(math.isfinite(line) and line > 0 for line in group):
                raise ValueError(
                    "`refinement_alias_lines` must be groups of distinct positive wavelengths, got "
                    f"{self.refinement_alias_lines}"
                )

    @property
    def redshift_bin_width(self) -> float:
        """Width of one p(z) bin in u = ln(1 + z)."""
        return math.log((1.0 + self.z_max) / (1.0 + self.z_min)) / self.num_redshift_bins

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> tuple[dict, dict]:
        """Read a config dict; an autoencoder config (`model_type="specpt"`) becomes a redshift config whose
        head settings take their defaults (the autoencoder's `architectures` and `auto_map` are dropped)."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == SpecPTConfig.model_type:
            config_dict = {k: v for k, v in config_dict.items() if k not in ("architectures", "auto_map")}
            config_dict["model_type"] = cls.model_type
        return config_dict, kwargs


__all__ = ["SpecPTConfig", "SpecPTForRedshiftConfig"]
