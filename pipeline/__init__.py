"""Edge-deployment pipeline for image classifiers: finetune -> compress -> export -> serve."""
__version__ = "0.1.0"
