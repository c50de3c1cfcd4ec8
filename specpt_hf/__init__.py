"""SpecPT for Hugging Face: transformer models for galaxy spectra and spectroscopic redshifts."""

__version__ = "0.1.0"
