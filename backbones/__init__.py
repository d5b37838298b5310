"""Backbones whose pretrained weights come in another framework's format, each with the reader of that format.
model.build_backbone builds them by name; nothing here is imported unless that name is asked for."""
