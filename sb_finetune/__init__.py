"""sb-finetune: reward fine-tuning of diffusion and flow models as stochastic optimal control."""

__version__ = "0.1.0"
