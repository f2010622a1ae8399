"""Virtual devices built from otakit.device parts."""
