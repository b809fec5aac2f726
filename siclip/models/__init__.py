"""Pure-torch models: SAS-P block, SiCLIP builder, MCt text tower, presets, weight inheritance."""
