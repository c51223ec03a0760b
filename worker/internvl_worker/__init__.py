"""InternVL worker: models, templates, images, data, inference; the `internvl` command."""

__version__ = "0.1.0"
