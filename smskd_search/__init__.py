"""smskd-search: AutoML for Sequential Multi-Stage Knowledge Distillation."""

__version__ = "0.1.0"
