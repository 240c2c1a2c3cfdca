"""medpeft: parameter-efficient fine-tuning of causal LMs for the medical domain (QLoRA, adapters, P-Tuning)."""

__version__ = "0.1.0"
