"""saefd_ray: continual learning of LLMs with sparse-autoencoder feature distillation on Ray."""

__version__ = "0.1.0"
