"""otakit: over-the-air firmware updates for MCUboot devices and gateways."""

__version__ = "0.1.0"
