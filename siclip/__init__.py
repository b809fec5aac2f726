"""siclip: SiCLIP (SAS-P blocks, weight inheritance, WIKD + PM distillation) as a Ray experiment framework."""

__version__ = "0.1.0"
